"""All SQL of the identity and access domain. Tenant tables are read through RLS sessions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.pagination import paginate
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Organization, Role, User


async def user_organizations(session: AsyncSession, user_id: uuid.UUID) -> Sequence[Any]:
    """A user's own organizations across tenants (the one definer function)."""
    result = await session.execute(
        text("SELECT organization_id, slug, name, role FROM hm_user_organizations(:u)"),
        {"u": user_id},
    )
    return result.all()


async def get_organization(session: AsyncSession, org_id: uuid.UUID) -> Organization | None:
    return await session.get(Organization, org_id)


async def get_membership(session: AsyncSession, user_id: uuid.UUID) -> Membership | None:
    return (
        await session.scalars(select(Membership).where(Membership.user_id == user_id))
    ).one_or_none()


async def lock_organization(session: AsyncSession, org_id: uuid.UUID) -> None:
    """Serialize membership changes of one org on its row: two owners demoting each other at
    once cannot both pass the last-owner check, and lock order cannot deadlock."""
    await session.execute(
        select(Organization.id).where(Organization.id == org_id).with_for_update()
    )


async def owner_ids(session: AsyncSession) -> list[uuid.UUID]:
    rows = await session.scalars(
        select(Membership.user_id).where(Membership.role == Role.OWNER.value)
    )
    return list(rows)


async def list_members(
    session: AsyncSession, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    return await paginate(
        session,
        select(Membership),
        created_at=Membership.created_at,
        id_=Membership.id,
        cursor=cursor,
        limit=limit,
    )


async def users_by_id(session: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, User]:
    if not ids:
        return {}
    rows = await session.scalars(select(User).where(User.__table__.c.id.in_(ids)))
    return {u.id: u for u in rows}


async def list_invitations(
    session: AsyncSession, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    return await paginate(
        session,
        select(Invitation),
        created_at=Invitation.created_at,
        id_=Invitation.id,
        cursor=cursor,
        limit=limit,
    )


async def get_invitation(session: AsyncSession, invitation_id: uuid.UUID) -> Invitation | None:
    return await session.get(Invitation, invitation_id)


async def get_invitation_by_hash(session: AsyncSession, token_hash: str) -> Invitation | None:
    return (
        await session.scalars(
            select(Invitation).where(Invitation.token_hash == token_hash).with_for_update()
        )
    ).one_or_none()


async def consume_invitation(
    session: AsyncSession, invitation_id: uuid.UUID, user_id: uuid.UUID, now: datetime
) -> bool:
    """Compare-and-set: only one accept of a pending, unexpired invitation can win."""
    result = await session.execute(
        update(Invitation)
        .where(
            Invitation.id == invitation_id,
            Invitation.accepted_at.is_(None),
            Invitation.revoked_at.is_(None),
            Invitation.expires_at > now,
        )
        .values(accepted_at=now, accepted_by_id=user_id)
        .returning(Invitation.id)
    )
    return result.scalar_one_or_none() is not None


async def list_api_keys(
    session: AsyncSession, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    return await paginate(
        session,
        select(ApiKey),
        created_at=ApiKey.created_at,
        id_=ApiKey.id,
        cursor=cursor,
        limit=limit,
    )


async def get_api_key(session: AsyncSession, key_id: uuid.UUID) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


_API_KEY_COLUMNS = tuple(ApiKey.__table__.c)
_ORG_COLUMNS = tuple(Organization.__table__.c)
_API_KEY_WITH_ORG = (
    select(*_API_KEY_COLUMNS, *_ORG_COLUMNS)
    .join_from(
        ApiKey.__table__,
        Organization.__table__,
        Organization.__table__.c.id == ApiKey.__table__.c.organization_id,
    )
    .where(ApiKey.__table__.c.key_hash == bindparam("key_hash"))
)


async def get_api_key_with_org(
    session: AsyncSession, key_hash: str
) -> tuple[ApiKey, Organization] | None:
    """The key and its organization, as detached objects (read on every API-key request:
    a Core row and two constructors cost a third of what ORM loading does)."""
    row = (await session.execute(_API_KEY_WITH_ORG, {"key_hash": key_hash})).one_or_none()
    if row is None:
        return None
    n = len(_API_KEY_COLUMNS)
    key = ApiKey(**{c.key: row[i] for i, c in enumerate(_API_KEY_COLUMNS)})
    org = Organization(**{c.key: row[n + i] for i, c in enumerate(_ORG_COLUMNS)})
    return key, org


async def touch_api_key(session: AsyncSession, key_id: uuid.UUID, now: datetime) -> bool:
    """Record a use; skipped (False) when another transaction holds the row right now."""
    locked = (
        select(ApiKey.id)
        .where(ApiKey.id == key_id)
        .with_for_update(skip_locked=True, key_share=True)  # FOR NO KEY UPDATE
        .scalar_subquery()
    )
    result = await session.execute(
        update(ApiKey).where(ApiKey.id == locked).values(last_used_at=now).returning(ApiKey.id)
    )
    return result.scalar_one_or_none() is not None


async def list_audit_events(
    session: AsyncSession, cursor: str | None, limit: int, action: str | None = None
) -> tuple[Sequence[Any], str | None]:
    stmt = select(AuditEvent)
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    return await paginate(
        session,
        stmt,
        created_at=AuditEvent.created_at,
        id_=AuditEvent.id,
        cursor=cursor,
        limit=limit,
    )


def add_audit_event(session: AsyncSession, event: AuditEvent) -> None:
    session.add(event)
