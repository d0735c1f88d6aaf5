"""All SQL of the identity and access domain. Tenant tables are read through RLS sessions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.models import from_json
from hiddenmodel.pagination import paginate
from tenants.models import (
    ApiKey,
    AuditEvent,
    EmailChange,
    Invitation,
    Membership,
    Organization,
    Role,
    User,
)


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


async def get_invitation_by_hash(
    session: AsyncSession, token_hashes: Sequence[str]
) -> Invitation | None:
    """The invitation whose token hashes to one of ``token_hashes`` (one per server key)."""
    # The app role may not read token_hash: a definer function names the invitation.
    invitation_id = None
    for token_hash in token_hashes:
        invitation_id = await session.scalar(
            text("SELECT out_invitation FROM hm_invitation_by_token(:h)"), {"h": token_hash}
        )
        if invitation_id is not None:
            break
    if invitation_id is None:
        return None
    return (
        await session.scalars(
            select(Invitation).where(Invitation.id == invitation_id).with_for_update()
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


async def unrevoked_api_keys_named(session: AsyncSession, name_prefix: str) -> Sequence[ApiKey]:
    """The tenant's keys not yet revoked whose name starts with ``name_prefix``."""
    pattern = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    result = await session.scalars(
        select(ApiKey).where(ApiKey.revoked_at.is_(None), ApiKey.name.like(pattern, escape="\\"))
    )
    return result.all()


_API_KEY_FOR_REQUEST = text("SELECT api_key, organization FROM hm_api_key_for_request(:org, :hash)")


async def get_api_key_with_org(
    session: AsyncSession, org_id: uuid.UUID, key_hash: str
) -> tuple[ApiKey, Organization] | None:
    """The key and its organization, as detached objects, in one round trip that also binds
    the transaction to ``org_id``: call it first in a session marked with
    :func:`hiddenmodel.db.bind_org_with_first_statement`."""
    row = (
        await session.execute(_API_KEY_FOR_REQUEST, {"org": org_id, "hash": key_hash})
    ).one_or_none()
    if row is None:
        return None
    return from_json(ApiKey, row.api_key), from_json(Organization, row.organization)


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


async def user_by_email(session: AsyncSession, email: str) -> User | None:
    return (
        await session.scalars(
            select(User).where(func.lower(User.__table__.c.email) == email.strip().lower())
        )
    ).one_or_none()


async def member_users(session: AsyncSession) -> Sequence[tuple[uuid.UUID, str, str]]:
    """Every member of the session's organization: user id, e-mail address, role."""
    rows = await session.execute(
        select(Membership.user_id, User.__table__.c.email, Membership.role)
        .join(User, User.__table__.c.id == Membership.user_id)
        .order_by(Membership.created_at, Membership.id)
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def add_email_change(session: AsyncSession, change: EmailChange) -> None:
    session.add(change)
    await session.flush()


@dataclass(frozen=True)
class PendingEmailChange:
    """A change as ``hm_email_change_by_token`` answers it: without its hash."""

    id: uuid.UUID
    user_id: uuid.UUID
    new_email: str
    expires_at: datetime
    confirmed_at: datetime | None


async def get_email_change(session: AsyncSession, token_hash: str) -> PendingEmailChange | None:
    row = (
        await session.execute(text("SELECT * FROM hm_email_change_by_token(:h)"), {"h": token_hash})
    ).one_or_none()
    return None if row is None else PendingEmailChange(*row)


async def consume_email_change(session: AsyncSession, change_id: uuid.UUID, now: datetime) -> bool:
    """Compare-and-set: true for the one request that confirms an unexpired change."""
    result = await session.execute(
        update(EmailChange)
        .where(
            EmailChange.id == change_id,
            EmailChange.confirmed_at.is_(None),
            EmailChange.expires_at > now,
        )
        .values(confirmed_at=now)
        .returning(EmailChange.id)
    )
    return result.first() is not None


async def end_other_sessions(
    session: AsyncSession, user_id: uuid.UUID, keep_token_hash: str | None
) -> None:
    """Delete every login session of a user but the one named (the caller's own); only for
    the user the transaction acts for (the hashes are not the app's to read)."""
    await session.execute(
        text("SELECT hm_access_tokens_end_others(:u, :keep)"),
        {"u": user_id, "keep": keep_token_hash},
    )
