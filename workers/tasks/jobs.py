"""Celery entry point of jobs: thin; ids only, the run itself lives in workers.runner."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

import redis

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
