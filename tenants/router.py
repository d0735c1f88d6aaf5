"""HTTP of identity and access. Translation only: rules live in ``tenants.service``."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from hiddenmodel import authguard
from hiddenmodel.authguard import Action
from hiddenmodel.db import async_tenant_session, commit, rollback
from hiddenmodel.errors import Gone, NotFound
from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from tenants import repository, service
from tenants.auth import (
    MANAGE_MEMBERS,
    CurrentPrincipal,
    CurrentUser,
    ManageApiKeys,
    ManageMembers,
    ManageOrg,
    OrgScopeDep,
    ReadAudit,
    ReadOrg,
)
from tenants.models import Invitation, Role
from tenants.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyRead,
    AuditEventRead,
    InvitationAccept,
    InvitationCreate,
    InvitationCreated,
    InvitationRead,
    MembershipRead,
    MembershipUpdate,
    MeRead,
    MyOrganization,
    OrganizationCreate,
    OrganizationRead,
    OrganizationUpdate,
    SignInLockRead,
    UserRead,
)
from tenants.users import GlobalSessionDep

router = APIRouter(prefix="/v1")

Cursor = Annotated[str | None, Query(description="Opaque cursor from `next_cursor`.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


@router.get("/me", tags=["identity"], operation_id="getMe", response_model=MeRead)
async def get_me(principal: CurrentPrincipal, session: GlobalSessionDep) -> MeRead:
    """The caller: a user with their organizations, or an API key with its organization."""
    if principal.api_key is not None:
        assert principal.key_org is not None  # read with the key
        return MeRead(
            kind="api_key",
            api_key=ApiKeyRead.model_validate(principal.api_key),
            organization=OrganizationRead.model_validate(principal.key_org),
        )
    assert principal.user is not None
    rows = await repository.user_organizations(session, principal.user.id)
    return MeRead(
        kind="user",
        user=UserRead.model_validate(principal.user, from_attributes=True),
        organizations=[
            MyOrganization(id=r.organization_id, slug=r.slug, name=r.name, role=Role(r.role))
            for r in rows
        ],
    )


@router.post(
    "/orgs",
    tags=["organizations"],
    operation_id="createOrganization",
    status_code=status.HTTP_201_CREATED,
    response_model=OrganizationRead,
)
async def create_organization(
    data: OrganizationCreate, user: CurrentUser, response: Response
) -> OrganizationRead:
    """Create an organization; the caller becomes its owner."""
    org_id = uuid.uuid4()
    async with async_tenant_session(org_id) as session:
        try:
            org = await service.create_organization(session, user, data)
            await commit(session)
        except BaseException:
            await rollback(session)
            raise
    response.headers["Location"] = f"/v1/orgs/{org.id}"
    return OrganizationRead.model_validate(org)


@router.get(
    "/orgs",
    tags=["organizations"],
    operation_id="listMyOrganizations",
    response_model=list[MyOrganization],
)
async def list_my_organizations(
    user: CurrentUser, session: GlobalSessionDep
) -> list[MyOrganization]:
    rows = await repository.user_organizations(session, user.id)
    return [
        MyOrganization(id=r.organization_id, slug=r.slug, name=r.name, role=Role(r.role))
        for r in rows
    ]


@router.get(
    "/orgs/{org_id}",
    tags=["organizations"],
    operation_id="getOrganization",
    response_model=OrganizationRead,
)
async def get_organization(scope: ReadOrg) -> OrganizationRead:
    return OrganizationRead.model_validate(scope.org)


@router.patch(
    "/orgs/{org_id}",
    tags=["organizations"],
    operation_id="updateOrganization",
    response_model=OrganizationRead,
)
async def update_organization(data: OrganizationUpdate, scope: ManageOrg) -> OrganizationRead:
    return OrganizationRead.model_validate(await service.update_organization(scope, data))


@router.get(
    "/orgs/{org_id}/members",
    tags=["members"],
    operation_id="listMembers",
    response_model=Page[MembershipRead],
)
async def list_members(
    scope: ReadOrg, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> Page[MembershipRead]:
    items, next_cursor = await service.list_members(scope, cursor, limit)
    return Page(items=items, next_cursor=next_cursor)


@router.patch(
    "/orgs/{org_id}/members/{user_id}",
    tags=["members"],
    operation_id="changeMemberRole",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def change_member_role(
    user_id: uuid.UUID, data: MembershipUpdate, scope: ManageMembers
) -> None:
    await service.change_role(scope, user_id, data.role)


@router.delete(
    "/orgs/{org_id}/members/{user_id}",
    tags=["members"],
    operation_id="removeMember",
    status_code=status.HTTP_204_NO_CONTENT,
    # Checked in the service (leaving needs no permission): declared here for the document.
    openapi_extra={"x-required-scopes": [MANAGE_MEMBERS.scope.value]},
)
async def remove_member(user_id: uuid.UUID, scope: OrgScopeDep) -> None:
    """Remove a member, or leave when ``user_id`` is your own. An org always keeps an owner."""
    await service.remove_member(scope, user_id)


def _invitation_read(invitation: Invitation) -> InvitationRead:
    return InvitationRead(
        id=invitation.id,
        email=invitation.email,
        role=Role(invitation.role),
        expires_at=invitation.expires_at,
        accepted_at=invitation.accepted_at,
        revoked_at=invitation.revoked_at,
        created_at=invitation.created_at,
        status=service.invitation_status(invitation),
    )


@router.post(
    "/orgs/{org_id}/invitations",
    tags=["invitations"],
    operation_id="createInvitation",
    status_code=status.HTTP_201_CREATED,
    response_model=InvitationCreated,
)
async def create_invitation(data: InvitationCreate, scope: ManageMembers) -> InvitationCreated:
    """Invite someone by e-mail. The token is mailed to them and shown here once."""
    invitation, token = await service.create_invitation(scope, data)
    return InvitationCreated(**_invitation_read(invitation).model_dump(), token=token)


@router.get(
    "/orgs/{org_id}/invitations",
    tags=["invitations"],
    operation_id="listInvitations",
    response_model=Page[InvitationRead],
)
async def list_invitations(
    scope: ManageMembers, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> Page[InvitationRead]:
    rows, next_cursor = await repository.list_invitations(scope.session, cursor, limit)
    return Page(items=[_invitation_read(i) for i in rows], next_cursor=next_cursor)


@router.delete(
    "/orgs/{org_id}/invitations/{invitation_id}",
    tags=["invitations"],
    operation_id="revokeInvitation",
    response_model=InvitationRead,
)
async def revoke_invitation(invitation_id: uuid.UUID, scope: ManageMembers) -> InvitationRead:
    return _invitation_read(await service.revoke_invitation(scope, invitation_id))


@router.post(
    "/invitations/accept",
    tags=["invitations"],
    operation_id="acceptInvitation",
    response_model=MyOrganization,
)
async def accept_invitation(data: InvitationAccept, user: CurrentUser) -> MyOrganization:
    """Join the organization that invited your e-mail address. Each token works once."""
    async with authguard.guarded(Action.INVITATION, str(user.id), (NotFound, Gone)):
        org_id = service.invitation_org_id(data.token)
        async with async_tenant_session(org_id) as session:
            try:
                membership = await service.accept_invitation(session, user, data.token)
                org = await repository.get_organization(session, org_id)
                await commit(session)
            except BaseException:
                await rollback(session)
                raise
    assert org is not None
    return MyOrganization(id=org.id, slug=org.slug, name=org.name, role=Role(membership.role))


@router.post(
    "/orgs/{org_id}/api-keys",
    tags=["api-keys"],
    operation_id="createApiKey",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
)
async def create_api_key(data: ApiKeyCreate, scope: ManageApiKeys) -> ApiKeyCreated:
    """Create a key bound to this organization. The secret is returned once, never again."""
    key, token = await service.create_api_key(scope, data)
    return ApiKeyCreated(**ApiKeyRead.model_validate(key).model_dump(), key=token)


@router.get(
    "/orgs/{org_id}/api-keys",
    tags=["api-keys"],
    operation_id="listApiKeys",
    response_model=Page[ApiKeyRead],
)
async def list_api_keys(
    scope: ManageApiKeys, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> Page[ApiKeyRead]:
    rows, next_cursor = await repository.list_api_keys(scope.session, cursor, limit)
    return Page(items=[ApiKeyRead.model_validate(k) for k in rows], next_cursor=next_cursor)


@router.delete(
    "/orgs/{org_id}/api-keys/{key_id}",
    tags=["api-keys"],
    operation_id="revokeApiKey",
    response_model=ApiKeyRead,
)
async def revoke_api_key(key_id: uuid.UUID, scope: ManageApiKeys) -> ApiKeyRead:
    return ApiKeyRead.model_validate(await service.revoke_api_key(scope, key_id))


@router.get(
    "/orgs/{org_id}/audit-events",
    tags=["audit"],
    operation_id="listAuditEvents",
    response_model=Page[AuditEventRead],
)
async def list_audit_events(
    scope: ReadAudit,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    action: Annotated[str | None, Query(max_length=64)] = None,
) -> Page[AuditEventRead]:
    rows, next_cursor = await repository.list_audit_events(scope.session, cursor, limit, action)
    return Page(items=[AuditEventRead.model_validate(e) for e in rows], next_cursor=next_cursor)


@router.get(
    "/orgs/{org_id}/sign-in-locks",
    tags=["members"],
    operation_id="listSignInLocks",
    response_model=list[SignInLockRead],
)
async def list_sign_in_locks(scope: ManageMembers) -> list[SignInLockRead]:
    """Members' accounts locked after repeated failed sign-ins, reset requests or invitation
    attempts; each lock ends by itself at ``locked_until``."""
    return await service.sign_in_locks(scope)


@router.delete(
    "/orgs/{org_id}/sign-in-locks/{user_id}",
    tags=["members"],
    operation_id="clearSignInLock",
    status_code=status.HTTP_204_NO_CONTENT,
)
async def clear_sign_in_lock(user_id: uuid.UUID, scope: ManageMembers) -> None:
    """Unlock a member's account at once and forget its failed attempts."""
    await service.clear_sign_in_lock(scope, user_id)
