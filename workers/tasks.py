"""Celery entry points: thin; they take ids only and re-enter the organization's context."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from hiddenmodel.jobs import orphans
from hiddenmodel.retention import sweep as retention_sweep
from hiddenmodel.settings import get_settings
from workers.celery_app import app
from workers.runner import TransientError, requeue_after_transient, run_job

log = logging.getLogger(__name__)

RETRY_BACKOFF_CAP_S = 60


@app.task(name="jobs.run", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)  # type: ignore[untyped-decorator]
def run(self: Any, org_id: str, job_id: str) -> str:
    """Run one job (one delivery wins it; duplicates are skipped)."""
    try:
        return run_job(uuid.UUID(org_id), uuid.UUID(job_id), str(self.request.hostname))
    except TransientError:
        log.warning("job %s hit a transient error", job_id, exc_info=True)
        if requeue_after_transient(uuid.UUID(org_id), uuid.UUID(job_id)):
            countdown = min(RETRY_BACKOFF_CAP_S, 2**self.request.retries)
            raise self.retry(countdown=countdown) from None
        return "failed"


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
