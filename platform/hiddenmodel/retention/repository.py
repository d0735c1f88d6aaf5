"""SQL of retention: settings under RLS, and the sweep's walk across organizations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.jobs.models import Job
from hiddenmodel.retention.models import OrgRetention

# The bound organization's plan (the default plan when it has no billing row).
_PLAN_DAYS = text(
    """
    SELECT p.retention_days FROM plans p
    WHERE p.id = COALESCE(
        (SELECT b.plan_id FROM org_billing b WHERE b.organization_id = :org),
        (SELECT d.id FROM plans d WHERE d.is_default LIMIT 1)
    )
    """
)


async def plan_days(session: AsyncSession, org_id: uuid.UUID) -> int | None:
    value: int | None = await session.scalar(_PLAN_DAYS, {"org": org_id})
    return value


async def get_setting(session: AsyncSession, *, for_update: bool = False) -> OrgRetention | None:
    stmt = select(OrgRetention)
    if for_update:
        stmt = stmt.with_for_update()
    row: OrgRetention | None = (await session.scalars(stmt)).one_or_none()
    return row


async def delete_setting(session: AsyncSession, row: OrgRetention) -> None:
    await session.delete(row)


# --- the sweep -----------------------------------------------------------------------------


def jobs_past_retention_sync(
    session: Session, now: datetime, limit: int
) -> list[tuple[uuid.UUID, uuid.UUID, int]]:
    """(organization, job, days) of finished jobs whose objects are due, across tenants."""
    rows = session.execute(
        text("SELECT out_org, out_job, out_days FROM hm_jobs_past_retention(:now, :limit)"),
        {"now": now, "limit": limit},
    )
    return [(r[0], r[1], r[2]) for r in rows]


def retention_by_org_sync(session: Session) -> list[tuple[uuid.UUID, int]]:
    """(organization, effective days) of every organization whose objects do not live
    forever."""
    rows = session.execute(text("SELECT out_org, out_days FROM hm_retention_by_org()"))
    return [(r[0], r[1]) for r in rows]


def lock_unexpired_jobs_sync(session: Session, job_ids: list[uuid.UUID]) -> list[Job]:
    """The bound organization's jobs among ``job_ids`` not yet expired, locked (rows another
    sweep holds are skipped)."""
    stmt = (
        select(Job)
        .where(Job.id.in_(job_ids), Job.expired_at.is_(None), Job.finished_at.is_not(None))
        .with_for_update(skip_locked=True)
    )
    return list(session.scalars(stmt).all())


def mark_expired_sync(session: Session, job_ids: list[uuid.UUID], when: datetime) -> None:
    values: dict[str, Any] = {"expired_at": when}
    session.execute(update(Job).where(Job.id.in_(job_ids)).values(**values))
