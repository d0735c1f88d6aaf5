"""What every portal page shares: the router, templates, the signed-in user, entering an
organization, rendering. The pages are in :mod:`portal.account`, :mod:`portal.tenant` and
:mod:`portal.operator`.

Every view signs the browser in through the same session cookie as ``/v1/auth/cookie``, enters
an organization through :func:`tenants.auth.open_org_scope` (membership decides, anything else
is a 404) and calls the services the API routers call. Pages declare the permission they need
with the API's own :class:`tenants.auth.Permission` objects.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData

from hiddenmodel.db import async_global_session, commit, rollback
from hiddenmodel.errors import Problem
from hiddenmodel.tenancy import current_user_id
from hiddenmodel.webhooks import service as webhooks_service
from portal.security import (
    CSRF_FIELD,
    PREFIX,
    csrf_token,
    form_once,
)
from tenants.auth import (
    JOBS_READ,
    JOBS_WRITE,
    MANAGE_API_KEYS,
    MANAGE_MEMBERS,
    READ_AUDIT,
    USAGE_READ,
    OrgScope,
    Permission,
    Principal,
    open_org_scope,
)
from tenants.models import User
from tenants.users import (
    COOKIE_NAME,
    HashedAccessTokenDatabase,
    UserDatabase,
    UserManager,
    get_database_strategy,
)

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["CSRF_FIELD"] = CSRF_FIELD
router = APIRouter(prefix=PREFIX, include_in_schema=False)
PAGE_SIZE = 25
WORKER_WINDOW_MINUTES = 60
CHART_DAYS = 30

# The portal's pages for people who operate the organization's work (not the billing role,
# which sees billing and usage only): the roles that may submit jobs.
OPERATE = Permission("portal_operate", JOBS_WRITE.roles, JOBS_READ.scope)


class SignInRequired(Exception):
    """Raised by a page that needs a signed-in user; answered with a redirect to sign in."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


# --- sessions ----------------------------------------------------------------------------


@asynccontextmanager
async def user_manager() -> AsyncIterator[UserManager]:
    async with async_global_session() as session:
        try:
            yield UserManager(UserDatabase(session))
            await commit(session)
        except BaseException:
            await rollback(session)
            raise


async def session_user(request: Request) -> User | None:
    """The user of the session cookie, or None (no cookie, expired, inactive)."""
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        return None
    async with async_global_session() as session:
        strategy = get_database_strategy(HashedAccessTokenDatabase(session))
        user = await strategy.read_token(token, UserManager(UserDatabase(session)))
        await commit(session)
    if user is None or not user.is_active:
        return None
    # The page's later global transactions act for this user (app.user_id).
    current_user_id.set(user.id)
    return user


async def require_user(request: Request) -> User:
    user = await session_user(request)
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return user


@asynccontextmanager
async def org_page(
    request: Request, org_id: uuid.UUID, need: Permission
) -> AsyncIterator[OrgScope]:
    """Enter an organization as the signed-in user; 404 unless a member, 403 without ``need``."""
    user = await require_user(request)
    async with open_org_scope(org_id, Principal(user=user)) as scope:
        scope.require(need)
        yield scope


def attempt(scope: OrgScope) -> AbstractAsyncContextManager[Any]:
    """A savepoint around one change: when the service refuses it, only the change is undone
    and the page can still be rendered in the request's transaction."""
    return scope.session.begin_nested()


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    scope: OrgScope | None = None,
) -> HTMLResponse:
    base: dict[str, Any] = {
        "csrf_token": csrf_token(request),
        "form_once": form_once(),
        "user": None,
        "org": None,
    }
    if scope is not None:
        assert scope.role is not None
        base.update(
            org=scope.org,
            role=scope.role.value,
            user=scope.principal.user,
            can={
                "operate": scope.allows(OPERATE),
                "members": scope.allows(MANAGE_MEMBERS),
                "keys": scope.allows(MANAGE_API_KEYS),
                "audit": scope.allows(READ_AUDIT),
                "usage": scope.allows(USAGE_READ),
                "webhooks": scope.allows(webhooks_service.MANAGE_WEBHOOKS),
            },
        )
    base.update(context)
    return templates.TemplateResponse(request, template, base, status_code=status_code)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def org_url(org_id: uuid.UUID, *parts: str) -> str:
    return "/".join([f"{PREFIX}/orgs/{org_id}", *parts]).rstrip("/")


def form_field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def number(raw: str) -> int | float | str:
    """A form field as the number it spells; anything else as typed, for validation to name."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            continue
    return raw


def error_field(exc: Exception) -> str | None:
    """The form field an error is about, to show it next to that field."""
    if isinstance(exc, ValidationError):
        loc = exc.errors()[0].get("loc", ())
        return str(loc[0]) if loc else None
    if isinstance(exc, Problem):
        named = exc.extra.get("field") or exc.extra.get("limit")
        return str(named) if named else None
    return None


def problem_message(exc: Problem) -> str:
    return exc.detail or exc.title


def validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def today() -> date:
    return datetime.now(UTC).date()


def parse_day(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None
