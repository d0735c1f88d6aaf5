"""All SQL of batches. Async functions serve the API; ``*_sync`` ones the job runners."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.batches.models import Batch, BatchItem, BatchStatus
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.pagination import paginate

ACTIVE = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


async def get_batch(
    session: AsyncSession, batch_id: uuid.UUID, *, lock: bool = False
) -> Batch | None:
    stmt = select(Batch).where(Batch.id == batch_id).execution_options(populate_existing=True)
    if lock:
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


async def list_batches(
    session: AsyncSession, *, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    return await paginate(
        session,
        select(Batch),
        created_at=Batch.created_at,
        id_=Batch.id,
        cursor=cursor,
        limit=limit,
    )


async def delete_batch(session: AsyncSession, batch_id: uuid.UUID) -> None:
    """The batch and (by cascade) its items."""
    await session.execute(delete(Batch).where(Batch.id == batch_id))


async def item_names(session: AsyncSession, batch_id: uuid.UUID) -> set[str]:
    return set(await session.scalars(select(BatchItem.name).where(BatchItem.batch_id == batch_id)))


async def next_position(session: AsyncSession, batch_id: uuid.UUID) -> int:
    top = await session.scalar(
        select(func.max(BatchItem.position)).where(BatchItem.batch_id == batch_id)
    )
    return 0 if top is None else int(top) + 1


async def items(session: AsyncSession, batch_id: uuid.UUID) -> Sequence[BatchItem]:
    return (
        await session.scalars(
            select(BatchItem).where(BatchItem.batch_id == batch_id).order_by(BatchItem.position)
        )
    ).all()


async def items_page(
    session: AsyncSession, batch_id: uuid.UUID, *, offset: int, limit: int
) -> list[tuple[BatchItem, Job | None]]:
    rows = await session.execute(
        select(BatchItem, Job)
        .outerjoin(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == batch_id)
        .order_by(BatchItem.position)
        .offset(offset)
        .limit(limit)
    )
    return [(item, job) for item, job in rows.tuples()]


@dataclass(frozen=True)
class ArchiveRow:
    position: int
    name: str
    item_error_code: str | None
    item_error_message: str | None
    job_id: uuid.UUID | None
    status: str | None
    error_code: str | None
    error_message: str | None
    outputs: list[dict[str, Any]]
    report: dict[str, Any] | None
    gpu_seconds: float | None


async def archive_rows(session: AsyncSession, batch_id: uuid.UUID) -> list[ArchiveRow]:
    """What the archive needs of every item: names, states and output keys (no pixels)."""
    rows = await session.execute(
        select(
            BatchItem.position,
            BatchItem.name,
            BatchItem.error_code,
            BatchItem.error_message,
            Job.id,
            Job.status,
            Job.error_code,
            Job.error_message,
            Job.outputs,
            Job.report,
            Job.gpu_seconds,
        )
        .outerjoin(Job, Job.id == BatchItem.job_id)
        .where(BatchItem.batch_id == batch_id)
        .order_by(BatchItem.position)
    )
    return [
        ArchiveRow(
            position=r[0],
            name=r[1],
            item_error_code=r[2],
            item_error_message=r[3],
            job_id=r[4],
            status=r[5],
            error_code=r[6],
            error_message=r[7],
            outputs=r[8] or [],
            report=r[9],
            gpu_seconds=r[10],
        )
        for r in rows.tuples()
    ]


async def mark_submitted(
    session: AsyncSession, batch_id: uuid.UUID, job_ids: list[uuid.UUID]
) -> None:
    await session.execute(update(Job).where(Job.id.in_(job_ids)).values(batch_id=batch_id))
    await session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(status=BatchStatus.SUBMITTED.value, submitted_at=func.now())
    )


async def queued_job_ids(session: AsyncSession, batch_id: uuid.UUID) -> list[uuid.UUID]:
    return list(
        await session.scalars(
            select(Job.id).where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED.value)
        )
    )


async def request_cancel_running(session: AsyncSession, batch_id: uuid.UUID) -> list[uuid.UUID]:
    return list(
        await session.scalars(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True)
            .returning(Job.id)
        )
    )


@dataclass(frozen=True)
class Counts:
    by_status: dict[str, int]
    running_progress: float
    gpu_seconds: float
    compute_seconds: float
    first_started_at: datetime | None
    last_finished_at: datetime | None

    @property
    def active(self) -> int:
        return sum(self.by_status.get(s, 0) for s in ACTIVE)

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def _counts_stmt(batch_id: uuid.UUID) -> Any:
    return (
        select(
            Job.status,
            func.count(),
            func.coalesce(
                func.sum(case((Job.status == JobStatus.RUNNING.value, Job.progress))), 0.0
            ),
            func.coalesce(func.sum(Job.gpu_seconds), 0.0),
            func.coalesce(func.sum(Job.compute_seconds), 0.0),
            func.min(Job.started_at),
            func.max(Job.finished_at),
        )
        .where(Job.batch_id == batch_id)
        .group_by(Job.status)
    )


def _counts(rows: Sequence[Any]) -> Counts:
    starts = [r[5] for r in rows if r[5] is not None]
    ends = [r[6] for r in rows if r[6] is not None]
    return Counts(
        by_status={r[0]: int(r[1]) for r in rows},
        running_progress=float(sum(r[2] for r in rows)),
        gpu_seconds=float(sum(r[3] for r in rows)),
        compute_seconds=float(sum(r[4] for r in rows)),
        first_started_at=min(starts) if starts else None,
        last_finished_at=max(ends) if ends else None,
    )


async def job_counts(session: AsyncSession, batch_id: uuid.UUID) -> Counts:
    return _counts((await session.execute(_counts_stmt(batch_id))).all())


def job_counts_sync(session: Session, batch_id: uuid.UUID) -> Counts:
    return _counts(session.execute(_counts_stmt(batch_id)).all())


async def item_counts(session: AsyncSession, batch_id: uuid.UUID) -> tuple[int, int]:
    """(items, rejected items)."""
    row = (
        await session.execute(
            select(func.count(), func.count(BatchItem.error_code)).where(
                BatchItem.batch_id == batch_id
            )
        )
    ).one()
    return int(row[0]), int(row[1])


async def recent_seconds_per_job(session: AsyncSession, operation: str) -> float | None:
    """Mean run time of the organization's recent successful jobs of ``operation``: GPU
    seconds when metered, else the worker's compute seconds."""
    recent = (
        select(func.coalesce(Job.gpu_seconds, Job.compute_seconds).label("s"))
        .where(
            Job.operation == operation,
            Job.status == JobStatus.SUCCEEDED.value,
            func.coalesce(Job.gpu_seconds, Job.compute_seconds).is_not(None),
        )
        .order_by(Job.created_at.desc())
        .limit(50)
        .subquery()
    )
    value = await session.scalar(select(func.avg(recent.c.s)))
    return float(value) if value is not None else None


# --- the end of a batch (job runners and the API) ----------------------------------------


def lock_batch_sync(session: Session, batch_id: uuid.UUID) -> Batch | None:
    return session.scalars(
        select(Batch)
        .where(Batch.id == batch_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()


def finish_sync(session: Session, batch_id: uuid.UUID, status: BatchStatus) -> None:
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(status=status.value, finished_at=func.now())
    )


def existing_item_ids_sync(session: Session, item_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``item_ids`` are batch items of the session's organization."""
    if not item_ids:
        return set()
    return set(session.scalars(select(BatchItem.id).where(BatchItem.id.in_(list(item_ids)))))


def batch_of_job_sync(session: Session, job_id: uuid.UUID) -> uuid.UUID | None:
    return session.scalar(select(Job.batch_id).where(Job.id == job_id))
