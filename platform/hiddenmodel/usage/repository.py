"""SQL of usage: plans and limits, admission, settlement, counters and report sums.

Admission and settlement are SQL functions (``hm_submit_job``, ``hm_settle_job``) so that the
limits, counters, reservation and job rows change in one statement; this module only calls
them. Report sums read ``usage_daily``: the usage events rolled up per organization, UTC day,
operation, member and API key in the transaction that writes each event (migration 0018), so a
month's report reads at most a few thousand rows whatever the number of jobs. The session
decides what is visible: a tenant session (RLS) sees its own organization, the operator's ops
session sees them all, so the same queries serve tenants and operators.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    DateTime,
    Row,
    Select,
    String,
    bindparam,
    func,
    literal,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.usage.models import Plan, QuotaCounter, QuotaLimit, UsageDaily
from hiddenmodel.usage.periods import Period
from hiddenmodel.usage.schemas import Dimension
from tenants.models import ApiKey, Organization, User

# --- plans and limits ----------------------------------------------------------------------


# The organizations' limits by the rule's one statement (migration 0020), with their plans' codes.
_EFFECTIVE_LIMITS = text(
    "SELECT o.id AS organization_id, p.code AS plan_code, l.* "
    "FROM unnest(CAST(:orgs AS uuid[])) AS o(id) "
    "CROSS JOIN LATERAL hm_effective_limits(o.id) AS l "
    "LEFT JOIN plans p ON p.id = l.plan_id"
)
_NOT_LIMITS = ("organization_id", "plan_code", "plan_id")


@dataclass(frozen=True)
class EffectiveLimits:
    """An organization's limits and the plan they come from (``plan_id`` None: the
    organization has no plan and no plan is the default)."""

    plan_id: uuid.UUID | None
    plan_code: str | None
    limits: dict[str, float | None]


async def effective_limits(
    session: AsyncSession, org_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, EffectiveLimits]:
    """The effective limits of each organization of ``org_ids`` the session can see (RLS: a
    tenant session, its own), from ``hm_effective_limits``, the function admission and the
    dispatcher read: the plan's (the organization's, else the default plan's), each replaced
    by the organization's override when present, even null (unlimited)."""
    if not org_ids:
        return {}
    rows = (await session.execute(_EFFECTIVE_LIMITS, {"orgs": list(org_ids)})).mappings()
    return {
        row["organization_id"]: EffectiveLimits(
            plan_id=row["plan_id"],
            plan_code=row["plan_code"],
            limits={name: value for name, value in row.items() if name not in _NOT_LIMITS},
        )
        for row in rows
    }


async def get_plan(session: AsyncSession, plan_id: uuid.UUID) -> Plan | None:
    return await session.get(Plan, plan_id)


async def get_quota_limit(
    session: AsyncSession, subject_type: str, subject_id: uuid.UUID
) -> QuotaLimit | None:
    """The sub-limits row of one member or one API key of the bound organization."""
    return (
        await session.scalars(
            select(QuotaLimit).where(
                QuotaLimit.subject_type == subject_type, QuotaLimit.subject_id == subject_id
            )
        )
    ).one_or_none()


async def get_counter(
    session: AsyncSession, subject_type: str, subject_id: uuid.UUID, period: date
) -> QuotaCounter | None:
    """One subject's quota counter of one period (absent: nothing used or reserved)."""
    return (
        await session.scalars(
            select(QuotaCounter).where(
                QuotaCounter.subject_type == subject_type,
                QuotaCounter.subject_id == subject_id,
                QuotaCounter.period == period,
            )
        )
    ).one_or_none()


async def count_queued(session: AsyncSession, subject_type: str, subject_id: uuid.UUID) -> int:
    """Queued jobs of the organization, or of one of its API keys or members."""
    queued = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)
    if subject_type == "api_key":
        queued = queued.where(Job.api_key_id == subject_id)
    elif subject_type == "member":
        queued = queued.where(Job.user_id == subject_id)
    return int(await session.scalar(queued) or 0)


async def count_running(session: AsyncSession) -> int:
    """Running jobs of the bound organization."""
    running = await session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING.value)
    )
    return int(running or 0)


# --- admission -----------------------------------------------------------------------------

_SUBMIT = text(
    "SELECT * FROM hm_submit_job(:job, :org, :api_key, :user, :operation, :version, :queue, "
    ":params, :inputs, :idempotency_key, :request_hash, :cancel_after, "
    "CAST(:gpu AS double precision), CAST(:images AS integer), CAST(:input_bytes AS bigint), "
    "CAST(:grace AS double precision))"
).bindparams(
    bindparam("params", type_=JSONB),
    bindparam("inputs", type_=JSONB),
    bindparam("operation", type_=String),
    bindparam("version", type_=String),
    bindparam("queue", type_=String),
    bindparam("idempotency_key", type_=String),
    bindparam("request_hash", type_=String),
    bindparam("cancel_after", type_=DateTime(timezone=True)),
)


async def submit_job(
    session: AsyncSession,
    job: Job,
    *,
    gpu_seconds: float,
    images: int,
    input_bytes: int,
    grace_seconds: float,
) -> Row[Any]:
    """Run ``hm_submit_job`` (migration 0007) for ``job``: its row (``created_at``,
    ``queue_position``, ``plan_code``, ``price_per_gpu_second``, ``currency``), or the
    function's refusal as a ``DBAPIError`` with SQLSTATE HM429 or HM402."""
    params = {
        "job": job.id,
        "org": job.organization_id,
        "api_key": job.api_key_id,
        "user": job.user_id,
        "operation": job.operation,
        "version": job.operation_version,
        "queue": job.queue,
        "params": job.params,
        "inputs": job.inputs,
        "idempotency_key": job.idempotency_key,
        "request_hash": job.request_hash,
        "cancel_after": job.cancel_after,
        "gpu": gpu_seconds,
        "images": images,
        "input_bytes": input_bytes,
        "grace": grace_seconds,
    }
    return (await session.execute(_SUBMIT, params)).one()


# --- settlement ----------------------------------------------------------------------------

_SETTLE = text("SELECT hm_settle_job(:job, :outcome, :gpu, :images, :mp, :bytes)")


def settle_sync(
    session: Session,
    job_id: uuid.UUID,
    outcome: str,
    *,
    gpu_seconds: float = 0.0,
    images: int = 0,
    megapixels: float = 0.0,
    output_bytes: int = 0,
) -> bool:
    """Settle or release the job's reservation and write its usage event when billable.

    Billing policy: succeeded jobs are billed their measured GPU-seconds and images; jobs
    canceled while running are billed the GPU-seconds they used; failed, expired and jobs
    canceled before they started are not billed.
    """
    params = {
        "job": job_id,
        "outcome": outcome,
        "gpu": gpu_seconds,
        "images": images,
        "mp": megapixels,
        "bytes": output_bytes,
    }
    return bool(session.execute(_SETTLE, params).scalar())


# --- report sums ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Sums:
    """Usage summed over some rows of ``usage_daily``, exact."""

    jobs: int
    gpu_seconds: Decimal
    images: int
    megapixels: Decimal

    @classmethod
    def of(cls, row: Any) -> Sums:
        return cls(
            jobs=row.jobs,
            gpu_seconds=Decimal(row.gpu_seconds),
            images=row.images,
            megapixels=Decimal(row.megapixels),
        )


@dataclass(frozen=True)
class GroupSums:
    """One group of a report: its key (None: no member or no API key), the label the
    database has for it (None: none, or deleted), and its sums."""

    key: Any
    label: str | None
    sums: Sums


def _sums() -> tuple[Any, ...]:
    # The roll-up's sums are numeric sums of the events' values: exact, in any order.
    return (
        func.coalesce(func.sum(UsageDaily.jobs), 0).label("jobs"),
        func.coalesce(func.sum(UsageDaily.gpu_seconds), 0).label("gpu_seconds"),
        func.coalesce(func.sum(UsageDaily.images), 0).label("images"),
        func.coalesce(func.sum(UsageDaily.megapixels), 0).label("megapixels"),
    )


def _in_period(stmt: Select[Any], period: Period) -> Select[Any]:
    # Periods are whole UTC days, the roll-up's unit: a range of uq_usage_daily_group.
    return stmt.where(UsageDaily.day >= period.start, UsageDaily.day <= period.end)


def _grouped(dimension: Dimension) -> Select[Any]:
    if dimension == "day":
        day = UsageDaily.day
        return (
            select(day.label("key"), literal(None).label("label"), *_sums())
            .group_by(day)
            .order_by(day)
        )
    if dimension == "operation":
        return (
            select(UsageDaily.operation.label("key"), literal(None).label("label"), *_sums())
            .group_by(UsageDaily.operation)
            .order_by(*_largest_first(UsageDaily.operation))
        )
    if dimension == "member":
        users = User.__table__.c
        email = users.email
        return (
            select(UsageDaily.user_id.label("key"), email.label("label"), *_sums())
            .outerjoin(User, users.id == UsageDaily.user_id)
            .group_by(UsageDaily.user_id, email)
            .order_by(*_largest_first(email))
        )
    if dimension == "api_key":
        name = ApiKey.name + " (" + ApiKey.prefix + ")"
        return (
            select(UsageDaily.api_key_id.label("key"), name.label("label"), *_sums())
            .outerjoin(ApiKey, ApiKey.id == UsageDaily.api_key_id)
            .group_by(UsageDaily.api_key_id, ApiKey.name, ApiKey.prefix)
            .order_by(*_largest_first(ApiKey.name))
        )
    return (
        select(UsageDaily.organization_id.label("key"), Organization.slug.label("label"), *_sums())
        .outerjoin(Organization, Organization.id == UsageDaily.organization_id)
        .group_by(UsageDaily.organization_id, Organization.slug)
        .order_by(*_largest_first(Organization.slug))
    )


def _largest_first(tiebreak: Any) -> tuple[Any, ...]:
    return (
        func.sum(UsageDaily.gpu_seconds).desc(),
        func.sum(UsageDaily.jobs).desc(),
        tiebreak.asc().nulls_last(),
    )


async def grouped_sums(
    session: AsyncSession, dimension: Dimension, period: Period
) -> list[GroupSums]:
    """One group per key with usage in ``period`` (groups without usage are left out), days
    in order, other groups largest first."""
    result = await session.execute(_in_period(_grouped(dimension), period))
    return [GroupSums(key=row.key, label=row.label, sums=Sums.of(row)) for row in result]


async def usage_sums(session: AsyncSession, period: Period) -> Sums:
    """Totals of every visible usage event in ``period``."""
    return Sums.of((await session.execute(_in_period(select(*_sums()), period))).one())


async def usage_sums_by_org(
    session: AsyncSession, org_ids: Sequence[uuid.UUID], period: Period
) -> dict[uuid.UUID, Sums]:
    """Totals per organization, for the ids given (operators' listings)."""
    if not org_ids:
        return {}
    stmt = (
        select(UsageDaily.organization_id, *_sums())
        .where(UsageDaily.organization_id.in_(org_ids))
        .group_by(UsageDaily.organization_id)
    )
    result = await session.execute(_in_period(stmt, period))
    return {row.organization_id: Sums.of(row) for row in result}
