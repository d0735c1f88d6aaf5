"""The admin portal: server-rendered pages for tenant admins and platform operators.

Every view signs the browser in through the same session cookie as ``/v1/auth/cookie``, enters
an organization through :func:`tenants.auth.open_org_scope` (membership decides, anything else
is a 404) and calls the services the API routers call. Pages declare the permission they need
with the API's own :class:`tenants.auth.Permission` objects.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from fastapi_users import exceptions as fu_exceptions
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from pydantic import ValidationError
from starlette.datastructures import FormData

from hiddenmodel import storage
from hiddenmodel.admin import service as admin_service
from hiddenmodel.admin.auth import Operator
from hiddenmodel.admin.schemas import OrgPlanSet
from hiddenmodel.billing import service as billing_service
from hiddenmodel.db import async_global_session, async_tenant_session, commit, ops_session, rollback
from hiddenmodel.errors import NotFound, Problem
from hiddenmodel.jobs import repository as jobs_repository
from hiddenmodel.jobs import service as jobs_service
from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.jobs.router import event_stream_response
from hiddenmodel.security import keyed_hash
from hiddenmodel.usage import quotas, ratelimits, reports
from hiddenmodel.usage import service as usage_service
from hiddenmodel.usage.schemas import SubLimits
from hiddenmodel.webhooks import service as webhooks_service
from hiddenmodel.webhooks.models import EventType
from hiddenmodel.webhooks.schemas import WebhookEndpointCreate, WebhookEndpointUpdate
from portal.charts import DayPoint, daily_usage_svg, gauge_svg
from portal.security import (
    CSRF_FIELD,
    PREFIX,
    checked_form,
    csrf_token,
    first_submission,
    form_once,
    new_seed,
    set_seed_cookie,
)
from tenants import repository as tenants_repository
from tenants import service as tenants_service
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
from tenants.models import Role, Scope, User
from tenants.schemas import ApiKeyCreate, InvitationCreate
from tenants.users import (
    COOKIE_NAME,
    HashedAccessTokenDatabase,
    UserManager,
    cookie_backend,
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
async def _user_manager() -> AsyncIterator[UserManager]:
    async with async_global_session() as session:
        try:
            yield UserManager(SQLAlchemyUserDatabase(session, User))
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
        user = await strategy.read_token(token, UserManager(SQLAlchemyUserDatabase(session, User)))
        await commit(session)
    return user if user is not None and user.is_active else None


async def require_user(request: Request) -> User:
    user = await session_user(request)
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired(target)
    return user


def _safe_next(value: object) -> str:
    """Only a path inside the portal: never an open redirect."""
    text = value if isinstance(value, str) else ""
    if text.startswith(PREFIX + "/") and not text.startswith("//") and "\\" not in text:
        return text
    return PREFIX + "/"


async def _orgs_of(user: User) -> list[Any]:
    async with async_global_session() as session:
        rows = await tenants_repository.user_organizations(session, user.id)
        await commit(session)
    return list(rows)


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


def _render(
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


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _org_url(org_id: uuid.UUID, *parts: str) -> str:
    return "/".join([f"{PREFIX}/orgs/{org_id}", *parts]).rstrip("/")


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _number(raw: str) -> int | float | str:
    """A form field as the number it spells; anything else as typed, for validation to name."""
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            continue
    return raw


def _problem_message(exc: Problem) -> str:
    return exc.detail or exc.title


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first['msg']}" if where else str(first["msg"])


# --- sign in and out, account pages -----------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str = "") -> HTMLResponse:
    return _render(request, "login.html", {"next": _safe_next(next), "email": ""})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await checked_form(request)
    email, password = _field(form, "email"), form.get("password")
    next_url = _safe_next(form.get("next"))
    credentials = _Credentials(email, password if isinstance(password, str) else "")
    async with _user_manager() as manager:
        user = await manager.authenticate(credentials)  # type: ignore[arg-type]
        if user is None or not user.is_active:
            return _render(
                request,
                "login.html",
                {"next": next_url, "email": email, "error": "Wrong e-mail address or password."},
                status_code=400,
            )
        strategy = get_database_strategy(HashedAccessTokenDatabase(manager.session))
        # Renewal: a session that existed before sign-in ends, and a new one starts.
        old = request.cookies.get(COOKIE_NAME)
        if old:
            previous = await strategy.read_token(old, manager)
            if previous is not None:
                await strategy.destroy_token(old, previous)
        token = await strategy.write_token(user)
    response = _see_other(next_url)
    transport = cookie_backend.transport
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=transport.cookie_max_age,  # type: ignore[attr-defined]
        path="/",
        secure=transport.cookie_secure,  # type: ignore[attr-defined]
        httponly=True,
        samesite="lax",
    )
    _rotate_seed(request, response)
    return response


class _Credentials:
    """What ``BaseUserManager.authenticate`` reads from a login form."""

    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username, password


def _rotate_seed(request: Request, response: Response) -> None:
    request.state.csrf_seed_rotated = True
    set_seed_cookie(response.headers, new_seed())


@router.post("/logout")
async def logout(request: Request) -> Response:
    await checked_form(request)
    token = request.cookies.get(COOKIE_NAME)
    if token:
        async with _user_manager() as manager:
            strategy = get_database_strategy(HashedAccessTokenDatabase(manager.session))
            user = await strategy.read_token(token, manager)
            if user is not None:
                await strategy.destroy_token(token, user)
    response = _see_other(f"{PREFIX}/login")
    response.delete_cookie(COOKIE_NAME, path="/")
    _rotate_seed(request, response)
    return response


@router.get("/forgot", response_class=HTMLResponse)
async def forgot_page(request: Request) -> HTMLResponse:
    return _render(request, "forgot.html", {})


@router.post("/forgot", response_class=HTMLResponse)
async def forgot(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    email = _field(form, "email")
    async with _user_manager() as manager:
        try:
            user = await manager.get_by_email(email)
            await manager.forgot_password(user, request)
        except (fu_exceptions.UserNotExists, fu_exceptions.UserInactive):
            pass  # the same answer either way: nobody learns who has an account
    return _render(request, "forgot.html", {"sent": True})


@router.get("/reset", response_class=HTMLResponse)
async def reset_page(request: Request, token: str = "") -> HTMLResponse:
    return _render(request, "reset.html", {"token": token})


@router.post("/reset", response_class=HTMLResponse)
async def reset(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    token, password = _field(form, "token"), form.get("password")
    error: str | None = None
    async with _user_manager() as manager:
        try:
            await manager.reset_password(token, password if isinstance(password, str) else "")
        except (fu_exceptions.InvalidResetPasswordToken, fu_exceptions.UserInactive):
            error = "This reset link is invalid or has expired. Ask for a new one."
        except fu_exceptions.InvalidPasswordException as exc:
            error = str(exc.reason)
    if error:
        return _render(request, "reset.html", {"token": token, "error": error}, status_code=400)
    return _render(request, "reset.html", {"done": True})


@router.get("/verify", response_class=HTMLResponse)
async def verify_page(request: Request, token: str = "") -> HTMLResponse:
    # Confirmed with a button: a mail scanner following the link verifies nothing.
    return _render(request, "verify.html", {"token": token})


@router.post("/verify", response_class=HTMLResponse)
async def verify(request: Request) -> HTMLResponse:
    form = await checked_form(request)
    token = _field(form, "token")
    async with _user_manager() as manager:
        try:
            await manager.verify(token, request)
        except fu_exceptions.UserAlreadyVerified:
            pass
        except (fu_exceptions.InvalidVerifyToken, fu_exceptions.UserNotExists):
            return _render(
                request,
                "verify.html",
                {"token": token, "error": "This link is invalid or has expired."},
                status_code=400,
            )
    return _render(request, "verify.html", {"done": True})


@router.get("/invitations/accept", response_class=HTMLResponse)
async def invitation_page(request: Request, token: str = "") -> HTMLResponse:
    user = await require_user(request)
    return _render(
        request,
        "accept.html",
        {"token": token, "user": user, "invitation": await _invitation_for(user, token)},
    )


async def _invitation_for(user: User, token: str) -> dict[str, str] | None:
    """What the invitation offers, when it is one for this user's address."""
    try:
        org_id = tenants_service.invitation_org_id(token)
    except Problem:
        return None
    async with async_tenant_session(org_id) as session:
        invitation = await tenants_repository.get_invitation_by_hash(session, keyed_hash(token))
        org = await tenants_repository.get_organization(session, org_id)
        found = (
            None
            if invitation is None or org is None or invitation.email.lower() != user.email.lower()
            else {
                "org": org.name,
                "role": invitation.role,
                "status": tenants_service.invitation_status(invitation),
            }
        )
        await rollback(session)  # read only
    return found


@router.post("/invitations/accept", response_class=HTMLResponse)
async def accept_invitation(request: Request) -> Response:
    user = await require_user(request)
    form = await checked_form(request)
    token = _field(form, "token")
    try:
        org_id = tenants_service.invitation_org_id(token)
        async with async_tenant_session(org_id) as session:
            try:
                await tenants_service.accept_invitation(session, user, token)
                await commit(session)
            except BaseException:
                await rollback(session)
                raise
    except Problem as exc:
        return _render(
            request,
            "accept.html",
            {
                "token": token,
                "user": user,
                "invitation": await _invitation_for(user, token),
                "error": _problem_message(exc),
            },
            status_code=exc.status,
        )
    return _see_other(_org_url(org_id))


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> Response:
    user = await require_user(request)
    orgs = await _orgs_of(user)
    if len(orgs) == 1 and not user.is_superuser:
        return _see_other(_home_of(orgs[0]))
    return _render(request, "home.html", {"user": user, "orgs": [(o, _home_of(o)) for o in orgs]})


def _home_of(row: Any) -> str:
    if Role(row.role) in OPERATE.roles:
        return _org_url(row.organization_id)
    return _org_url(row.organization_id, "billing")


# --- dashboard ---------------------------------------------------------------------------


def _today() -> date:
    return datetime.now(UTC).date()


async def _daily(scope: OrgScope, days: int) -> list[DayPoint]:
    today = _today()
    period = reports.report_period(today - timedelta(days=days - 1), today, today=today)
    report = await reports.usage_report(scope.session, "day", period)
    by_day = {row.key: row for row in report.rows}
    points = []
    for i in range(days):
        day = period.start + timedelta(days=i)
        row = by_day.get(day.isoformat())
        points.append(
            DayPoint(day, float(row.gpu_seconds) if row else 0.0, int(row.images) if row else 0)
        )
    return points


@router.get("/orgs/{org_id}", response_class=HTMLResponse)
async def dashboard(request: Request, org_id: uuid.UUID) -> HTMLResponse:
    async with org_page(request, org_id, OPERATE) as scope:
        points = await _daily(scope, CHART_DAYS)
        counts = await jobs_repository.status_counts(scope.session)
        oldest = await jobs_repository.oldest_queued_at(scope.session)
        limits = await usage_service.limits_view(scope)
        gauges = [
            (lim, gauge_svg(float(lim.used), None if lim.limit is None else float(lim.limit)))
            for lim in limits.limits
            if lim.subject == "org"
        ]
        wait = (datetime.now(UTC) - oldest).total_seconds() if oldest else None
        return _render(
            request,
            "dashboard.html",
            {
                "chart": daily_usage_svg(points),
                "totals": (sum(p.gpu_seconds for p in points), sum(p.images for p in points)),
                "counts": [(s.value, counts.get(s.value, 0)) for s in JobStatus],
                "oldest_wait": wait,
                "limits": limits,
                "gauges": gauges,
            },
            scope=scope,
        )


# --- members and invitations -------------------------------------------------------------


async def _members_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    members, next_cursor = await tenants_service.list_members(scope, cursor, PAGE_SIZE)
    invitations, _ = await tenants_repository.list_invitations(scope.session, None, PAGE_SIZE)
    return {
        "members": members,
        "next_cursor": next_cursor,
        "invitations": [
            (i, tenants_service.invitation_status(i))
            for i in invitations
            if tenants_service.invitation_status(i) == "pending"
        ],
        "roles": [r.value for r in Role],
    }


@router.get("/orgs/{org_id}/members", response_class=HTMLResponse)
async def members_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        return _render(request, "members.html", await _members_context(scope, cursor), scope=scope)


async def _members_error(
    request: Request, scope: OrgScope, message: str, status: int, **extra: Any
) -> HTMLResponse:
    context = await _members_context(scope, None)
    context.update(error=message, **extra)
    return _render(request, "members.html", context, status_code=status, scope=scope)


@router.post("/orgs/{org_id}/members/invite", response_class=HTMLResponse)
async def invite(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        try:
            data = InvitationCreate.model_validate(
                {"email": _field(form, "email"), "role": _field(form, "role")}
            )
            async with attempt(scope):
                invitation, _ = await tenants_service.create_invitation(scope, data)
        except ValidationError as exc:
            return await _members_error(
                request, scope, _validation_message(exc), 422, invite_email=_field(form, "email")
            )
        except Problem as exc:
            return await _members_error(request, scope, _problem_message(exc), exc.status)
        return _see_other(_org_url(org_id, "members") + f"?invited={quote(invitation.email)}")


@router.post("/orgs/{org_id}/members/{user_id}/role", response_class=HTMLResponse)
async def change_role(request: Request, org_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.change_role(scope, user_id, Role(_field(form, "role")))
        except ValueError:
            return await _members_error(request, scope, "Choose one of the roles.", 422)
        except Problem as exc:
            return await _members_error(request, scope, _problem_message(exc), exc.status)
        return _see_other(_org_url(org_id, "members"))


@router.post("/orgs/{org_id}/members/{user_id}/remove", response_class=HTMLResponse)
async def remove_member(request: Request, org_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.remove_member(scope, user_id)
        except Problem as exc:
            return await _members_error(request, scope, _problem_message(exc), exc.status)
        return _see_other(_org_url(org_id, "members"))


@router.post("/orgs/{org_id}/invitations/{invitation_id}/revoke", response_class=HTMLResponse)
async def revoke_invitation(
    request: Request, org_id: uuid.UUID, invitation_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.revoke_invitation(scope, invitation_id)
        except Problem as exc:
            return await _members_error(request, scope, _problem_message(exc), exc.status)
        return _see_other(_org_url(org_id, "members"))


# --- API keys ----------------------------------------------------------------------------


async def _keys_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    keys, next_cursor = await tenants_repository.list_api_keys(scope.session, cursor, PAGE_SIZE)
    return {
        "keys": keys,
        "next_cursor": next_cursor,
        "scopes": [s.value for s in Scope],
        "now": datetime.now(UTC),
    }


@router.get("/orgs/{org_id}/api-keys", response_class=HTMLResponse)
async def keys_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        return _render(request, "keys.html", await _keys_context(scope, cursor), scope=scope)


@router.post("/orgs/{org_id}/api-keys", response_class=HTMLResponse)
async def create_key(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        form = await checked_form(request)
        if not await first_submission(form):
            return _see_other(_org_url(org_id, "api-keys"))  # created already; shown then
        expires = _field(form, "expires_at")
        try:
            data = ApiKeyCreate(
                name=_field(form, "name"),
                scopes=[s for s in form.getlist("scopes") if isinstance(s, str)],
                expires_at=datetime.fromisoformat(expires).replace(tzinfo=UTC) if expires else None,
            )
            async with attempt(scope):
                key, token = await tenants_service.create_api_key(scope, data)
        except (ValidationError, ValueError, Problem) as exc:
            if isinstance(exc, ValidationError):
                message = _validation_message(exc)
            elif isinstance(exc, Problem):
                message = _problem_message(exc)
            else:
                message = "The expiry must be a date and time."
            context = await _keys_context(scope, None)
            context.update(error=message, form_name=_field(form, "name"))
            return _render(request, "keys.html", context, status_code=422, scope=scope)
        context = await _keys_context(scope, None)
        # The secret is shown in this answer only; it is never stored or shown again.
        context.update(created=key, secret=token)
        return _render(request, "keys.html", context, status_code=201, scope=scope)


@router.post("/orgs/{org_id}/api-keys/{key_id}/revoke", response_class=HTMLResponse)
async def revoke_key(request: Request, org_id: uuid.UUID, key_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        await checked_form(request)
        await tenants_service.revoke_api_key(scope, key_id)
        return _see_other(_org_url(org_id, "api-keys"))


# --- quotas per member and per key -------------------------------------------------------

_SUBJECTS = {"members": "member", "api-keys": "api_key"}
_LIMIT_FIELDS = ("monthly_gpu_seconds", "monthly_images", "max_queued_jobs", "requests_per_minute")


async def _quota_context(scope: OrgScope, subject: str, subject_id: uuid.UUID) -> dict[str, Any]:
    if subject not in _SUBJECTS:
        raise NotFound("No such page.")
    current = await usage_service.get_sub_limits(scope, _SUBJECTS[subject], subject_id)
    plan = await quotas.org_plan(scope.session)
    if subject == "members":
        user = (await tenants_repository.users_by_id(scope.session, [subject_id])).get(subject_id)
        label = user.email if user else str(subject_id)
    else:
        key = await tenants_repository.get_api_key(scope.session, subject_id)
        label = key.name if key else str(subject_id)
    return {
        "subject": subject,
        "subject_id": subject_id,
        "label": label,
        "current": current.model_dump(),
        "org_limits": plan.limits,
        "fields": _LIMIT_FIELDS,
    }


@router.get("/orgs/{org_id}/quotas/{subject}/{subject_id}", response_class=HTMLResponse)
async def quota_page(
    request: Request, org_id: uuid.UUID, subject: str, subject_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        context = await _quota_context(scope, subject, subject_id)
        return _render(request, "quota.html", context, scope=scope)


@router.post("/orgs/{org_id}/quotas/{subject}/{subject_id}", response_class=HTMLResponse)
async def set_quota(
    request: Request, org_id: uuid.UUID, subject: str, subject_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        if subject not in _SUBJECTS:
            raise NotFound("No such page.")
        values = {name: _field(form, name) or None for name in _LIMIT_FIELDS}
        try:
            limits = SubLimits.model_validate(values)
            async with attempt(scope):
                await usage_service.set_sub_limits(scope, _SUBJECTS[subject], subject_id, limits)
        except (ValidationError, Problem) as exc:
            context = await _quota_context(scope, subject, subject_id)
            message = (
                _validation_message(exc)
                if isinstance(exc, ValidationError)
                else _problem_message(exc)
            )
            if isinstance(exc, Problem):
                field = exc.extra.get("field") or exc.extra.get("limit")
            else:
                field = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
            context.update(error=message, error_field=field, current=values)
            status = exc.status if isinstance(exc, Problem) else 422
            return _render(request, "quota.html", context, status_code=status, scope=scope)
        return _see_other(_org_url(org_id, "quotas", subject, str(subject_id)) + "?saved=1")


# --- jobs --------------------------------------------------------------------------------


@router.get("/orgs/{org_id}/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request,
    org_id: uuid.UUID,
    status: str = "",
    operation: str = "",
    cursor: str | None = None,
) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        valid_status = status if status in {s.value for s in JobStatus} else None
        rows, next_cursor = await jobs_repository.list_jobs(
            scope.session,
            status=valid_status,
            operation=operation[:64] or None,
            created_after=None,
            created_before=None,
            cursor=cursor,
            limit=PAGE_SIZE,
        )
        jobs = [await jobs_service.view(scope, j) for j in rows]
        filters = {"status": valid_status or "", "operation": operation[:64]}
        more = urlencode({**filters, "cursor": next_cursor}) if next_cursor else None
        return _render(
            request,
            "jobs.html",
            {
                "jobs": jobs,
                "filters": filters,
                "statuses": [s.value for s in JobStatus],
                "more": more,
            },
            scope=scope,
        )


@router.get("/orgs/{org_id}/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        row = await jobs_service.get(scope, job_id)
        job = await jobs_service.view(scope, row)
        # The API gives no input URLs; the page shows the inputs beside the outputs.
        input_urls = {
            name: storage.presigned_get_url(meta["key"], row.organization_id)
            for name, meta in row.inputs.items()
        }
        return _render(
            request,
            "job.html",
            {"job": job, "terminal": job.status.terminal, "input_urls": input_urls},
            scope=scope,
        )


@router.get("/orgs/{org_id}/jobs/{job_id}/events")
async def job_events(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    """The job's event stream (the API's own), for the detail page's progress bar."""
    async with org_page(request, org_id, OPERATE) as scope:
        await jobs_service.get(scope, job_id)  # 404 before any stream opens
    return event_stream_response(scope, job_id)


@router.post("/orgs/{org_id}/jobs/{job_id}/cancel")
async def cancel_job(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        await checked_form(request)
        await jobs_service.cancel(scope, job_id)
        return _see_other(_org_url(org_id, "jobs", str(job_id)))


# --- webhooks ----------------------------------------------------------------------------


async def _webhooks_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    rows, next_cursor = await webhooks_service.list_endpoints(scope, cursor, PAGE_SIZE)
    return {
        "endpoints": rows,
        "next_cursor": next_cursor,
        "event_types": [e.value for e in EventType],
    }


@router.get("/orgs/{org_id}/webhooks", response_class=HTMLResponse)
async def webhooks_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        context = await _webhooks_context(scope, cursor)
        return _render(request, "webhooks.html", context, scope=scope)


@router.post("/orgs/{org_id}/webhooks", response_class=HTMLResponse)
async def create_webhook(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        form = await checked_form(request)
        if not await first_submission(form):
            return _see_other(_org_url(org_id, "webhooks"))
        try:
            data = WebhookEndpointCreate.model_validate(
                {
                    "url": _field(form, "url"),
                    "description": _field(form, "description"),
                    "event_types": [e for e in form.getlist("event_types") if isinstance(e, str)],
                }
            )
            async with attempt(scope):
                endpoint, secret = await webhooks_service.create_endpoint(scope, data)
        except (ValidationError, Problem) as exc:
            context = await _webhooks_context(scope, None)
            context.update(
                error=_validation_message(exc)
                if isinstance(exc, ValidationError)
                else _problem_message(exc),
                form_url=_field(form, "url"),
            )
            status = exc.status if isinstance(exc, Problem) else 422
            return _render(request, "webhooks.html", context, status_code=status, scope=scope)
        context = await _webhooks_context(scope, None)
        context.update(created=endpoint, secret=secret)
        return _render(request, "webhooks.html", context, status_code=201, scope=scope)


async def _endpoint_context(
    scope: OrgScope, endpoint_id: uuid.UUID, cursor: str | None
) -> dict[str, Any]:
    endpoint = await webhooks_service.get_endpoint(scope, endpoint_id)
    deliveries, next_cursor = await webhooks_service.list_deliveries(
        scope, endpoint_id, None, cursor, PAGE_SIZE
    )
    return {"endpoint": endpoint, "deliveries": deliveries, "next_cursor": next_cursor}


@router.get("/orgs/{org_id}/webhooks/{endpoint_id}", response_class=HTMLResponse)
async def webhook_page(
    request: Request, org_id: uuid.UUID, endpoint_id: uuid.UUID, cursor: str | None = None
) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        context = await _endpoint_context(scope, endpoint_id, cursor)
        return _render(request, "webhook.html", context, scope=scope)


@router.post("/orgs/{org_id}/webhooks/{endpoint_id}/{action}", response_class=HTMLResponse)
async def webhook_action(
    request: Request, org_id: uuid.UUID, endpoint_id: uuid.UUID, action: str
) -> Response:
    """rotate (the new secret shown once), test, enable, disable, delete."""
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        form = await checked_form(request)
        here = _org_url(org_id, "webhooks", str(endpoint_id))
        if action == "rotate":
            if not await first_submission(form):
                return _see_other(here)
            _, secret = await webhooks_service.rotate_secret(scope, endpoint_id)
            context = await _endpoint_context(scope, endpoint_id, None)
            context["secret"] = secret
            return _render(request, "webhook.html", context, scope=scope)
        if action == "test":
            await webhooks_service.send_test(scope, endpoint_id)
        elif action in ("enable", "disable"):
            update = WebhookEndpointUpdate(enabled=action == "enable")
            await webhooks_service.update_endpoint(scope, endpoint_id, update)
        elif action == "delete":
            await webhooks_service.delete_endpoint(scope, endpoint_id)
            return _see_other(_org_url(org_id, "webhooks"))
        else:
            raise NotFound("No such page.")
        return _see_other(here)


@router.post("/orgs/{org_id}/webhook-deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, org_id: uuid.UUID, delivery_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        await checked_form(request)
        original = await webhooks_service.get_delivery(scope, delivery_id)
        try:
            async with attempt(scope):
                await webhooks_service.redeliver(scope, delivery_id)
        except Problem as exc:
            context = await _endpoint_context(scope, original.endpoint_id, None)
            context["error"] = _problem_message(exc)
            return _render(request, "webhook.html", context, status_code=exc.status, scope=scope)
        return _see_other(_org_url(org_id, "webhooks", str(original.endpoint_id)))


# --- usage and billing -------------------------------------------------------------------

_GROUPS = ("day", "member", "api_key", "operation")


def _parse_day(value: str) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError:
        return None


async def _usage_report(
    scope: OrgScope, group_by: str, start: str, end: str
) -> tuple[reports.UsageReport, str]:
    group = group_by if group_by in _GROUPS else "day"
    period = reports.report_period(_parse_day(start), _parse_day(end), today=_today())
    return await reports.usage_report(scope.session, group, period), group  # type: ignore[arg-type]


@router.get("/orgs/{org_id}/usage", response_class=HTMLResponse)
async def usage_page(
    request: Request,
    org_id: uuid.UUID,
    group_by: str = "day",
    start: str = "",
    end: str = "",
) -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        try:
            report, group = await _usage_report(scope, group_by, start, end)
        except Problem as exc:
            report, group = await _usage_report(scope, group_by, "", "")
            error: str | None = _problem_message(exc)
        else:
            error = None
        query = urlencode({"group_by": group, "start": report.from_, "end": report.to})
        return _render(
            request,
            "usage.html",
            {
                "report": report,
                "group": group,
                "groups": _GROUPS,
                "csv_url": _org_url(org_id, "usage.csv") + "?" + query,
                "chart": daily_usage_svg(await _daily(scope, CHART_DAYS)),
                "error": error,
            },
            scope=scope,
        )


@router.get("/orgs/{org_id}/usage.csv")
async def usage_csv(
    request: Request, org_id: uuid.UUID, group_by: str = "day", start: str = "", end: str = ""
) -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        report, group = await _usage_report(scope, group_by, start, end)
        filename = f"usage-{scope.org.slug}-{group}-{report.from_}-{report.to}.csv"
        return Response(
            reports.render_csv(report),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )


async def _billing_context(scope: OrgScope, month: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    try:
        period = reports.month_period(month or now.strftime("%Y-%m"), today=now.date())
    except Problem:
        period = reports.month_period(now.strftime("%Y-%m"), today=now.date())
    statement = await reports.statement(scope.session, scope.org_id, period, now=now)
    plan = await quotas.org_plan(scope.session)
    manage = scope.allows(billing_service.MANAGE_BILLING)
    async with async_global_session() as session:
        # Plans are platform data; the same list the operator API shows, buyable ones only.
        plans = [p for p in await admin_service.list_plans(session) if p.stripe_price_id]
        await commit(session)
    return {
        "statement": statement,
        "plan": plan.plan,
        "billing": await billing_service.view(scope) if manage else None,
        "manage": manage,
        "plans": plans,
    }


@router.get("/orgs/{org_id}/billing", response_class=HTMLResponse)
async def billing_page(request: Request, org_id: uuid.UUID, month: str = "") -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        context = await _billing_context(scope, month)
        return _render(request, "billing.html", context, scope=scope)


@router.post("/orgs/{org_id}/billing/{action}", response_class=HTMLResponse)
async def billing_action(request: Request, org_id: uuid.UUID, action: str) -> Response:
    """Off to Stripe: Checkout for a plan, or the customer portal."""
    async with org_page(request, org_id, billing_service.MANAGE_BILLING) as scope:
        form = await checked_form(request)
        try:
            async with attempt(scope):
                if action == "checkout":
                    url = (await billing_service.start_checkout(scope, _field(form, "plan"))).url
                elif action == "portal":
                    url = (await billing_service.open_portal(scope)).url
                else:
                    raise NotFound("No such page.")
        except Problem as exc:
            if exc.status == 404:
                raise
            context = await _billing_context(scope, "")
            context["error"] = _problem_message(exc)
            return _render(request, "billing.html", context, status_code=exc.status, scope=scope)
        return _see_other(url)


# --- audit log ---------------------------------------------------------------------------


@router.get("/orgs/{org_id}/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request, org_id: uuid.UUID, action: str = "", cursor: str | None = None
) -> Response:
    async with org_page(request, org_id, READ_AUDIT) as scope:
        rows, next_cursor = await tenants_repository.list_audit_events(
            scope.session, cursor, PAGE_SIZE, action[:64] or None
        )
        more = urlencode({"action": action[:64], "cursor": next_cursor}) if next_cursor else None
        return _render(
            request, "audit.html", {"events": rows, "action": action, "more": more}, scope=scope
        )


# --- platform operators ------------------------------------------------------------------


async def require_operator(request: Request) -> Operator:
    """A signed-in superuser; anyone else is told the page does not exist."""
    user = await require_user(request)
    if not user.is_superuser:
        raise NotFound("No such page.")
    return Operator(user_id=user.id, email=user.email)


def _audited(operator: Operator, purpose: str, **detail: Any) -> Any:
    # The same door and audit record as the operator API.
    return ops_session(
        actor=operator.email,
        purpose=purpose,
        detail={"operator_id": str(operator.user_id), "via": "portal", **detail},
    )


@router.get("/operator", response_class=HTMLResponse)
async def operator_orgs(request: Request, q: str = "", cursor: str | None = None) -> Response:
    operator = await require_operator(request)
    query = q[:100] or None
    async with _audited(operator, "admin.orgs.list", q=query, cursor=cursor) as session:
        page = await admin_service.list_orgs(
            session, query=query, cursor=cursor, limit=PAGE_SIZE, today=_today()
        )
    more = urlencode({"q": q[:100], "cursor": page.next_cursor}) if page.next_cursor else None
    return _render(
        request, "operator_orgs.html", {"orgs": page.items, "q": q, "more": more, "user": operator}
    )


async def _operator_org_context(operator: Operator, org_id: uuid.UUID) -> dict[str, Any]:
    async with _audited(operator, "admin.orgs.read", org_id=str(org_id)) as session:
        org = await admin_service.get_org(session, org_id, _today())
        plans = await admin_service.list_plans(session)
    return {"o": org, "plans": plans, "user": operator}


@router.get("/operator/orgs/{org_id}", response_class=HTMLResponse)
async def operator_org(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    return _render(request, "operator_org.html", await _operator_org_context(operator, org_id))


@router.get("/operator/queues", response_class=HTMLResponse)
async def operator_queues(request: Request) -> Response:
    operator = await require_operator(request)
    now = datetime.now(UTC)
    async with _audited(operator, "admin.queues.read") as session:
        queued, workers = await admin_service.queues_and_workers(
            session, now, timedelta(minutes=WORKER_WINDOW_MINUTES)
        )
    by_queue: dict[str, int] = {}
    for row in queued:
        by_queue[row.queue] = by_queue.get(row.queue, 0) + int(row.jobs)
    return _render(
        request,
        "operator_queues.html",
        {
            "queued": queued,
            "by_queue": sorted(by_queue.items()),
            "workers": workers,
            "now": now,
            "window": WORKER_WINDOW_MINUTES,
            "user": operator,
        },
    )


_OPERATOR_GROUPS = ("org", "day", "operation")


@router.get("/operator/usage", response_class=HTMLResponse)
async def operator_usage(
    request: Request, group_by: str = "org", start: str = "", end: str = ""
) -> Response:
    """Usage across tenants, and Stripe's meter compared with what was sent."""
    operator = await require_operator(request)
    group = group_by if group_by in _OPERATOR_GROUPS else "org"
    first, last = _parse_day(start), _parse_day(end)
    error: str | None = None
    async with _audited(
        operator,
        "admin.usage.report",
        group_by=group,
        start=first.isoformat() if first else None,
        to=last.isoformat() if last else None,
    ) as session:
        try:
            report = await admin_service.usage_report(session, group, first, last, _today())  # type: ignore[arg-type]
        except Problem as exc:
            error = _problem_message(exc)
            report = await admin_service.usage_report(session, group, None, None, _today())  # type: ignore[arg-type]
    reconciliations = await billing_service.list_reconciliations(operator, None, None, PAGE_SIZE)
    return _render(
        request,
        "operator_usage.html",
        {
            "report": report,
            "group": group,
            "groups": _OPERATOR_GROUPS,
            "reconciliations": reconciliations,
            "error": error,
            "user": operator,
        },
    )


@router.post("/operator/orgs/{org_id}/suspension", response_class=HTMLResponse)
async def operator_suspension(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    form = await checked_form(request)
    suspend = _field(form, "action") == "suspend"
    purpose = "admin.orgs.suspend" if suspend else "admin.orgs.unsuspend"
    async with _audited(operator, purpose, org_id=str(org_id)) as session:
        await admin_service.set_suspended(session, operator, org_id, suspend, _today())
    return _see_other(f"{PREFIX}/operator/orgs/{org_id}")


@router.post("/operator/orgs/{org_id}/plan", response_class=HTMLResponse)
async def operator_plan(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    form = await checked_form(request)
    overrides: dict[str, Any] = {}
    for name in quotas.ORG_LIMITS:
        raw = _field(form, f"override_{name}")
        if raw == "unlimited":
            overrides[name] = None
        elif raw:
            overrides[name] = _number(raw)
    try:
        body = OrgPlanSet.model_validate({"plan": _field(form, "plan"), "overrides": overrides})
        async with _audited(
            operator, "admin.orgs.set_plan", org_id=str(org_id), **body.model_dump(mode="json")
        ) as session:
            await admin_service.set_org_plan(session, operator, org_id, body)
    except (ValidationError, Problem) as exc:
        context = await _operator_org_context(operator, org_id)
        context["error"] = (
            _validation_message(exc) if isinstance(exc, ValidationError) else _problem_message(exc)
        )
        status = exc.status if isinstance(exc, Problem) else 422
        return _render(request, "operator_org.html", context, status_code=status)
    ratelimits.forget(org_id)
    return _see_other(f"{PREFIX}/operator/orgs/{org_id}")
