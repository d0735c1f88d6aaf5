"""The end of a batch: when its last job ends, the batch ends and says so (``batch.completed``).

Checked after each batch job's end has committed, in a transaction of its own that locks
only the batch row: of two jobs ending at once, the check that runs after the later commit
sees both ended, and the lock with the status compare-and-set lets exactly one check end
the batch. Reading a batch checks again, so a process that died between a job's commit and
its check delays the end only until someone looks.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from hiddenmodel.batches import repository
from hiddenmodel.batches.models import Batch, BatchStatus
from hiddenmodel.db import async_tenant_session, tenant_session
from hiddenmodel.webhooks import enqueue as webhook_enqueue
from hiddenmodel.webhooks import service as webhooks
from hiddenmodel.webhooks.models import EventType


def event_payload(batch: Batch, counts: repository.Counts) -> dict[str, Any]:
    """The body of ``batch.completed``: the totals; receivers fetch items and the archive."""
    return {
        "type": EventType.BATCH_COMPLETED.value,
        "timestamp": (batch.finished_at or datetime.now(UTC)).isoformat(),
        "data": {
            "id": str(batch.id),
            "name": batch.name,
            "webhook_tag": batch.webhook_tag,
            "status": batch.status,
            "operation": batch.operation,
            "counts": counts.by_status,
            "gpu_seconds": round(counts.gpu_seconds, 4),
            "links": {
                "self": f"/v1/batches/{batch.id}",
                "archive": f"/v1/batches/{batch.id}/archive",
            },
        },
    }


def finish_in(session: Session, batch_id: uuid.UUID) -> list[uuid.UUID]:
    """End the batch if none of its jobs is queued or running (in ``session``'s transaction);
    the ids of the ``batch.completed`` deliveries to send once it commits."""
    # A look without the lock first: while jobs remain (nearly every call for a large
    # batch) no lock is taken; a later job's own check will see them ended.
    if repository.job_counts_sync(session, batch_id).active:
        return []
    batch = repository.lock_batch_sync(session, batch_id)
    if batch is None or batch.status != BatchStatus.SUBMITTED.value:
        return []
    counts = repository.job_counts_sync(session, batch_id)
    if counts.active:
        return []
    status = BatchStatus.CANCELED if batch.cancel_requested else BatchStatus.COMPLETED
    repository.finish_sync(session, batch_id, status)
    session.refresh(batch)
    return webhooks.emit_event_sync(
        session, batch.organization_id, EventType.BATCH_COMPLETED, event_payload(batch, counts)
    )


def finish_if_done_sync(org_id: uuid.UUID, batch_id: uuid.UUID) -> None:
    """After a batch job's end has committed: end the batch if that was its last job."""
    with tenant_session(org_id) as session:
        deliveries = finish_in(session, batch_id)
    webhook_enqueue.send_deliveries(org_id, deliveries)


async def finish_if_done(org_id: uuid.UUID, batch_id: uuid.UUID) -> None:
    """:func:`finish_if_done_sync` for the API."""
    async with async_tenant_session(org_id) as session:
        deliveries: list[uuid.UUID] = await session.run_sync(finish_in, batch_id)
        await session.commit()
    if deliveries:
        await run_in_threadpool(webhook_enqueue.send_deliveries, org_id, deliveries)
