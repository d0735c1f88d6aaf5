"""Rules of identity and access. No HTTP here and no commit: the session's owner commits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel import authguard
from hiddenmodel.db import after_commit
from hiddenmodel.errors import Conflict, Forbidden, Gone, NotFound, Problem
from hiddenmodel.mail import Mail, send_mail
from hiddenmodel.security import (
    InvalidToken,
    display_prefix,
    generate_token,
    keyed_hash,
    keyed_hashes,
    parse_token,
)
from hiddenmodel.settings import get_settings
from tenants import lockouts, repository, totp
from tenants.auth import (
    API_KEY_PREFIX,
    MANAGE_MEMBERS,
    OrgScope,
    Principal,
    require_not_suspended,
)
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Organization, Role, User
from tenants.schemas import (
    ApiKeyCreate,
    InvitationCreate,
    MembershipRead,
    OrganizationCreate,
    OrganizationUpdate,
    SignInLockRead,
)

INVITATION_PREFIX = "hmi"


def audit(
    session: AsyncSession,
    org_id: uuid.UUID,
    principal: Principal | None,
    action: str,
    target_type: str,
    target_id: uuid.UUID | str | None,
    **data: Any,
) -> None:
    """Append to the organization's audit log in the caller's transaction."""
    repository.add_audit_event(
        session,
        AuditEvent(
            organization_id=org_id,
            actor_user_id=principal.user_id if principal else None,
            actor_api_key_id=principal.api_key_id if principal else None,
            action=action,
            target_type=target_type,
            target_id=str(target_id) if target_id is not None else None,
            data=data,
        ),
    )


# --- organizations -----------------------------------------------------------------------


async def create_organization(
    session: AsyncSession, user: User, data: OrganizationCreate
) -> Organization:
    """Create an org with ``user`` as its owner. ``session`` must be bound to the new id."""
    org_id = session.info["org_id"]
    org = Organization(id=org_id, slug=data.slug, name=data.name)
    session.add(org)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict(f"The slug '{data.slug}' is taken.", kind="slug-taken") from exc
    session.add(Membership(organization_id=org_id, user_id=user.id, role=Role.OWNER.value))
    audit(
        session,
        org_id,
        Principal(user=user),
        "organization.created",
        "organization",
        org_id,
        slug=data.slug,
    )
    await session.flush()
    return org


async def update_organization(scope: OrgScope, data: OrganizationUpdate) -> Organization:
    # An API key's organization was read with the key, outside this session's identity map:
    # change the session's own copy, or the change would not be written.
    org = scope.org
    if org not in scope.session:
        org = await repository.get_organization(scope.session, scope.org_id) or org
        scope.org = org
    if data.name is not None and data.name != org.name:
        org.name = data.name
        audit(
            scope.session,
            scope.org_id,
            scope.principal,
            "organization.updated",
            "organization",
            scope.org_id,
            name=data.name,
        )
    if data.require_two_factor is not None and data.require_two_factor != org.require_two_factor:
        await _set_require_two_factor(scope, org, data.require_two_factor)
    await scope.session.flush()
    return scope.org


async def _set_require_two_factor(scope: OrgScope, org: Organization, required: bool) -> None:
    """Owners only; an owner turning the requirement on must have two-factor on already
    (or the change would shut them out of their own organization)."""
    user = scope.principal.user
    if user is None or scope.role != Role.OWNER:
        raise Forbidden(
            "Only an owner may change whether two-factor sign-in is required.",
            kind="insufficient-role",
            required_roles=[Role.OWNER.value],
        )
    if required and not await totp.has_totp(scope.session, user.id):
        raise Conflict(
            "Turn on two-factor sign-in for your own account first (POST /v1/users/me/totp).",
            kind="two-factor-required",
        )
    org.require_two_factor = required
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "organization.two_factor_required" if required else "organization.two_factor_optional",
        "organization",
        scope.org_id,
        require_two_factor=required,
    )


# --- members -----------------------------------------------------------------------------


async def list_members(
    scope: OrgScope, cursor: str | None, limit: int
) -> tuple[list[MembershipRead], str | None]:
    """Members of the organization. E-mail addresses only for who manages members: owners
    and admins, API keys with the admin scope (a key's scopes decide what it reads)."""
    rows, next_cursor = await repository.list_members(scope.session, cursor, limit)
    users = await repository.users_by_id(scope.session, [m.user_id for m in rows])
    show_email = scope.allows(MANAGE_MEMBERS)
    with_totp = (
        await totp.users_with_totp(scope.session, [m.user_id for m in rows])
        if show_email
        else set()
    )
    items = [
        MembershipRead(
            user_id=m.user_id,
            email=users[m.user_id].email if show_email else None,
            name=users[m.user_id].name,
            role=Role(m.role),
            created_at=m.created_at,
            two_factor=(m.user_id in with_totp) if show_email else None,
        )
        for m in rows
    ]
    return items, next_cursor


def _require_may_touch(scope: OrgScope, target_role: Role, new_role: Role | None) -> None:
    """Only owners may grant ownership or act on an owner."""
    acting_owner = scope.principal.api_key is None and scope.role == Role.OWNER
    if (target_role == Role.OWNER or new_role == Role.OWNER) and not acting_owner:
        raise Forbidden(
            "Only an owner may grant, change or remove ownership.", kind="owner-required"
        )


async def _ensure_owner_remains(scope: OrgScope, leaving_owner: uuid.UUID) -> None:
    owners = await repository.owner_ids(scope.session)
    if owners == [leaving_owner]:
        raise Conflict("An organization must keep at least one owner.", kind="last-owner")


async def change_role(scope: OrgScope, user_id: uuid.UUID, role: Role) -> Membership:
    await repository.lock_organization(scope.session, scope.org_id)
    membership = await repository.get_membership(scope.session, user_id)
    if membership is None:
        raise NotFound("No such member.")
    current = Role(membership.role)
    if current == role:
        return membership
    _require_may_touch(scope, current, role)
    if current == Role.OWNER:
        await _ensure_owner_remains(scope, user_id)
    membership.role = role.value
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "member.role_changed",
        "user",
        user_id,
        old_role=current.value,
        new_role=role.value,
    )
    await scope.session.flush()
    return membership


async def remove_member(scope: OrgScope, user_id: uuid.UUID) -> None:
    """Remove a member; a member may always remove themselves (leave) unless last owner."""
    await repository.lock_organization(scope.session, scope.org_id)
    membership = await repository.get_membership(scope.session, user_id)
    if membership is None:
        raise NotFound("No such member.")
    leaving = scope.principal.user_id == user_id
    current = Role(membership.role)
    if not leaving:
        scope.require(MANAGE_MEMBERS)
        _require_may_touch(scope, current, None)
    if current == Role.OWNER:
        await _ensure_owner_remains(scope, user_id)
    await scope.session.delete(membership)
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "member.left" if leaving else "member.removed",
        "user",
        user_id,
        role=current.value,
    )
    await scope.session.flush()


# --- sign-in locks ----------------------------------------------------------------------


async def sign_in_locks(scope: OrgScope) -> list[SignInLockRead]:
    """Locks in force on members' accounts (sign-in, reset requests, invitations)."""
    members = await repository.member_users(scope.session)
    locks = await authguard.account_locks(
        [email for _, email, _ in members], [str(user_id) for user_id, _, _ in members]
    )
    return [
        SignInLockRead(
            user_id=user_id,
            email=email,
            action=lock.action.value,
            failures=lock.failures,
            locked_until=lock.locked_until,
        )
        for (user_id, email, _), member_locks in zip(members, locks, strict=True)
        for lock in member_locks
    ]


async def clear_sign_in_lock(scope: OrgScope, user_id: uuid.UUID) -> None:
    """Forget a member's failed attempts and locks; only an owner may clear an owner's."""
    membership = await repository.get_membership(scope.session, user_id)
    if membership is None:
        raise NotFound("No such member.")
    _require_may_touch(scope, Role(membership.role), None)
    user = (await repository.users_by_id(scope.session, [user_id]))[user_id]
    cleared = await authguard.clear_account(user.email, str(user_id))
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        lockouts.CLEARED_ACTION,
        "user",
        user_id,
        had_lock=cleared,
    )
    await scope.session.flush()


# --- invitations -------------------------------------------------------------------------


def invitation_status(invitation: Invitation, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    if invitation.accepted_at is not None:
        return "accepted"
    if invitation.revoked_at is not None:
        return "revoked"
    if invitation.expires_at <= now:
        return "expired"
    return "pending"


async def create_invitation(scope: OrgScope, data: InvitationCreate) -> tuple[Invitation, str]:
    _require_may_touch(scope, data.role, data.role)
    token = generate_token(INVITATION_PREFIX, scope.org_id)
    invitation = Invitation(
        organization_id=scope.org_id,
        email=str(data.email).lower(),
        role=data.role.value,
        token_hash=keyed_hash(token),
        invited_by_id=scope.principal.user_id,
        expires_at=datetime.now(UTC) + timedelta(hours=get_settings().invitation_ttl_hours),
    )
    scope.session.add(invitation)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "invitation.created",
        "invitation",
        invitation.id,
        email=invitation.email,
        role=invitation.role,
    )
    org_name = scope.org.name
    base = get_settings().public_base_url
    mail = Mail(
        to=invitation.email,
        subject=f"You are invited to {org_name} on Hidden Model",
        body=(
            f"You have been invited to join {org_name} as {invitation.role}.\n"
            f"Sign in with this address, then accept at {base}/portal/invitations/accept"
            f"?token={token}\nor with POST /v1/invitations/accept.\n\ntoken: {token}\n"
            f"The invitation expires at {invitation.expires_at.isoformat()}.\n"
        ),
        kind="invitation",
    )

    async def _send() -> None:
        await send_mail(mail)

    after_commit(scope.session, _send)
    return invitation, token


async def revoke_invitation(scope: OrgScope, invitation_id: uuid.UUID) -> Invitation:
    invitation = await repository.get_invitation(scope.session, invitation_id)
    if invitation is None:
        raise NotFound("No such invitation.")
    if invitation_status(invitation) != "pending":
        raise Conflict("Only a pending invitation can be revoked.", kind="invitation-not-pending")
    invitation.revoked_at = datetime.now(UTC)
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "invitation.revoked",
        "invitation",
        invitation.id,
    )
    await scope.session.flush()
    return invitation


def invitation_org_id(token: str) -> uuid.UUID:
    try:
        return parse_token(token, INVITATION_PREFIX).org_id
    except InvalidToken as exc:
        raise NotFound("No such invitation.", kind="invitation-not-found") from exc


async def accept_invitation(session: AsyncSession, user: User, token: str) -> Membership:
    """Single use: the accept is a compare-and-set on a pending, unexpired invitation.

    ``session`` is bound to the organization named in the token.
    """
    invitation = await repository.get_invitation_by_hash(session, keyed_hashes(token))
    if invitation is None:
        raise NotFound("No such invitation.", kind="invitation-not-found")
    if invitation.email.lower() != user.email.lower():
        # Someone else's invitation: indistinguishable from one that does not exist.
        raise NotFound("No such invitation.", kind="invitation-not-found")
    status = invitation_status(invitation)
    if status == "accepted":
        raise Gone("This invitation has already been used.", kind="invitation-used")
    if status == "revoked":
        raise Gone("This invitation has been revoked.", kind="invitation-revoked")
    if status == "expired":
        raise Gone("This invitation has expired.", kind="invitation-expired")
    org = await repository.get_organization(session, invitation.organization_id)
    if org is not None:
        require_not_suspended(org)
    if await repository.get_membership(session, user.id) is not None:
        raise Conflict("You are already a member of this organization.", kind="already-member")
    now = datetime.now(UTC)
    if not await repository.consume_invitation(session, invitation.id, user.id, now):
        raise Gone("This invitation has already been used.", kind="invitation-used")
    membership = Membership(
        organization_id=invitation.organization_id, user_id=user.id, role=invitation.role
    )
    session.add(membership)
    audit(
        session,
        invitation.organization_id,
        Principal(user=user),
        "invitation.accepted",
        "invitation",
        invitation.id,
        role=invitation.role,
    )
    audit(
        session,
        invitation.organization_id,
        Principal(user=user),
        "member.added",
        "user",
        user.id,
        role=invitation.role,
    )
    await session.flush()
    return membership


# --- API keys ----------------------------------------------------------------------------


async def create_api_key(scope: OrgScope, data: ApiKeyCreate) -> tuple[ApiKey, str]:
    now = datetime.now(UTC)
    if data.expires_at is not None and data.expires_at <= now:
        raise Problem(
            "expires_at must be in the future.",
            status=422,
            kind="validation-error",
            title="Validation error",
        )
    token = generate_token(API_KEY_PREFIX, scope.org_id)
    key = ApiKey(
        organization_id=scope.org_id,
        name=data.name,
        prefix=display_prefix(token),
        key_hash=keyed_hash(token),
        scopes=[s.value for s in data.scopes],
        created_by_id=scope.principal.user_id,
        expires_at=data.expires_at,
    )
    scope.session.add(key)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "api_key.created",
        "api_key",
        key.id,
        name=key.name,
        scopes=key.scopes,
    )
    return key, token


async def revoke_api_key(scope: OrgScope, key_id: uuid.UUID) -> ApiKey:
    key = await repository.get_api_key(scope.session, key_id)
    if key is None:
        raise NotFound("No such API key.")
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        audit(
            scope.session,
            scope.org_id,
            scope.principal,
            "api_key.revoked",
            "api_key",
            key.id,
            name=key.name,
        )
        await scope.session.flush()
    return key
