"""Operator actions outside a request (CLI, demo data): the same services, audited."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from fastapi_users.exceptions import InvalidPasswordException, UserAlreadyExists
from sqlalchemy import select, text

from hiddenmodel.db import async_global_session, async_tenant_session, commit, ops_session
from hiddenmodel.errors import Conflict, NotFound, Problem
from tenants import repository, service
from tenants.auth import OrgScope, Principal
from tenants.models import Organization, Role, Scope, User
from tenants.schemas import ApiKeyCreate, OrganizationCreate
from tenants.users import create_user as _create_user


async def create_user(email: str, password: str, *, superuser: bool = False) -> uuid.UUID:
    try:
        user = await _create_user(email, password, is_superuser=superuser, is_verified=True)
    except InvalidPasswordException as exc:
        raise Problem(str(exc.reason), kind="invalid-password") from exc
    except UserAlreadyExists as exc:
        raise Conflict(f"A user with e-mail {email} exists.", kind="user-exists") from exc
    return user.id


async def _user_by_email(email: str) -> User:
    async with async_global_session() as session:
        user = (
            await session.scalars(select(User).where(User.__table__.c.email == email))
        ).one_or_none()
    if user is None:
        raise NotFound(f"No user with e-mail {email}.")
    return user


async def create_org(slug: str, name: str, owner_email: str) -> uuid.UUID:
    owner = await _user_by_email(owner_email)
    org_id = uuid.uuid4()
    async with async_tenant_session(org_id) as session:
        await service.create_organization(session, owner, OrganizationCreate(slug=slug, name=name))
        await commit(session)
    return org_id


async def find_org_id(org: str) -> uuid.UUID:
    """Resolve a slug or id across tenants: an operator lookup, so it goes through ops."""
    try:
        return uuid.UUID(org)
    except ValueError:
        pass
    async with ops_session(
        actor="cli", purpose="resolve organization slug", detail={"slug": org}
    ) as s:
        org_id = await s.scalar(select(Organization.id).where(Organization.slug == org))
    if org_id is None:
        raise NotFound(f"No organization with slug {org}.")
    return org_id


async def replace_api_keys(
    org: str, name_prefix: str, name: str, scopes: list[str], expires_at: datetime
) -> str:
    """Revoke the org's keys named ``name_prefix…`` and create one in their place, in one
    transaction: a tool that makes a key on each run (``up``'s demo key) leaves one behind."""
    org_id = await find_org_id(org)
    async with async_tenant_session(org_id) as session:
        org_row = await session.get(Organization, org_id)
        if org_row is None:
            raise NotFound(f"No organization {org}.")
        scope = OrgScope(org=org_row, principal=Principal(), session=session, role=Role.OWNER)
        for old in await repository.unrevoked_api_keys_named(session, name_prefix):
            await service.revoke_api_key(scope, old.id)
        _, token = await service.create_api_key(
            scope,
            ApiKeyCreate(name=name, scopes=[Scope(s) for s in scopes], expires_at=expires_at),
        )
        await commit(session)
    return token


async def create_api_key(org: str, name: str, scopes: list[str]) -> str:
    org_id = await find_org_id(org)
    async with async_tenant_session(org_id) as session:
        org_row = await session.get(Organization, org_id)
        if org_row is None:
            raise NotFound(f"No organization {org}.")
        # An operator acting with the rights of an owner: recorded in the org's audit log.
        scope = OrgScope(org=org_row, principal=Principal(), session=session, role=Role.OWNER)
        _, token = await service.create_api_key(
            scope, ApiKeyCreate(name=name, scopes=[Scope(s) for s in scopes])
        )
        await commit(session)
    return token


async def set_limits_if_unassigned(org: str, overrides: dict[str, Any]) -> bool:
    """Put the organization on the default plan with these limit overrides, unless an operator
    (or Stripe) has given it a plan already: that choice is kept. True when set here."""
    org_id = await find_org_id(org)
    async with ops_session(
        actor="cli", purpose="set limits of an unassigned organization", detail={"org": org}
    ) as s:
        result = await s.execute(
            text(
                "INSERT INTO org_billing (organization_id, plan_id, overrides) "
                "SELECT :o, id, CAST(:ov AS jsonb) FROM plans WHERE is_default "
                "ON CONFLICT (organization_id) DO NOTHING RETURNING organization_id"
            ),
            {"o": org_id, "ov": json.dumps(overrides)},
        )
        return result.first() is not None
