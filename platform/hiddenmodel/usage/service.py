"""Rules of the usage API: the limits view and tenant-set sub-limits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from hiddenmodel.errors import NotFound, Problem
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.usage import quantities, quotas
from hiddenmodel.usage.models import QuotaCounter, QuotaLimit
from hiddenmodel.usage.schemas import LimitRead, LimitsRead, SubLimits, SubLimitsRead
from tenants import repository as tenants_repository
from tenants.auth import OrgScope
from tenants.service import audit


async def _counter(scope: OrgScope, subject_type: str, subject_id: uuid.UUID, period: Any) -> Any:
    return (
        await scope.session.scalars(
            select(QuotaCounter).where(
                QuotaCounter.subject_type == subject_type,
                QuotaCounter.subject_id == subject_id,
                QuotaCounter.period == period,
            )
        )
    ).one_or_none()


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
    period = quotas.period_of(now)
    resets = quotas.resets_at(period)
    org = await quotas.org_plan(scope.session)
    rows: list[LimitRead] = []
    subjects: list[tuple[str, uuid.UUID, dict[str, Any]]] = [("org", scope.org_id, org.limits)]
    if scope.principal.api_key_id is not None:
        subjects.append(
            (
                "api_key",
                scope.principal.api_key_id,
                await quotas.sub_limits(scope.session, "api_key", scope.principal.api_key_id),
            )
        )
    if scope.principal.member_id is not None:
        subjects.append(
            (
                "member",
                scope.principal.member_id,
                await quotas.sub_limits(scope.session, "member", scope.principal.member_id),
            )
        )
    for subject, subject_id, limits in subjects:
        counter = await _counter(scope, subject, subject_id, period)
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
        queued = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED.value)
        if subject == "api_key":
            queued = queued.where(Job.api_key_id == subject_id)
        elif subject == "member":
            queued = queued.where(Job.user_id == subject_id)
        rows.append(
            _row(
                "max_queued_jobs",
                subject,
                limits.get("max_queued_jobs"),
                float(await scope.session.scalar(queued) or 0),
                0.0,
                None,
            )
        )
    running = await scope.session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.RUNNING.value)
    )
    rows.append(
        _row(
            "max_running_jobs",
            "org",
            org.limits.get("max_running_jobs"),
            float(running or 0),
            0.0,
            None,
        )
    )
    lifetime = await _counter(scope, "org", scope.org_id, quotas.LIFETIME)
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
    return LimitsRead(
        plan=org.plan.code,
        period_start=datetime(period.year, period.month, 1, tzinfo=UTC),
        limits=rows,
    )


async def _require_subject(scope: OrgScope, subject_type: str, subject_id: uuid.UUID) -> None:
    if subject_type == "member":
        exists = await tenants_repository.get_membership(scope.session, subject_id) is not None
    else:
        exists = await tenants_repository.get_api_key(scope.session, subject_id) is not None
    if not exists:
        raise NotFound(f"No such {subject_type.replace('_', ' ')} in this organization.")


class SubLimitAbovePlan(Problem):
    status, kind, title = 422, "sub-limit-above-plan", "Sub-limit above the organization's limit"


async def _require_within_org(scope: OrgScope, values: dict[str, Any]) -> None:
    """Refuse caps above the organization's effective limits (plan and overrides); a limit
    the organization does not have (unlimited) takes any cap."""
    org = await quotas.org_plan(scope.session)
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
    row = (
        await scope.session.scalars(
            select(QuotaLimit).where(
                QuotaLimit.subject_type == subject_type, QuotaLimit.subject_id == subject_id
            )
        )
    ).one_or_none()
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
    values = await quotas.sub_limits(scope.session, subject_type, subject_id)
    return SubLimitsRead(subject_type=subject_type, subject_id=subject_id, **values)
