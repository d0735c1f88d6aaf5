"""Rules of the operator API: plans, organizations' plans and overrides, usage across tenants.

Every function takes the ops session its caller opened (and audited); none commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel import liveness
from hiddenmodel.admin import repository
from hiddenmodel.admin.auth import Operator
from hiddenmodel.admin.schemas import (
    AdminGroupBy,
    AdminOrgRead,
    OrgPlanRead,
    OrgPlanSet,
    OrgUsage,
    PlanCreate,
    PlanLimits,
    PlanRead,
    PlanUpdate,
)
from hiddenmodel.errors import Conflict, NotFound, Problem
from hiddenmodel.pagination import Page
from hiddenmodel.usage import periods
from hiddenmodel.usage import service as usage_service
from hiddenmodel.usage.models import OrgBilling, Plan
from hiddenmodel.usage.periods import Period
from hiddenmodel.usage.repository import EffectiveLimits, Sums
from hiddenmodel.usage.schemas import UsageReport
from hiddenmodel.usage.service import ORG_LIMITS
from tenants import repository as tenants_repository
from tenants.models import AuditEvent, Organization


class InvalidPlan(Problem):
    status, kind, title = 422, "invalid-plan", "Invalid plan"


class UnknownPlan(Problem):
    status, kind, title = 422, "unknown-plan", "Unknown plan"


class InvalidOverrides(Problem):
    status, kind, title = 422, "invalid-overrides", "Invalid limit overrides"


def _plan_not_found(code: str) -> NotFound:
    return NotFound(f"No plan with code '{code}'.", kind="plan-not-found")


def _concurrent_change() -> Conflict:
    return Conflict(
        "Another change to plans was made at the same moment; retry.", kind="concurrent-change"
    )


def _check_consistent(plan: Plan) -> None:
    """A plan cannot include more than its monthly limits allow."""
    if plan.monthly_gpu_seconds is not None and plan.included_gpu_seconds > (
        plan.monthly_gpu_seconds
    ):
        raise InvalidPlan(
            f"included_gpu_seconds ({plan.included_gpu_seconds:g}) exceeds "
            f"monthly_gpu_seconds ({plan.monthly_gpu_seconds:g}).",
            field="included_gpu_seconds",
        )
    if plan.monthly_images is not None and plan.included_images > plan.monthly_images:
        raise InvalidPlan(
            f"included_images ({plan.included_images}) exceeds monthly_images "
            f"({plan.monthly_images}).",
            field="included_images",
        )


async def _make_default(session: AsyncSession) -> None:
    # Locking the current default serialises operators switching it at the same time.
    await repository.default_plan(session, for_update=True)
    await repository.clear_default(session)


async def list_plans(session: AsyncSession) -> list[PlanRead]:
    """Every plan, oldest first."""
    return [PlanRead.model_validate(p) for p in await repository.list_plans(session)]


async def get_plan(session: AsyncSession, code: str) -> PlanRead:
    """One plan by its code."""
    plan = await repository.get_plan(session, code)
    if plan is None:
        raise _plan_not_found(code)
    return PlanRead.model_validate(plan)


async def create_plan(session: AsyncSession, body: PlanCreate) -> PlanRead:
    """Add a plan; made the default, it takes over from the previous default."""
    if await repository.get_plan(session, body.code) is not None:
        raise Conflict(f"A plan with code '{body.code}' exists.", kind="plan-exists")
    plan = Plan(**body.model_dump())
    _check_consistent(plan)
    try:
        if body.is_default:
            await _make_default(session)
        await repository.save_plan(session, plan)
    except IntegrityError as exc:
        raise _concurrent_change() from exc
    return PlanRead.model_validate(plan)


async def update_plan(session: AsyncSession, code: str, body: PlanUpdate) -> PlanRead:
    """Change the fields sent. There is always one default plan: it stops being the default
    only when another plan becomes it."""
    changes = body.changes()
    plan = await repository.get_plan(session, code, for_update=True)
    if plan is None:
        raise _plan_not_found(code)
    if changes.get("is_default") is False and plan.is_default:
        raise Problem(
            f"'{code}' is the default plan; make another plan the default instead.",
            status=422,
            kind="default-plan-required",
            title="A default plan is required",
        )
    try:
        if changes.get("is_default") and not plan.is_default:
            await _make_default(session)
        for name, value in changes.items():
            setattr(plan, name, value)
        _check_consistent(plan)
        await repository.save_plan(session, plan)
    except IntegrityError as exc:
        raise _concurrent_change() from exc
    return PlanRead.model_validate(plan)


def _validate_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(ORG_LIMITS))
    if unknown:
        raise InvalidOverrides(
            f"Unknown limits: {', '.join(unknown)}.", unknown=unknown, allowed=list(ORG_LIMITS)
        )
    # The plan's own field rules (ranges, whole numbers) apply to its overrides too.
    try:
        limits = PlanLimits.model_validate(overrides)
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        raise InvalidOverrides("Some override values are out of range.", errors=errors) from exc
    return limits.model_dump(include=set(overrides))


async def set_org_plan(
    session: AsyncSession, operator: Operator, org_id: uuid.UUID, body: OrgPlanSet
) -> OrgPlanRead:
    """Put an organization on a plan with limit overrides (replacing earlier overrides), and
    note it in the organization's own audit log."""
    org = await repository.get_organization(session, org_id)
    if org is None:
        raise NotFound("No such organization.")
    plan = await repository.get_plan(session, body.plan)
    if plan is None:
        raise UnknownPlan(f"No plan with code '{body.plan}'.", plan=body.plan)
    overrides = _validate_overrides(body.overrides)
    previous = (await repository.billing_of(session, [org_id])).get(org_id)
    await repository.upsert_billing(session, org_id, plan.id, overrides)
    effective = (await usage_service.effective_limits(session, [org_id]))[org_id]
    tenants_repository.add_audit_event(
        session,
        AuditEvent(
            organization_id=org_id,
            actor_user_id=operator.user_id,
            action="billing.plan_set",
            target_type="organization",
            target_id=str(org_id),
            data={
                "plan": plan.code,
                "overrides": overrides,
                "previous_plan": previous[1].code if previous else None,
                "previous_overrides": previous[0].overrides if previous else None,
                "operator": operator.email,
            },
        ),
    )
    await session.flush()
    return OrgPlanRead(
        organization_id=org_id,
        plan=plan.code,
        overrides=overrides,
        limits=effective.limits,
    )


def _org_read(
    org: Organization,
    billing: tuple[OrgBilling, Plan] | None,
    effective: EffectiveLimits | None,
    sums: Sums | None,
    period: Period,
) -> AdminOrgRead:
    totals = usage_service.totals(
        sums or Sums(jobs=0, gpu_seconds=Decimal(0), images=0, megapixels=Decimal(0))
    )
    return AdminOrgRead(
        id=org.id,
        slug=org.slug,
        name=org.name,
        created_at=org.created_at,
        plan=(effective.plan_code if effective else None) or "",
        plan_assigned=billing is not None,
        overrides=billing[0].overrides if billing else {},
        limits=effective.limits if effective else {},
        subscription_status=billing[0].subscription_status if billing else None,
        usage=OrgUsage(period_start=period.start, **totals.model_dump()),
        suspended_at=org.suspended_at,
    )


async def _org_reads(
    session: AsyncSession, orgs: list[Organization], today: date
) -> list[AdminOrgRead]:
    period = periods.report_period(None, None, today=today)
    ids = [o.id for o in orgs]
    billing = await repository.billing_of(session, ids)
    effective = await usage_service.effective_limits(session, ids)
    usage = await usage_service.usage_sums_by_org(session, ids, period)
    return [
        _org_read(o, billing.get(o.id), effective.get(o.id), usage.get(o.id), period) for o in orgs
    ]


async def list_orgs(
    session: AsyncSession, *, query: str | None, cursor: str | None, limit: int, today: date
) -> Page[AdminOrgRead]:
    """Organizations newest first, each with its plan and this month's usage."""
    orgs, next_cursor = await repository.list_organizations(
        session, query=query, cursor=cursor, limit=limit
    )
    return Page(items=await _org_reads(session, list(orgs), today), next_cursor=next_cursor)


async def get_org(session: AsyncSession, org_id: uuid.UUID, today: date) -> AdminOrgRead:
    """One organization with its plan and this month's usage."""
    org = await repository.get_organization(session, org_id)
    if org is None:
        raise NotFound("No such organization.")
    return (await _org_reads(session, [org], today))[0]


async def usage_report(
    session: AsyncSession, group_by: AdminGroupBy, start: date | None, end: date | None, today: date
) -> UsageReport:
    """Usage of every organization in a period, grouped by organization, day or operation."""
    period = periods.report_period(start, end, today=today)
    return await usage_service.usage_report(session, group_by, period)


async def set_suspended(
    session: AsyncSession, operator: Operator, org_id: uuid.UUID, suspended: bool, today: date
) -> AdminOrgRead:
    """Suspend or restore an organization; repeating either is a no-op (nothing audited)."""
    org = await repository.get_organization(session, org_id)
    if org is None:
        raise NotFound("No such organization.")
    if (org.suspended_at is not None) != suspended:
        org.suspended_at = datetime.now(UTC) if suspended else None
        tenants_repository.add_audit_event(
            session,
            AuditEvent(
                organization_id=org_id,
                actor_user_id=operator.user_id,
                action="organization.suspended" if suspended else "organization.unsuspended",
                target_type="organization",
                target_id=str(org_id),
                data={"operator": operator.email},
            ),
        )
        await session.flush()
    return (await _org_reads(session, [org], today))[0]


@dataclass(frozen=True)
class WorkerView:
    """A worker process as operators see it: its liveness key and the jobs it ran."""

    id: str
    alive: bool
    host: str | None = None
    pid: int | None = None
    started: datetime | None = None
    running: int = 0
    last_heartbeat: datetime | None = None


async def queues_and_workers(
    session: AsyncSession, now: datetime, window: timedelta
) -> tuple[list[Any], list[WorkerView]]:
    """Queue depth per queue and organization; the worker processes announced in Redis now,
    with the jobs each runs, and those whose jobs beat within ``window`` but that announce
    themselves no more (gone: the reconciler hands their jobs back)."""
    queued = list(await repository.queued_jobs(session))
    by_jobs = {row.worker: row for row in await repository.worker_heartbeats(session, now - window)}
    workers = []
    for live in await liveness.live_workers():
        row = by_jobs.pop(live.id, None)
        workers.append(
            WorkerView(
                id=live.id,
                alive=True,
                host=live.host,
                pid=live.pid,
                started=live.started,
                running=int(row.running) if row else 0,
                last_heartbeat=row.last_heartbeat if row else None,
            )
        )
    workers.extend(
        WorkerView(
            id=row.worker, alive=False, running=int(row.running), last_heartbeat=row.last_heartbeat
        )
        for row in by_jobs.values()
    )
    return queued, workers
