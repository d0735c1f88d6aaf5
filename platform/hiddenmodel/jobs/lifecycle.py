"""What every end of a job brings with it, wherever the job ends (worker, reconciler, API).

Inside the transaction that moves the job to its terminal state: settle its quota
reservation, write its usage event (when billable) and record its webhook deliveries.
After the commit: announce the new state, wake the dispatcher (the organization has room
again) and queue the webhook deliveries. Nothing is announced that was not committed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.batches import completion as batch_completion
from hiddenmodel.batches import repository as batches
from hiddenmodel.db import after_commit
from hiddenmodel.jobs import events, repository
from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.redis import sync_redis
from hiddenmodel.usage.repository import settle_sync
from hiddenmodel.webhooks import enqueue as webhook_enqueue
from hiddenmodel.webhooks import service as webhooks


class FindBatch(Enum):
    """``record_end_sync``'s default: the job's batch is looked up in the transaction."""

    LOOK_UP = "look up"


FIND_BATCH = FindBatch.LOOK_UP


@dataclass(frozen=True)
class Metered:
    """What a finished job is billed for (see hiddenmodel.usage.repository.settle_sync)."""

    gpu_seconds: float = 0.0
    images: int = 0
    megapixels: float = 0.0
    output_bytes: int = 0


@dataclass
class Ended:
    """A job that reached a terminal state in the current transaction."""

    org_id: uuid.UUID
    job_id: uuid.UUID
    status: JobStatus
    deliveries: list[uuid.UUID] = field(default_factory=list)
    batch_id: uuid.UUID | None = None


def record_end_sync(
    session: Session,
    org_id: uuid.UUID,
    job_id: uuid.UUID,
    status: JobStatus,
    metered: Metered | None = None,
    *,
    batch_id: uuid.UUID | FindBatch | None = FIND_BATCH,
) -> Ended:
    """Call right after the compare-and-set that ended the job, in its transaction. The
    job's batch is looked up unless the caller gives ``batch_id`` (a worker holds its job),
    or None (a caller ending many jobs of one batch checks the batch's end once itself)."""
    m = metered or Metered()
    settle_sync(
        session,
        job_id,
        status.value,
        gpu_seconds=m.gpu_seconds,
        images=m.images,
        megapixels=m.megapixels,
        output_bytes=m.output_bytes,
    )
    deliveries = webhooks.emit_job_event_sync(session, job_id, status)
    return Ended(
        org_id=org_id,
        job_id=job_id,
        status=status,
        deliveries=deliveries,
        batch_id=(
            batches.batch_of_job_sync(session, job_id)
            if isinstance(batch_id, FindBatch)
            else batch_id
        ),
    )


def succeed_in_one_statement_sync(
    org_id: uuid.UUID,
    job_id: uuid.UUID,
    attempt: int,
    metered: Metered,
    *,
    batch_id: uuid.UUID | None,
    outputs: list[dict[str, Any]],
    report: dict[str, Any],
    progress: float,
    compute_seconds: float | None,
    gpu_seconds: float | None,
) -> list[Ended] | None:
    """The usual success, as :func:`record_end_sync` after ``repository.finish_sync`` would
    end it, in one statement that is its own transaction (``repository.succeed_sync``): the
    job ended and settled, and no webhook delivery to record. ``[Ended]`` when this attempt
    ended the job; ``[]`` when it no longer owns it; None when webhook endpoints are
    subscribed to the end, and then nothing is done: end it the usual way, in a session."""
    outcome = repository.succeed_sync(
        org_id,
        job_id,
        attempt,
        outputs=outputs,
        report=report,
        progress=progress,
        compute_seconds=compute_seconds,
        gpu_seconds=gpu_seconds,
        billed_gpu_seconds=metered.gpu_seconds,
        images=metered.images,
        megapixels=metered.megapixels,
        output_bytes=metered.output_bytes,
    )
    if outcome is repository.OneStatementEnd.WEBHOOKS:
        return None
    if outcome is repository.OneStatementEnd.LOST:
        return []
    return [Ended(org_id=org_id, job_id=job_id, status=JobStatus.SUCCEEDED, batch_id=batch_id)]


def announce(ended: list[Ended]) -> None:
    """After the commit: publish, wake the dispatcher, queue webhook deliveries, and end
    the batch of any job that was its batch's last."""
    if ended:
        # The states and the dispatcher's wake in one round trip.
        pipe = sync_redis().pipeline(transaction=False)
        for end in ended:
            events.queue_publish(pipe, end.job_id, {"type": "status", "status": end.status.value})
        events.queue_wake(pipe)
        pipe.execute()
    for end in ended:
        webhook_enqueue.send_deliveries(end.org_id, end.deliveries)
    for org_id, batch_id in dict.fromkeys((e.org_id, e.batch_id) for e in ended if e.batch_id):
        batch_completion.finish_if_done_sync(org_id, batch_id)


async def record_end(
    session: AsyncSession, job_id: uuid.UUID, status: JobStatus, *, end_batch: bool = True
) -> None:
    """:func:`record_end_sync` for the API (a queued job canceled: nothing metered), in
    ``session``'s transaction; the webhook deliveries and the announcement go out once it
    commits."""
    org_id: uuid.UUID = session.info["org_id"]  # bound by every tenant session
    ended = await session.run_sync(
        record_end_sync, org_id, job_id, status, batch_id=FIND_BATCH if end_batch else None
    )
    webhook_enqueue.send_after_commit(session, org_id, ended.deliveries)

    async def _announce() -> None:
        await events.publish_async(job_id, {"type": "status", "status": status.value})
        await events.wake_dispatcher()
        if ended.batch_id is not None:
            await batch_completion.finish_if_done(org_id, ended.batch_id)

    after_commit(session, _announce)
