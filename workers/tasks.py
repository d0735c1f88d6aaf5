"""Celery entry points: thin; they take ids only and re-enter the organization's context."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

import redis

from hiddenmodel.jobs import orphans
from hiddenmodel.retention import sweep as retention_sweep
from hiddenmodel.settings import get_settings
from workers import liveness
from workers.celery_app import app
from workers.runner import TransientError, requeue_after_transient, run_job

log = logging.getLogger(__name__)

RETRY_BACKOFF_CAP_S = 60


@app.task(name="jobs.run", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)  # type: ignore[untyped-decorator]
def run(self: Any, org_id: str, job_id: str) -> str:
    """Run one job (one delivery wins it; duplicates are skipped).

    Logs say what became of the job; the message is delivered again only while the job
    still needs it (a transient error before or during the run).
    """
    org, job = uuid.UUID(org_id), uuid.UUID(job_id)
    try:
        outcome = run_job(org, job, liveness.worker_id())
    except TransientError as exc:
        outcome = _after_transient(self, org, job, exc)
    _forget_receipt(str(self.request.id))
    return outcome


def _after_transient(task: Any, org: uuid.UUID, job: uuid.UUID, error: TransientError) -> str:
    countdown = min(RETRY_BACKOFF_CAP_S, 2**task.request.retries)
    try:
        state = requeue_after_transient(org, job, error.attempt)
    except Exception as again:
        # The database is still away: nothing can be decided, so the message comes back.
        log.warning(
            "job %s: %s; its state cannot be read either (%s); delivered again in %s s",
            job,
            error,
            again,
            countdown,
        )
        raise task.retry(countdown=countdown) from None
    if state in ("requeued", "queued"):
        log.warning(
            "job %s: %s; back to queued (attempt %s), delivered again in %s s",
            job,
            error,
            error.attempt or "not started",
            countdown,
        )
        raise task.retry(countdown=countdown) from None
    if state == "failed":
        log.error("job %s: failed (transient-errors) after its last attempt: %s", job, error)
    else:
        log.info("job %s: %s; left as it is (%s)", job, error, state)
    return state


def _forget_receipt(task_id: str) -> None:
    # Else the receipt expires, and its job is no longer queued under this delivery.
    with contextlib.suppress(redis.RedisError):
        liveness.forget_receipt(task_id)


@app.task(name="mail.deliver_outbox", acks_late=True)  # type: ignore[untyped-decorator]
def deliver_outbox() -> dict[str, int]:
    """Retry the outgoing mail that is due (see hiddenmodel.smtp)."""
    from hiddenmodel import smtp

    return smtp.deliver_due()


@app.task(name="maintenance.sweep_orphans", acks_late=True)  # type: ignore[untyped-decorator]
def sweep_orphans() -> dict[str, Any]:
    """Delete input objects whose submit never committed (see hiddenmodel.jobs.orphans)."""
    settings = get_settings()
    done = orphans.sweep_orphans(
        grace_seconds=settings.orphan_grace_seconds,
        # Within one interval: a run never overlaps the next.
        budget_seconds=settings.orphan_sweep_interval_seconds / 2,
    )
    return {"listed": done.listed, "deleted": done.deleted, "finished": done.finished}


@app.task(name="maintenance.expire_outputs", acks_late=True)  # type: ignore[untyped-decorator]
def expire_outputs() -> dict[str, Any]:
    """Delete the objects of jobs past their organization's retention, mark the jobs
    expired, and keep the bucket's lifecycle rules in step (see hiddenmodel.retention)."""
    budget = get_settings().retention_sweep_interval_seconds / 2
    rules = retention_sweep.sync_lifecycle_rules()
    done = retention_sweep.expire_due_jobs(budget_seconds=budget)
    return {
        "jobs": done.jobs,
        "objects": done.objects,
        "refused": done.refused,
        "finished": done.finished,
        "lifecycle_rules": rules,
    }
