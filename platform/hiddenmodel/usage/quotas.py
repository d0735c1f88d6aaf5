"""Quotas: effective limits (plan, overrides, sub-limits), atomic reservations at submit.

A reservation is a conditional ``UPDATE … WHERE used + reserved + asked <= limit`` on the
subject's counter row, so concurrent submits serialise on that row and exactly as many are
admitted as fit. The estimate is settled against the measured cost when the job finishes
(``hm_settle_job``), or released when it fails or never starts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import func, select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.errors import Problem
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.settings import get_settings
from hiddenmodel.usage.models import OrgBilling, Plan, QuotaCounter, QuotaLimit, QuotaReservation

LIFETIME = date(1970, 1, 1)
ORG_LIMITS = (
    "monthly_gpu_seconds",
    "monthly_images",
    "max_running_jobs",
    "max_queued_jobs",
    "storage_bytes",
    "requests_per_minute",
    "org_requests_per_minute",
)
SUB_LIMITS = ("monthly_gpu_seconds", "monthly_images", "max_queued_jobs", "requests_per_minute")
SubjectType = str  # "org" | "member" | "api_key"


def period_of(now: datetime) -> date:
    return date(now.year, now.month, 1)


def resets_at(period: date) -> datetime:
    year, month = (period.year + 1, 1) if period.month == 12 else (period.year, period.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


class QuotaExceeded(Problem):
    status, kind, title = 429, "quota-exceeded", "Quota exceeded"


class PaymentPastDue(Problem):
    status, kind, title = 402, "payment-past-due", "Payment past due"


@dataclass(frozen=True)
class OrgPlan:
    plan: Plan
    billing: OrgBilling | None
    limits: dict[str, float | None]


async def org_plan(session: AsyncSession) -> OrgPlan:
    """The bound organization's plan and its effective org-level limits."""
    billing = (await session.scalars(select(OrgBilling))).one_or_none()
    if billing is not None:
        plan = await session.get(Plan, billing.plan_id)
    else:
        plan = (await session.scalars(select(Plan).where(Plan.is_default))).one_or_none()
    if plan is None:
        raise RuntimeError("no default plan is configured")
    overrides = billing.overrides if billing else {}
    limits = {name: overrides.get(name, getattr(plan, name)) for name in ORG_LIMITS}
    return OrgPlan(plan=plan, billing=billing, limits=limits)


async def sub_limits(
    session: AsyncSession, subject_type: SubjectType, subject_id: uuid.UUID | None
) -> dict[str, float | None]:
    if subject_id is None:
        return {}
    row = (
        await session.scalars(
            select(QuotaLimit).where(
                QuotaLimit.subject_type == subject_type, QuotaLimit.subject_id == subject_id
            )
        )
    ).one_or_none()
    return dict(row.limits) if row else {}


def ensure_not_past_due(billing: OrgBilling | None, now: datetime) -> None:
    if billing is None or billing.past_due_since is None:
        return
    grace = get_settings().billing_past_due_grace_days
    if (now - billing.past_due_since).total_seconds() > grace * 86400:
        raise PaymentPastDue(
            "A payment failed and the grace period is over: update the payment method in the "
            "billing portal to submit jobs again.",
            past_due_since=billing.past_due_since.isoformat(),
        )


@dataclass(frozen=True)
class Subject:
    type: SubjectType
    id: uuid.UUID
    limits: dict[str, float | None]


async def _subjects(
    session: AsyncSession,
    org: OrgPlan,
    org_id: uuid.UUID,
    user_id: uuid.UUID | None,
    key_id: uuid.UUID | None,
) -> list[Subject]:
    """The organization, then the member, then the API key: also the order their counter
    rows are locked in, here and when a job settles (``hm_settle_job``)."""
    wanted = [(t, i) for t, i in (("member", user_id), ("api_key", key_id)) if i is not None]
    found: dict[tuple[str, uuid.UUID], dict[str, Any]] = {}
    if wanted:
        rows = await session.scalars(
            select(QuotaLimit).where(
                tuple_(QuotaLimit.subject_type, QuotaLimit.subject_id).in_(wanted)
            )
        )
        found = {(r.subject_type, r.subject_id): dict(r.limits) for r in rows}
    subjects = [Subject("org", org_id, org.limits)]
    subjects += [Subject(t, i, found.get((t, i), {})) for t, i in wanted if i is not None]
    return subjects


async def _counter(session: AsyncSession, subject: Subject, period: date) -> QuotaCounter | None:
    return (
        await session.scalars(
            select(QuotaCounter).where(
                QuotaCounter.subject_type == subject.type,
                QuotaCounter.subject_id == subject.id,
                QuotaCounter.period == period,
            )
        )
    ).one_or_none()


def _refusal(
    subject: Subject,
    limit: str,
    value: float,
    used: float,
    reserved: float,
    asked: float,
    period: date | None,
) -> QuotaExceeded:
    extra: dict[str, Any] = {
        "limit": limit,
        "subject": subject.type,
        "limit_value": value,
        "used": used,
        "reserved": reserved,
        "requested": asked,
    }
    headers: dict[str, str] = {}
    if period is not None:
        reset = resets_at(period)
        extra["resets_at"] = reset.isoformat()
        headers["Retry-After"] = str(max(1, int((reset - datetime.now(UTC)).total_seconds())))
    who = {"org": "the organization", "member": "your member", "api_key": "this API key"}
    return QuotaExceeded(
        f"The {limit.replace('_', ' ')} limit of {who[subject.type]} is {value:g}; "
        f"{used:g} used and {reserved:g} reserved leave no room for {asked:g} more.",
        headers=headers,
        **extra,
    )


@dataclass(frozen=True)
class Admission:
    """What :func:`check` read, handed to :func:`reserve` so it is not read twice."""

    org: OrgPlan
    subjects: list[Subject]
    period: date


async def check(
    session: AsyncSession,
    *,
    org_id: uuid.UUID,
    user_id: uuid.UUID | None,
    key_id: uuid.UUID | None,
    gpu_seconds: float,
    images: int,
    input_bytes: int,
    now: datetime,
) -> Admission:
    """A read-only look before uploading anything: refuse what certainly does not fit.
    The binding decision is :func:`reserve`'s, inside the submit transaction."""
    org = await org_plan(session)
    ensure_not_past_due(org.billing, now)
    period = period_of(now)
    subjects = await _subjects(session, org, org_id, user_id, key_id)
    rows = await session.scalars(
        select(QuotaCounter).where(
            QuotaCounter.period == period,
            tuple_(QuotaCounter.subject_type, QuotaCounter.subject_id).in_(
                [(s.type, s.id) for s in subjects]
            ),
        )
    )
    counters = {(c.subject_type, c.subject_id): c for c in rows}
    for subject in subjects:
        counter = counters.get((subject.type, subject.id))
        for limit, asked, used, reserved in (
            (
                "monthly_gpu_seconds",
                gpu_seconds,
                counter.gpu_seconds_used if counter else 0.0,
                counter.gpu_seconds_reserved if counter else 0.0,
            ),
            (
                "monthly_images",
                images,
                counter.images_used if counter else 0,
                counter.images_reserved if counter else 0,
            ),
        ):
            value = subject.limits.get(limit)
            if value is not None and used + reserved + asked > value:
                raise _refusal(subject, limit, value, used, reserved, asked, period)
    return Admission(org=org, subjects=subjects, period=period)


_ENSURE_COUNTERS = text(
    "INSERT INTO quota_counters (organization_id, subject_type, subject_id, period) "
    "VALUES (:org, :type, :id, :period) ON CONFLICT DO NOTHING"
)
_RESERVE = text(
    "UPDATE quota_counters SET gpu_seconds_reserved = gpu_seconds_reserved + :gpu, "
    "images_reserved = images_reserved + :images "
    "WHERE subject_type = :type AND subject_id = :id AND period = :period "
    "AND (CAST(:gpu_limit AS double precision) IS NULL "
    "     OR gpu_seconds_used + gpu_seconds_reserved + :gpu <= :gpu_limit) "
    "AND (CAST(:image_limit AS double precision) IS NULL "
    "     OR images_used + images_reserved + :images <= :image_limit) "
    "RETURNING 1"
)
_STORE = text(
    "UPDATE quota_counters SET bytes_used = bytes_used + :bytes "
    "WHERE subject_type = 'org' AND subject_id = :id AND period = :period "
    "AND (CAST(:limit AS bigint) IS NULL OR bytes_used + :bytes <= :limit) RETURNING 1"
)


async def reserve(
    session: AsyncSession,
    job: Job,
    admission: Admission,
    *,
    gpu_seconds: float,
    images: int,
    input_bytes: int,
) -> None:
    """Reserve the job's estimated cost for every subject it counts against, or refuse.

    Runs in the submit transaction after the job row is flushed; a refusal propagates and the
    caller rolls everything back.
    """
    org, subjects, period = admission.org, admission.subjects, admission.period
    await session.execute(
        _ENSURE_COUNTERS,
        [
            {"org": job.organization_id, "type": s.type, "id": s.id, "period": p}
            for s in subjects
            for p in ((period, LIFETIME) if s.type == "org" else (period,))
        ],
    )
    for subject in subjects:
        admitted = await session.execute(
            _RESERVE,
            {
                "gpu": gpu_seconds,
                "images": images,
                "type": subject.type,
                "id": subject.id,
                "period": period,
                "gpu_limit": subject.limits.get("monthly_gpu_seconds"),
                "image_limit": subject.limits.get("monthly_images"),
            },
        )
        if admitted.scalar_one_or_none() is None:
            counter = await _counter(session, subject, period)
            assert counter is not None
            if (limit := subject.limits.get("monthly_gpu_seconds")) is not None and (
                counter.gpu_seconds_used + counter.gpu_seconds_reserved + gpu_seconds > limit
            ):
                raise _refusal(
                    subject,
                    "monthly_gpu_seconds",
                    limit,
                    counter.gpu_seconds_used,
                    counter.gpu_seconds_reserved,
                    gpu_seconds,
                    period,
                )
            raise _refusal(
                subject,
                "monthly_images",
                subject.limits["monthly_images"] or 0,
                counter.images_used,
                counter.images_reserved,
                images,
                period,
            )
        queued_limit = subject.limits.get("max_queued_jobs")
        if queued_limit is not None:
            queued = await _queued(session, subject)
            if queued > queued_limit:
                raise _refusal(subject, "max_queued_jobs", queued_limit, queued - 1, 0, 1, None)
    stored = await session.execute(
        _STORE,
        {
            "bytes": input_bytes,
            "id": job.organization_id,
            "period": LIFETIME,
            "limit": org.limits.get("storage_bytes"),
        },
    )
    if stored.scalar_one_or_none() is None:
        used = await session.scalar(
            select(QuotaCounter.bytes_used).where(
                QuotaCounter.subject_type == "org", QuotaCounter.period == LIFETIME
            )
        )
        raise _refusal(
            subjects[0],
            "storage_bytes",
            org.limits["storage_bytes"] or 0,
            float(used or 0),
            0,
            input_bytes,
            None,
        )
    session.add(
        QuotaReservation(
            organization_id=job.organization_id,
            job_id=job.id,
            period=period,
            user_id=job.user_id,
            api_key_id=job.api_key_id,
            gpu_seconds=gpu_seconds,
            images=images,
            status="held",
        )
    )
    await session.flush()


async def _queued(session: AsyncSession, subject: Subject) -> int:
    stmt = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)
    if subject.type == "member":
        stmt = stmt.where(Job.user_id == subject.id)
    elif subject.type == "api_key":
        stmt = stmt.where(Job.api_key_id == subject.id)
    return int(await session.scalar(stmt) or 0)
