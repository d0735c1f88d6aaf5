"""All SQL of jobs. State changes are compare-and-set: ``UPDATE … WHERE status = …``.

Async functions serve the API; the ``*_sync`` ones serve workers, the dispatcher and the
reconciler, which run on plain threads.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

from psycopg.types.json import Jsonb
from sqlalchemy import Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.db import fetch_all_statement_sync
from hiddenmodel.jobs.models import Job, JobOutbox, JobStatus
from hiddenmodel.models import from_json
from hiddenmodel.pagination import paginate
from tenants.models import Organization

QUEUED = JobStatus.QUEUED.value
RUNNING = JobStatus.RUNNING.value


# --- API side ----------------------------------------------------------------------------


async def get_job(session: AsyncSession, job_id: uuid.UUID) -> Job | None:
    return await session.get(Job, job_id, populate_existing=True)


async def get_by_idempotency_key(session: AsyncSession, key: str) -> Job | None:
    return (await session.scalars(select(Job).where(Job.idempotency_key == key))).one_or_none()


async def clear_idempotency_key(session: AsyncSession, job_id: uuid.UUID) -> None:
    await session.execute(update(Job).where(Job.id == job_id).values(idempotency_key=None))


# A page's queue positions in one statement, so one snapshot (``hm_queue_positions``,
# migrations 0021 and 0022; bench/scale.py times it beside the count it replaced).
QUEUE_POSITIONS = text(
    "SELECT job_id, ahead FROM hm_queue_positions("
    ":org, CAST(:ids AS uuid[]), CAST(:created AS timestamptz[]))"
)


async def queue_positions(session: AsyncSession, jobs: Sequence[Job]) -> dict[uuid.UUID, int]:
    """How many of the organization's queued jobs were admitted before each queued job of
    ``jobs`` (a page of a listing, or one job); jobs admitted at the same instant (a batch)
    share a position.

    Exact, in one query per page, and its cost does not follow the number of jobs queued:
    it reads one row per minute the queue spans before the job and the queued jobs admitted
    in the job's own minute (migration 0021).
    """
    queued = [j for j in jobs if j.status == QUEUED]
    if not queued:
        return {}
    rows = await session.execute(
        QUEUE_POSITIONS,
        {
            "org": queued[0].organization_id,
            "ids": [j.id for j in queued],
            "created": [j.created_at for j in queued],
        },
    )
    return {job_id: int(position) for job_id, position in rows.tuples()}


async def list_jobs(
    session: AsyncSession,
    *,
    status: str | None,
    operation: str | None,
    created_after: datetime | None,
    created_before: datetime | None,
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[Any], str | None]:
    stmt = select(Job)
    if status:
        stmt = stmt.where(Job.status == status)
    if operation:
        stmt = stmt.where(Job.operation == operation)
    if created_after:
        stmt = stmt.where(Job.created_at >= created_after)
    if created_before:
        stmt = stmt.where(Job.created_at < created_before)
    return await paginate(
        session, stmt, created_at=Job.created_at, id_=Job.id, cursor=cursor, limit=limit
    )


async def status_counts(session: AsyncSession) -> dict[str, int]:
    """The bound organization's jobs by status."""
    rows = await session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(n) for status, n in rows.tuples()}


async def oldest_queued_at(session: AsyncSession) -> datetime | None:
    """When the bound organization's longest-waiting queued job was submitted."""
    stmt = select(func.min(Job.created_at)).where(Job.status == QUEUED)
    value: datetime | None = await session.scalar(stmt)
    return value


async def cancel_queued(session: AsyncSession, job_id: uuid.UUID, now: datetime) -> bool:
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED)
        .values(
            status=JobStatus.CANCELED.value,
            finished_at=now,
            stage=None,
            error_code="canceled",
            error_message="Canceled before it started.",
        )
        .returning(Job.id)
    )
    if result.scalar_one_or_none() is None:
        return False
    await session.execute(delete(JobOutbox).where(JobOutbox.job_id == job_id))
    return True


async def request_cancel_running(session: AsyncSession, job_id: uuid.UUID) -> bool:
    result = await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING)
        .values(cancel_requested=True)
        .returning(Job.id)
    )
    return result.scalar_one_or_none() is not None


# --- dispatcher and reconciler (cross-tenant through definer functions, ids only) ---------


@dataclass(frozen=True)
class Claimed:
    org_id: uuid.UUID
    job_id: uuid.UUID
    queue: str
    dispatch_count: int


def claim_dispatch_sync(cap: int, limit: int) -> list[Claimed]:
    """The jobs the fairness rules release now, marked dispatched. One statement that is its
    own transaction (the function takes its transaction's advisory lock, so passes run one
    at a time, and returns what it marked): a pass costs one round trip, not a BEGIN and a
    COMMIT more."""
    rows = fetch_all_statement_sync("SELECT * FROM hm_claim_dispatch(%s, %s)", (cap, limit))
    return [Claimed(r[0], r[1], r[2], r[3]) for r in rows]


@dataclass(frozen=True)
class Candidate:
    org_id: uuid.UUID
    job_id: uuid.UUID
    status: str
    queue: str
    dispatch_count: int
    attempts: int
    started_at: datetime | None
    heartbeat_at: datetime | None


def reconcile_candidates_sync(
    session: Session, lease_s: float, grace_s: float, min_hard_limit_s: float
) -> list[Candidate]:
    rows = session.execute(
        text("SELECT * FROM hm_jobs_to_reconcile(:lease, :grace, :hard)"),
        {"lease": lease_s, "grace": grace_s, "hard": min_hard_limit_s},
    )
    return [Candidate(*r) for r in rows]


@dataclass(frozen=True)
class Held:
    """A running job and the worker process that holds it."""

    org_id: uuid.UUID
    job_id: uuid.UUID
    queue: str
    attempts: int
    worker: str | None


def running_jobs_sync(session: Session) -> list[Held]:
    rows = session.execute(text("SELECT * FROM hm_running_jobs()"))
    return [Held(*r) for r in rows]


# --- worker side (in the job's tenant session, or one statement that binds the organization) -


# The claim after a look at why (see :func:`start_check_sync`), built once: queued → running,
# the winner loaded as its Job. Built per call through the ORM's UPDATE, it took about 0.7 ms
# of the worker's CPU more (its construction, its cache key and the ORM's bulk-update
# bookkeeping) for the same SQL.
_JOBS = cast(Table, Job.__table__)
_START = select(Job).from_statement(
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"), _JOBS.c.status == QUEUED)
    .values(
        status=RUNNING,
        attempts=_JOBS.c.attempts + 1,
        started_at=func.now(),
        heartbeat_at=func.now(),
        stage="starting",
        progress=0.0,
        worker=bindparam("worker"),
    )
    .returning(*_JOBS.c)
)


def start_sync(session: Session, job_id: uuid.UUID, worker: str) -> Job | None:
    """queued → running; the winner gets the job with its new attempt number."""
    job: Job | None = session.execute(
        _START, {"job_id": job_id, "worker": worker}
    ).scalar_one_or_none()
    return job


def start_if_clear_sync(org_id: uuid.UUID, job_id: uuid.UUID, worker: str) -> Job | None:
    """queued → running while nothing holds the job back: its organization is not suspended
    and its deadline (``cancel_after``) has not passed, as :func:`start_check_sync` judges
    them. One statement (``hm_start_job``, which binds the organization itself) in a
    transaction of its own that this process commits once it has the job: a worker that dies
    first, say while the claim waits on the job's row, leaves the job queued for another. No
    session: its bookkeeping cost more than the round trips. None when something holds the
    job back or it is not queued; the caller then asks :func:`start_check_sync` why."""
    ((job,),) = fetch_all_statement_sync(
        "SELECT hm_start_job(%s, %s, %s)", (org_id, job_id, worker), commit_when_read=True
    )
    return None if job is None else from_json(Job, job)


def get_job_sync(session: Session, job_id: uuid.UUID) -> Job | None:
    return session.get(Job, job_id, populate_existing=True)


@dataclass(frozen=True)
class StartCheck:
    """What a worker must know before it starts a job."""

    status: str
    suspended: bool  # the organization is suspended
    past_deadline: bool  # cancel_after has passed (``now()``: the transaction's start)


def start_check_sync(session: Session, job_id: uuid.UUID) -> StartCheck | None:
    """The job's status, its organization's suspension and its deadline, in one round trip
    and without loading the job: the claim that follows returns the job it wins."""
    row = session.execute(
        select(
            Job.status,
            Organization.suspended_at.is_not(None),
            func.coalesce(Job.cancel_after < func.now(), False),
        )
        .join(Organization, Organization.id == Job.organization_id)
        .where(Job.id == job_id)
    ).one_or_none()
    return None if row is None else StartCheck(str(row[0]), bool(row[1]), bool(row[2]))


def heartbeat_sync(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    *,
    stage: str | None = None,
    progress: float | None = None,
) -> bool:
    """Refresh the lease (and progress); False when this attempt no longer owns the job."""
    values: dict[str, Any] = {"heartbeat_at": func.now()}
    if stage is not None:
        values["stage"] = stage
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)
        .values(**values)
        .returning(Job.cancel_requested)
    ).scalar_one_or_none()
    return result is not None


def finish_sync(
    session: Session, job_id: uuid.UUID, attempt: int, status: JobStatus, **values: Any
) -> bool:
    """running → terminal, only for the attempt that owns the job (exactly one completion)."""
    params = {f"set_{name}": value for name, value in values.items()}
    params |= {"job_id": job_id, "attempt": attempt, "status": status.value}
    result = session.execute(_finish_statement(tuple(sorted(values))), params)
    return result.scalar_one_or_none() is not None


class OneStatementEnd(enum.StrEnum):
    """What :func:`succeed_sync` did."""

    SUCCEEDED = "succeeded"  # this attempt ended the job, and settled it
    LOST = "lost"  # this attempt no longer owns the job: nothing changed
    WEBHOOKS = "webhooks"  # endpoints are subscribed to the end: nothing done, see below


def succeed_sync(
    org_id: uuid.UUID,
    job_id: uuid.UUID,
    attempt: int,
    *,
    outputs: list[dict[str, Any]],
    report: dict[str, Any],
    progress: float,
    compute_seconds: float | None,
    gpu_seconds: float | None,
    billed_gpu_seconds: float,
    images: int,
    megapixels: float,
    output_bytes: int,
) -> OneStatementEnd:
    """running → succeeded for the attempt that owns the job, with its settlement
    (``hm_settle_job``), in one statement that is its own transaction
    (``hm_finish_succeeded_job``, which binds the organization itself): one round trip where
    :func:`finish_sync` and the settlement in a session cost six. An organization with a
    webhook endpoint subscribed to the end gets ``WEBHOOKS`` and nothing done: the caller ends
    the job the usual way, which records the deliveries in the same transaction."""
    ((outcome,),) = fetch_all_statement_sync(
        "SELECT hm_finish_succeeded_job(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            org_id,
            job_id,
            attempt,
            Jsonb(outputs),
            Jsonb(report),
            progress,
            compute_seconds,
            gpu_seconds,
            billed_gpu_seconds,
            images,
            megapixels,
            output_bytes,
        ),
    )
    return OneStatementEnd(outcome)


@lru_cache(maxsize=64)
def _finish_statement(columns: tuple[str, ...]) -> Any:
    """:func:`finish_sync`'s UPDATE for one set of further columns, built once (see
    ``_start_statement``); each value is bound with its column's type."""
    unknown = set(columns) - set(_JOBS.c.keys())
    if unknown:
        raise ValueError(f"not columns of jobs: {sorted(unknown)}")
    return (
        update(_JOBS)
        .where(
            _JOBS.c.id == bindparam("job_id"),
            _JOBS.c.status == RUNNING,
            _JOBS.c.attempts == bindparam("attempt"),
        )
        .values(
            status=bindparam("status"),
            finished_at=func.now(),
            stage=None,
            **{name: bindparam(f"set_{name}", type_=_JOBS.c[name].type) for name in columns},
        )
        .returning(_JOBS.c.id)
    )


def expire_sync(session: Session, job_id: uuid.UUID) -> bool:
    """queued → expired when past ``cancel_after``; releases the reservation."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == QUEUED, Job.cancel_after < func.now())
        .values(
            status=JobStatus.EXPIRED.value,
            finished_at=func.now(),
            error_code="expired",
            error_message="The job could not start before its cancel_after deadline.",
        )
        .returning(Job.id)
    )
    if result.scalar_one_or_none() is None:
        return False
    session.execute(delete(JobOutbox).where(JobOutbox.job_id == job_id))
    return True


def fail_running_sync(
    session: Session, job_id: uuid.UUID, attempt: int, code: str, message: str
) -> bool:
    return finish_sync(
        session, job_id, attempt, JobStatus.FAILED, error_code=code, error_message=message
    )


def requeue_running_sync(
    session: Session, job_id: uuid.UUID, attempt: int, *, redeliver: bool = False
) -> bool:
    """running → queued. A lost attempt goes back behind the fair dispatcher (outbox); with
    ``redeliver`` the caller re-sends the same message itself (a retry with backoff), so the
    job stays counted as in flight."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)
        .values(
            status=QUEUED,
            stage=None,
            progress=0.0,
            worker=None,
            dispatched_at=func.now() if redeliver else None,
        )
        .returning(Job.organization_id, Job.queue, Job.created_at)
    ).one_or_none()
    if row is None:
        return False
    if not redeliver:
        # The outbox row carries the job's admission time: it keeps its place in the queue.
        session.execute(
            insert(JobOutbox).values(
                organization_id=row[0], job_id=job_id, queue=row[1], created_at=row[2]
            )
        )
    return True


def redispatch_sync(session: Session, job_id: uuid.UUID, dispatch_count: int | None) -> bool:
    """A dispatched job that has not started goes back in the outbox: its message was lost
    (``dispatch_count`` names the dispatch that was lost), or its worker must not run it now
    (``None``: whatever dispatch delivered it)."""
    same_dispatch = () if dispatch_count is None else (Job.dispatch_count == dispatch_count,)
    row = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == QUEUED,
            *same_dispatch,
            # Not dispatched: already waiting in the outbox.
            Job.dispatched_at.is_not(None),
        )
        .values(dispatched_at=None)
        .returning(Job.organization_id, Job.queue, Job.created_at)
    ).one_or_none()
    if row is None:
        return False
    session.execute(
        insert(JobOutbox).values(
            organization_id=row[0], job_id=job_id, queue=row[1], created_at=row[2]
        )
    )
    return True


def existing_job_ids_sync(session: Session, job_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``job_ids`` are jobs of the session's organization."""
    rows = session.scalars(select(Job.id).where(Job.id.in_(list(job_ids))))
    return set(rows)
