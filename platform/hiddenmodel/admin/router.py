"""HTTP of the operator API (superusers only).

Each route opens its own ops session, whose first statement records the operator, the purpose
and the request's parameters in ``operator_audit_events``; the audit row commits with the work
or not at all.
"""

from __future__ import annotations

import uuid
from contextlib import AbstractAsyncContextManager
from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.admin import service
from hiddenmodel.admin.auth import Operator, OperatorDep
from hiddenmodel.admin.schemas import (
    AdminGroupBy,
    AdminOrgRead,
    OrgPlanRead,
    OrgPlanSet,
    PlanCreate,
    PlanRead,
    PlanUpdate,
)
from hiddenmodel.db import ops_session
from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from hiddenmodel.usage import ratelimits
from hiddenmodel.usage.periods import MAX_PERIOD_DAYS
from hiddenmodel.usage.schemas import UsageReport

router = APIRouter(prefix="/v1/admin", tags=["admin"])

Cursor = Annotated[str | None, Query(description="Opaque cursor from `next_cursor`.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
FromQuery = Annotated[
    date | None, Query(alias="from", description="First day (UTC), included. Default: month.")
]
ToQuery = Annotated[
    date | None,
    Query(description=f"Last day (UTC), included; at most {MAX_PERIOD_DAYS} days from `from`."),
]


def _audited(
    operator: Operator, purpose: str, **detail: Any
) -> AbstractAsyncContextManager[AsyncSession]:
    return ops_session(
        actor=operator.email,
        purpose=purpose,
        detail={"operator_id": str(operator.user_id), **detail},
    )


def _today() -> date:
    return datetime.now(UTC).date()


@router.get("/plans", operation_id="adminListPlans", response_model=list[PlanRead])
async def list_plans(operator: OperatorDep) -> list[PlanRead]:
    """Every plan with its prices, included amounts and limits."""
    async with _audited(operator, "admin.plans.list") as session:
        return await service.list_plans(session)


@router.post(
    "/plans",
    operation_id="adminCreatePlan",
    status_code=status.HTTP_201_CREATED,
    response_model=PlanRead,
)
async def create_plan(body: PlanCreate, operator: OperatorDep, response: Response) -> PlanRead:
    """Add a plan. With `is_default`, it replaces the current default plan."""
    async with _audited(
        operator, "admin.plans.create", plan=body.model_dump(mode="json")
    ) as session:
        plan = await service.create_plan(session, body)
    response.headers["Location"] = f"/v1/admin/plans/{plan.code}"
    return plan


@router.get("/plans/{code}", operation_id="adminGetPlan", response_model=PlanRead)
async def get_plan(code: str, operator: OperatorDep) -> PlanRead:
    """One plan by its code."""
    async with _audited(operator, "admin.plans.read", code=code) as session:
        return await service.get_plan(session, code)


@router.patch("/plans/{code}", operation_id="adminUpdatePlan", response_model=PlanRead)
async def update_plan(code: str, body: PlanUpdate, operator: OperatorDep) -> PlanRead:
    """Change a plan's name, prices, included amounts, limits or Stripe price. Every
    organization on the plan is affected at once."""
    async with _audited(
        operator,
        "admin.plans.update",
        code=code,
        changes=body.model_dump(mode="json", exclude_unset=True),
    ) as session:
        plan = await service.update_plan(session, code, body)
    # Cached rate limits of every organization on the plan are stale now.
    ratelimits.forget_all()
    return plan


@router.get("/orgs", operation_id="adminListOrganizations", response_model=Page[AdminOrgRead])
async def list_orgs(
    operator: OperatorDep,
    q: Annotated[str | None, Query(max_length=100, description="Part of slug or name")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[AdminOrgRead]:
    """Every organization, newest first, with its plan and this month's usage."""
    async with _audited(operator, "admin.orgs.list", q=q, cursor=cursor, limit=limit) as session:
        return await service.list_orgs(session, query=q, cursor=cursor, limit=limit, today=_today())


@router.get("/orgs/{org_id}", operation_id="adminGetOrganization", response_model=AdminOrgRead)
async def get_org(org_id: uuid.UUID, operator: OperatorDep) -> AdminOrgRead:
    """One organization with its plan, overrides and this month's usage."""
    async with _audited(operator, "admin.orgs.read", org_id=str(org_id)) as session:
        return await service.get_org(session, org_id, _today())


@router.put(
    "/orgs/{org_id}/plan", operation_id="adminSetOrganizationPlan", response_model=OrgPlanRead
)
async def set_org_plan(org_id: uuid.UUID, body: OrgPlanSet, operator: OperatorDep) -> OrgPlanRead:
    """Put an organization on a plan, with limit overrides that replace any earlier ones."""
    async with _audited(
        operator, "admin.orgs.set_plan", org_id=str(org_id), **body.model_dump(mode="json")
    ) as session:
        result = await service.set_org_plan(session, operator, org_id, body)
    # This process stops using the old rates at once; others within their cache's lifetime.
    ratelimits.forget(org_id)
    return result


@router.post(
    "/orgs/{org_id}/suspend", operation_id="adminSuspendOrganization", response_model=AdminOrgRead
)
async def suspend_org(org_id: uuid.UUID, operator: OperatorDep) -> AdminOrgRead:
    """Suspend an organization at once: its members and API keys get 403
    `organization-suspended`, its queued jobs wait undispatched (and unbilled)."""
    async with _audited(operator, "admin.orgs.suspend", org_id=str(org_id)) as session:
        return await service.set_suspended(session, operator, org_id, True, _today())


@router.post(
    "/orgs/{org_id}/unsuspend",
    operation_id="adminUnsuspendOrganization",
    response_model=AdminOrgRead,
)
async def unsuspend_org(org_id: uuid.UUID, operator: OperatorDep) -> AdminOrgRead:
    """Restore a suspended organization; its waiting jobs are dispatched again."""
    async with _audited(operator, "admin.orgs.unsuspend", org_id=str(org_id)) as session:
        return await service.set_suspended(session, operator, org_id, False, _today())


@router.get("/usage", operation_id="adminGetUsageReport", response_model=UsageReport)
async def get_usage(
    operator: OperatorDep,
    group_by: Annotated[AdminGroupBy, Query(description="org, day (UTC) or operation")] = "org",
    start: FromQuery = None,
    to: ToQuery = None,
) -> UsageReport:
    """Usage of all organizations in a period, grouped, with totals."""
    async with _audited(
        operator,
        "admin.usage.report",
        group_by=group_by,
        start=start.isoformat() if start else None,
        to=to.isoformat() if to else None,
    ) as session:
        return await service.usage_report(session, group_by, start, to, _today())
