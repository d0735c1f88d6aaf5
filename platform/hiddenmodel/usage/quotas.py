"""Quotas: effective limits (plan, overrides, sub-limits), atomic reservations at submit.

A reservation is a conditional ``UPDATE … WHERE used + reserved + asked <= limit`` on the
subject's counter row, so concurrent submits serialise on that row and exactly as many are
admitted as fit. It is made by ``hm_submit_job`` in the database, in one call with the job's
insert (:func:`admit`). The estimate is settled against the measured cost when the job
finishes (``hm_settle_job``), or released when it fails or never starts.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import DateTime, String, bindparam, select, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.errors import Problem
from hiddenmodel.jobs.models import Job
from hiddenmodel.settings import get_settings
from hiddenmodel.usage import quantities
from hiddenmodel.usage.models import OrgBilling, Plan, QuotaLimit

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


def _refusal(
    subject: SubjectType,
    limit: str,
    value: float,
    used: float,
    reserved: float,
    asked: float,
    period: date | None,
) -> QuotaExceeded:
    amounts = {
        "limit_value": quantities.of_limit(limit, value),
        "used": quantities.of_limit(limit, used),
        "reserved": quantities.of_limit(limit, reserved),
        "requested": quantities.of_limit(limit, asked),
    }
    extra: dict[str, Any] = {"limit": limit, "subject": subject, **amounts}
    headers: dict[str, str] = {}
    if period is not None:
        reset = resets_at(period)
        extra["resets_at"] = reset.isoformat()
        headers["Retry-After"] = str(max(1, int((reset - datetime.now(UTC)).total_seconds())))
    who = {"org": "the organization", "member": "your member", "api_key": "this API key"}
    return QuotaExceeded(
        f"The {limit.replace('_', ' ')} limit of {who[subject]} is "
        f"{quantities.show(amounts['limit_value'])}; {quantities.show(amounts['used'])} used "
        f"and {quantities.show(amounts['reserved'])} reserved leave no room for "
        f"{quantities.show(amounts['requested'])} more.",
        headers=headers,
        **extra,
    )


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


@dataclass(frozen=True)
class Admitted:
    """A job admitted by :func:`admit`, with what its answer needs."""

    created_at: datetime
    queue_position: int
    plan_code: str
    price_per_gpu_second: Decimal
    currency: str


async def admit(
    session: AsyncSession, job: Job, *, gpu_seconds: float, images: int, input_bytes: int
) -> Admitted:
    """Insert ``job`` (queued) with its outbox row and reserve its estimated cost, or refuse.

    One call of ``hm_submit_job`` (migration 0007) in the caller's transaction: effective
    limits (plan, overrides, member and API-key sub-limits), payment state, queue limits,
    the month's GPU-second and image counters of every subject (organization, member, API
    key: the row order ``hm_settle_job`` uses), stored bytes, the reservation. A refusal
    raises :class:`QuotaExceeded` or :class:`PaymentPastDue`; the function's writes are
    undone with it. The reservation is settled when the job finishes (``hm_settle_job``) or
    released when it fails or never starts.
    """
    try:
        row = (
            await session.execute(_SUBMIT, _submit_params(job, gpu_seconds, images, input_bytes))
        ).one()
    except DBAPIError as exc:
        refusal = _refusal_from(exc)
        if refusal is None:
            raise  # not a refusal: an Idempotency-Key taken meanwhile, or a real error
        raise refusal from exc
    return Admitted(
        created_at=row.created_at,
        queue_position=row.queue_position,
        plan_code=row.plan_code,
        price_per_gpu_second=row.price_per_gpu_second,
        currency=row.currency,
    )


def _submit_params(job: Job, gpu_seconds: float, images: int, input_bytes: int) -> dict[str, Any]:
    return {
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
        "grace": get_settings().billing_past_due_grace_days * 86400.0,
    }


@dataclass(frozen=True)
class Demand:
    """One job of a group admitted together, with its estimated cost."""

    job: Job
    gpu_seconds: float
    images: int
    input_bytes: int


async def admit_all(session: AsyncSession, demands: Sequence[Demand]) -> list[Admitted]:
    """Admit every job of ``demands`` or none: :func:`admit` for each, in one savepoint of
    the caller's transaction. A refusal rolls the savepoint back and is reported for the
    whole group: ``requested`` is the group's total and ``used``/``reserved`` are what they
    were before the group, so the numbers say by how much the group does not fit."""
    admitted: list[Admitted] = []
    async with session.begin_nested():
        for done, demand in enumerate(demands):
            try:
                row = (
                    await session.execute(
                        _SUBMIT,
                        _submit_params(
                            demand.job, demand.gpu_seconds, demand.images, demand.input_bytes
                        ),
                    )
                ).one()
            except DBAPIError as exc:
                refusal = _refusal_from(exc, before=demands[:done], group=demands)
                if refusal is None:
                    raise
                raise refusal from exc
            admitted.append(
                Admitted(
                    created_at=row.created_at,
                    queue_position=row.queue_position,
                    plan_code=row.plan_code,
                    price_per_gpu_second=row.price_per_gpu_second,
                    currency=row.currency,
                )
            )
    return admitted


def _group_amount(limit: str, demands: Sequence[Demand]) -> float:
    """How much of ``limit`` the jobs of ``demands`` ask for together."""
    if limit == "monthly_gpu_seconds":
        return float(sum(d.gpu_seconds for d in demands))
    if limit == "monthly_images":
        return float(sum(d.images for d in demands))
    if limit == "storage_bytes":
        return float(sum(d.input_bytes for d in demands))
    return float(len(demands))  # max_queued_jobs: one queued job each


def _refusal_from(
    exc: DBAPIError,
    *,
    before: Sequence[Demand] = (),
    group: Sequence[Demand] | None = None,
) -> Problem | None:
    """The quota or payment problem a refusal from ``hm_submit_job`` stands for, if it is
    one (SQLSTATE HM429 or HM402, details as JSON)."""
    sqlstate = getattr(exc.orig, "sqlstate", None)
    diag = getattr(exc.orig, "diag", None)
    if sqlstate not in ("HM429", "HM402") or diag is None:
        return None
    detail = json.loads(diag.message_detail or "{}")
    if sqlstate == "HM402":
        return PaymentPastDue(
            "A payment failed and the grace period is over: update the payment method in the "
            "billing portal to submit jobs again.",
            past_due_since=datetime.fromisoformat(detail["past_due_since"]).isoformat(),
        )
    period = detail.get("period")
    limit = detail["limit"]
    used, reserved = float(detail["used"]), float(detail["reserved"])
    requested = float(detail["requested"])
    if group is not None:
        # The refused job's numbers include the group's jobs admitted before it.
        earlier = _group_amount(limit, before)
        if limit in ("monthly_gpu_seconds", "monthly_images"):
            reserved -= earlier
        else:
            used -= earlier
        requested = _group_amount(limit, group)
    return _refusal(
        detail["subject"],
        limit,
        float(detail["limit_value"]),
        used,
        reserved,
        requested,
        date.fromisoformat(period) if period else None,
    )
