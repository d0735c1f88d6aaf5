"""SQL of the operator API. Every function expects an ops session (cross-tenant, audited)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.jobs.models import Job
from hiddenmodel.pagination import paginate
from hiddenmodel.usage.models import OrgBilling, Plan
from tenants.models import Organization


async def list_plans(session: AsyncSession) -> Sequence[Plan]:
    return (await session.scalars(select(Plan).order_by(Plan.created_at, Plan.code))).all()


async def get_plan(session: AsyncSession, code: str, *, for_update: bool = False) -> Plan | None:
    stmt = select(Plan).where(Plan.code == code)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


async def default_plan(session: AsyncSession, *, for_update: bool = False) -> Plan | None:
    stmt = select(Plan).where(Plan.is_default)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.scalars(stmt)).one_or_none()


async def clear_default(session: AsyncSession) -> None:
    """No plan is the default until the caller makes one so (same transaction)."""
    await session.execute(
        update(Plan).where(Plan.is_default).values(is_default=False),
        execution_options={"synchronize_session": "fetch"},
    )


async def save_plan(session: AsyncSession, plan: Plan) -> None:
    """Write a new or changed plan and read it back as stored (numeric scale, defaults)."""
    session.add(plan)
    await session.flush()
    await session.refresh(plan)


async def get_organization(session: AsyncSession, org_id: uuid.UUID) -> Organization | None:
    return await session.get(Organization, org_id)


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def list_organizations(
    session: AsyncSession, *, query: str | None, cursor: str | None, limit: int
) -> tuple[Sequence[Organization], str | None]:
    """Organizations newest first; ``query`` matches slug or name, case-insensitively."""
    stmt = select(Organization)
    if query:
        pattern = _like(query)
        stmt = stmt.where(
            or_(
                Organization.slug.ilike(pattern, escape="\\"),
                Organization.name.ilike(pattern, escape="\\"),
            )
        )
    return await paginate(
        session,
        stmt,
        created_at=Organization.created_at,
        id_=Organization.id,
        cursor=cursor,
        limit=limit,
    )


async def billing_of(
    session: AsyncSession, org_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, tuple[OrgBilling, Plan]]:
    """The billing row and plan of each organization that has one."""
    if not org_ids:
        return {}
    rows = await session.execute(
        select(OrgBilling, Plan)
        .join(Plan, Plan.id == OrgBilling.plan_id)
        .where(OrgBilling.organization_id.in_(org_ids))
    )
    return {billing.organization_id: (billing, plan) for billing, plan in rows.tuples()}


async def upsert_billing(
    session: AsyncSession, org_id: uuid.UUID, plan_id: uuid.UUID, overrides: dict[str, Any]
) -> None:
    """Put the organization on ``plan_id`` with ``overrides``; Stripe state is kept."""
    stmt = insert(OrgBilling).values(organization_id=org_id, plan_id=plan_id, overrides=overrides)
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[OrgBilling.organization_id],
            set_={
                "plan_id": stmt.excluded.plan_id,
                "overrides": stmt.excluded.overrides,
                "updated_at": func.now(),
            },
        )
    )


async def queued_jobs(session: AsyncSession) -> Sequence[Any]:
    """Queued jobs per queue and organization: how many, how many the dispatcher has not
    sent yet, and the oldest one's submission time."""
    stmt = (
        select(
            Job.queue,
            Job.organization_id,
            Organization.slug,
            Organization.suspended_at,
            func.count().label("jobs"),
            func.count().filter(Job.dispatched_at.is_(None)).label("waiting"),
            func.min(Job.created_at).label("oldest"),
        )
        .join(Organization, Organization.id == Job.organization_id)
        .where(Job.status == "queued")
        .group_by(Job.queue, Job.organization_id, Organization.slug, Organization.suspended_at)
        .order_by(Job.queue, func.count().desc())
    )
    return (await session.execute(stmt)).all()


async def worker_heartbeats(session: AsyncSession, since: Any) -> Sequence[Any]:
    """Workers seen since ``since`` through the jobs they ran: running jobs and last beat."""
    stmt = (
        select(
            Job.worker,
            func.count().filter(Job.status == "running").label("running"),
            func.max(Job.heartbeat_at).label("last_heartbeat"),
        )
        .where(Job.worker.is_not(None), Job.heartbeat_at >= since)
        .group_by(Job.worker)
        .order_by(func.max(Job.heartbeat_at).desc())
    )
    return (await session.execute(stmt)).all()
