"""Rules of usage: effective limits, admission decisions, sub-limits, reports and pricing.

Limits: an organization's are its plan's, each replaced by an override when one is present
(even null: unlimited), a rule stated once, in the SQL function ``hm_effective_limits`` that
admission, the dispatcher, this module and the operator API all read; a member or an API key
may be capped at or below them (sub-limits).

Admission: a reservation is a conditional ``UPDATE … WHERE used + reserved + asked <= limit``
on the subject's counter row, so concurrent submits serialise on that row and exactly as many
are admitted as fit. It is made by ``hm_submit_job`` in the database, in one call with the
job's insert (:func:`admit`); this module turns the function's refusals into problems. The
estimate is settled against the measured cost when the job finishes (``hm_settle_job``), or
released when it fails or never starts.

Reports: every number is summed in SQL over ``usage_daily`` (see
:mod:`hiddenmodel.usage.repository`); GPU-seconds and megapixels are summed as ``numeric`` so
totals are exact decimals of the stored values, whatever the number or order of the events.
Statements price the GPU-seconds beyond the plan's included amount.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.errors import NotFound, Problem
from hiddenmodel.jobs.models import Job
from hiddenmodel.settings import get_settings
from hiddenmodel.usage import periods, quantities, repository
from hiddenmodel.usage.models import Plan, QuotaLimit
from hiddenmodel.usage.periods import Period
from hiddenmodel.usage.quantities import GPU_SECONDS_QUANTUM, exact
from hiddenmodel.usage.repository import EffectiveLimits, Sums
from hiddenmodel.usage.schemas import (
    Dimension,
    LimitRead,
    LimitsRead,
    Statement,
    StatementCharges,
    StatementPlan,
    SubLimits,
    SubLimitsRead,
    UsageReport,
    UsageRow,
    UsageTotals,
)
from tenants import repository as tenants_repository
from tenants.auth import OrgScope
from tenants.service import audit

# The organization limits: the columns of hm_effective_limits, a plan's limits, what an
# operator may override.
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

# Labels of rows whose subject is absent: a job submitted with an API key has no member, one
# submitted by a signed-in member has no key; the user or key may also have been deleted.
NO_MEMBER = "(no member: an API key made by an operator)"
NO_API_KEY = "(submitted by a signed-in member)"
DELETED = "(deleted)"

# Stripe's zero-decimal currencies: amounts are whole units.
_ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }
)


class QuotaExceeded(Problem):
    status, kind, title = 429, "quota-exceeded", "Quota exceeded"


class PaymentPastDue(Problem):
    status, kind, title = 402, "payment-past-due", "Payment past due"


class SubLimitAbovePlan(Problem):
    status, kind, title = 422, "sub-limit-above-plan", "Sub-limit above the organization's limit"


# --- effective limits ----------------------------------------------------------------------


@dataclass(frozen=True)
class OrgPlan:
    plan: Plan
    limits: dict[str, float | None]


async def effective_limits(
    session: AsyncSession, org_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, EffectiveLimits]:
    """The effective limits of the organizations the session can see, and their plans."""
    return await repository.effective_limits(session, org_ids)


async def org_plan(session: AsyncSession, org_id: uuid.UUID) -> OrgPlan:
    """The organization's plan and its effective org-level limits (``hm_effective_limits``)."""
    effective = (await repository.effective_limits(session, [org_id])).get(org_id)
    if effective is None:
        raise NotFound("No such organization.")
    plan = (
        None if effective.plan_id is None else await repository.get_plan(session, effective.plan_id)
    )
    if plan is None:
        raise RuntimeError("no default plan is configured")
    return OrgPlan(plan=plan, limits=effective.limits)


async def sub_limits(
    session: AsyncSession, subject_type: SubjectType, subject_id: uuid.UUID | None
) -> dict[str, float | None]:
    """The caps set on one member or one API key (none: an empty dictionary)."""
    if subject_id is None:
        return {}
    row = await repository.get_quota_limit(session, subject_type, subject_id)
    return dict(row.limits) if row else {}


# --- admission -----------------------------------------------------------------------------


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
        reset = periods.resets_at(period)
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


@dataclass(frozen=True)
class Admitted:
    """A job admitted by :func:`admit`, with what its answer needs."""

    created_at: datetime
    queue_position: int
    plan_code: str
    price_per_gpu_second: Decimal
    currency: str

    @classmethod
    def of(cls, row: Any) -> Admitted:
        return cls(
            created_at=row.created_at,
            queue_position=row.queue_position,
            plan_code=row.plan_code,
            price_per_gpu_second=row.price_per_gpu_second,
            currency=row.currency,
        )


async def _submit(
    session: AsyncSession, job: Job, gpu_seconds: float, images: int, input_bytes: int
) -> Admitted:
    row = await repository.submit_job(
        session,
        job,
        gpu_seconds=gpu_seconds,
        images=images,
        input_bytes=input_bytes,
        grace_seconds=get_settings().billing_past_due_grace_days * 86400.0,
    )
    return Admitted.of(row)


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
        return await _submit(session, job, gpu_seconds, images, input_bytes)
    except DBAPIError as exc:
        refusal = _refusal_from(exc)
        if refusal is None:
            raise  # not a refusal: an Idempotency-Key taken meanwhile, or a real error
        raise refusal from exc


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
                admitted.append(
                    await _submit(
                        session, demand.job, demand.gpu_seconds, demand.images, demand.input_bytes
                    )
                )
            except DBAPIError as exc:
                refusal = _refusal_from(exc, before=demands[:done], group=demands)
                if refusal is None:
                    raise
                raise refusal from exc
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


# --- the limits view -----------------------------------------------------------------------


def _row(
    name: str,
    subject: str,
    limit: float | None,
    used: float,
    reserved: float,
    resets: datetime | None,
) -> LimitRead:
    # LimitRead rounds the amounts and works out what remains.
    return LimitRead(
        name=name,
        subject=subject,
        limit=limit,
        used=used,
        reserved=reserved,
        remaining=None,
        resets_at=resets,
    )


async def limits_view(scope: OrgScope) -> LimitsRead:
    """Every limit that applies to the caller, with used, reserved and remaining."""
    now = datetime.now(UTC)
    period = periods.period_of(now)
    resets = periods.resets_at(period)
    session = scope.session
    org = await org_plan(session, scope.org_id)
    rows: list[LimitRead] = []
    subjects: list[tuple[str, uuid.UUID, dict[str, Any]]] = [("org", scope.org_id, org.limits)]
    if scope.principal.api_key_id is not None:
        subjects.append(
            (
                "api_key",
                scope.principal.api_key_id,
                await sub_limits(session, "api_key", scope.principal.api_key_id),
            )
        )
    if scope.principal.member_id is not None:
        subjects.append(
            (
                "member",
                scope.principal.member_id,
                await sub_limits(session, "member", scope.principal.member_id),
            )
        )
    for subject, subject_id, limits in subjects:
        counter = await repository.get_counter(session, subject, subject_id, period)
        rows.append(
            _row(
                "monthly_gpu_seconds",
                subject,
                limits.get("monthly_gpu_seconds"),
                counter.gpu_seconds_used if counter else 0.0,
                counter.gpu_seconds_reserved if counter else 0.0,
                resets,
            )
        )
        rows.append(
            _row(
                "monthly_images",
                subject,
                limits.get("monthly_images"),
                counter.images_used if counter else 0,
                counter.images_reserved if counter else 0,
                resets,
            )
        )
        rows.append(
            _row(
                "max_queued_jobs",
                subject,
                limits.get("max_queued_jobs"),
                float(await repository.count_queued(session, subject, subject_id)),
                0.0,
                None,
            )
        )
    rows.append(
        _row(
            "max_running_jobs",
            "org",
            org.limits.get("max_running_jobs"),
            float(await repository.count_running(session)),
            0.0,
            None,
        )
    )
    lifetime = await repository.get_counter(session, "org", scope.org_id, periods.LIFETIME)
    rows.append(
        _row(
            "storage_bytes",
            "org",
            org.limits.get("storage_bytes"),
            float(lifetime.bytes_used if lifetime else 0),
            0.0,
            None,
        )
    )
    return LimitsRead(plan=org.plan.code, period_start=periods.period_start(period), limits=rows)


# --- sub-limits ----------------------------------------------------------------------------


async def _require_subject(scope: OrgScope, subject_type: str, subject_id: uuid.UUID) -> None:
    if subject_type == "member":
        exists = await tenants_repository.get_membership(scope.session, subject_id) is not None
    else:
        exists = await tenants_repository.get_api_key(scope.session, subject_id) is not None
    if not exists:
        raise NotFound(f"No such {subject_type.replace('_', ' ')} in this organization.")


async def _require_within_org(scope: OrgScope, values: dict[str, Any]) -> None:
    """Refuse caps above the organization's effective limits (plan and overrides); a limit
    the organization does not have (unlimited) takes any cap."""
    org = await org_plan(scope.session, scope.org_id)
    exceeded = [
        {"limit": name, "value": value, "organization_limit": org_value}
        for name, value in values.items()
        if (org_value := org.limits.get(name)) is not None and value > org_value
    ]
    if not exceeded:
        return
    for item in exceeded:
        for field in ("value", "organization_limit"):
            item[field] = quantities.of_limit(item["limit"], item[field])
    first = exceeded[0]
    raise SubLimitAbovePlan(
        "; ".join(
            f"{e['limit']} {quantities.show(e['value'])} is above the organization's limit "
            f"of {quantities.show(e['organization_limit'])}"
            for e in exceeded
        )
        + ": a cap can only be equal to or below it.",
        limit=first["limit"],
        value=first["value"],
        organization_limit=first["organization_limit"],
        exceeded=exceeded,
    )


async def set_sub_limits(
    scope: OrgScope, subject_type: str, subject_id: uuid.UUID, limits: SubLimits
) -> SubLimitsRead:
    await _require_subject(scope, subject_type, subject_id)
    values = limits.model_dump(exclude_none=True)
    await _require_within_org(scope, values)
    row = await repository.get_quota_limit(scope.session, subject_type, subject_id)
    if row is None:
        row = QuotaLimit(
            organization_id=scope.org_id,
            subject_type=subject_type,
            subject_id=subject_id,
            limits=values,
        )
        scope.session.add(row)
    else:
        row.limits = values
        row.updated_at = datetime.now(UTC)
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "quota.sub_limits_set",
        subject_type,
        subject_id,
        limits=values,
    )
    await scope.session.flush()
    return SubLimitsRead(subject_type=subject_type, subject_id=subject_id, **values)


async def get_sub_limits(
    scope: OrgScope, subject_type: str, subject_id: uuid.UUID
) -> SubLimitsRead:
    await _require_subject(scope, subject_type, subject_id)
    values = await sub_limits(scope.session, subject_type, subject_id)
    return SubLimitsRead(subject_type=subject_type, subject_id=subject_id, **values)


# --- reports -------------------------------------------------------------------------------


def totals(sums: Sums) -> UsageTotals:
    """The answer's totals of ``sums`` (rounded by :class:`UsageTotals`)."""
    return UsageTotals(
        jobs=sums.jobs,
        gpu_seconds=float(sums.gpu_seconds),
        images=sums.images,
        megapixels=float(sums.megapixels),
    )


def _label(dimension: Dimension, key: Any, label: str | None) -> str:
    if dimension in ("day", "operation"):
        return str(key)
    if label is not None:
        return label
    if key is None:
        return NO_MEMBER if dimension == "member" else NO_API_KEY
    return DELETED


async def grouped_usage(
    session: AsyncSession, dimension: Dimension, period: Period
) -> list[UsageRow]:
    """One row per group with usage in ``period`` (groups without usage are left out)."""
    return [
        UsageRow(
            key=None if group.key is None else str(group.key),
            label=_label(dimension, group.key, group.label),
            jobs=group.sums.jobs,
            gpu_seconds=float(group.sums.gpu_seconds),
            images=group.sums.images,
            megapixels=float(group.sums.megapixels),
        )
        for group in await repository.grouped_sums(session, dimension, period)
    ]


async def usage_report(session: AsyncSession, group_by: Dimension, period: Period) -> UsageReport:
    """Usage in ``period`` grouped by ``group_by``, with totals, as the session may see it.

    The session decides what is visible: a tenant session (RLS) sees its own organization,
    the operator's ops session sees them all."""
    rows = await grouped_usage(session, group_by, period)
    sums = await repository.usage_sums(session, period)
    return UsageReport(
        group_by=group_by, from_=period.start, to=period.end, rows=rows, totals=totals(sums)
    )


async def usage_sums_by_org(
    session: AsyncSession, org_ids: Sequence[uuid.UUID], period: Period
) -> dict[uuid.UUID, Sums]:
    """Totals per organization, for the ids given (operators' listings)."""
    return await repository.usage_sums_by_org(session, org_ids, period)


# --- statements and pricing ----------------------------------------------------------------


def _minor_unit(currency: str) -> Decimal:
    return Decimal(1) if currency.lower() in _ZERO_DECIMAL_CURRENCIES else Decimal("0.01")


def charges(sums: Sums, plan: StatementPlan) -> StatementCharges:
    """GPU-seconds beyond the plan's included amount, priced; GPU-seconds are rounded half
    up to the millisecond (the unit the meter counts), the charge to the currency's minor unit
    once, at the end."""
    gpu_seconds = sums.gpu_seconds.quantize(GPU_SECONDS_QUANTUM, ROUND_HALF_UP)
    billable = max(Decimal(0), gpu_seconds - plan.included_gpu_seconds)
    amount = (billable * plan.price_per_gpu_second).quantize(
        _minor_unit(plan.currency), ROUND_HALF_UP
    )
    return StatementCharges(
        gpu_seconds=gpu_seconds,
        included_gpu_seconds=plan.included_gpu_seconds,
        billable_gpu_seconds=billable,
        price_per_gpu_second=plan.price_per_gpu_second,
        images=sums.images,
        included_images=plan.included_images,
        images_beyond_included=max(0, sums.images - plan.included_images),
        estimated_charge=amount,
        currency=plan.currency,
    )


async def statement(
    session: AsyncSession, org_id: uuid.UUID, period: Period, *, now: datetime
) -> Statement:
    """The month's statement of the bound organization, priced on its current plan.

    Plans keep no history, so a past month is estimated at today's plan and price.
    """
    current = await org_plan(session, org_id)
    plan = StatementPlan(
        code=current.plan.code,
        name=current.plan.name,
        currency=current.plan.currency,
        price_per_gpu_second=current.plan.price_per_gpu_second,
        # A float column: its shortest repr is the value an operator typed, in milliseconds.
        included_gpu_seconds=exact(current.plan.included_gpu_seconds).quantize(
            GPU_SECONDS_QUANTUM, ROUND_HALF_UP
        ),
        included_images=current.plan.included_images,
    )
    sums = await repository.usage_sums(session, period)
    return Statement(
        organization_id=org_id,
        month=period.start.strftime("%Y-%m"),
        period_start=period.starts_at,
        period_end=period.ends_at,
        final=now >= period.ends_at,
        plan=plan,
        totals=totals(sums),
        by_operation=await grouped_usage(session, "operation", period),
        by_member=await grouped_usage(session, "member", period),
        by_api_key=await grouped_usage(session, "api_key", period),
        charges=charges(sums, plan),
    )
