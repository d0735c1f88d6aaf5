"""Who is calling, and in which organization: principals, org scopes and permissions."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import Depends, Path, Request
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel import authguard, ratelimit
from hiddenmodel.db import (
    async_global_session,
    async_tenant_session,
    bind_org_with_first_statement,
    commit,
    fetch_one_statement,
    rollback,
)
from hiddenmodel.errors import Forbidden, NotFound, Problem, Unauthorized
from hiddenmodel.models import from_json
from hiddenmodel.security import InvalidToken, keyed_hashes, parse_token
from hiddenmodel.settings import get_settings
from hiddenmodel.tenancy import current_org_id, current_user_id
from tenants import repository, totp
from tenants.models import ApiKey, Organization, Role, Scope, User
from tenants.users import (
    COOKIE_NAME,
    SESSION_COOKIE_SCHEME,
    SESSION_SCHEME,
    HashedAccessTokenDatabase,
    UserDatabase,
    UserManager,
    get_database_strategy,
)

API_KEY_PREFIX = "hmk"
# The OpenAPI scheme name of organization API keys (see hiddenmodel.api.openapi).
API_KEY_SCHEME = "apiKey"

# Which credentials each authentication dependency accepts, by OpenAPI scheme name. The
# OpenAPI document derives each operation's security from the dependencies it runs: the
# schemes every registered dependency of the route accepts.
ACCEPTED_CREDENTIALS: dict[Callable[..., Any], frozenset[str]] = {}

_F = TypeVar("_F", bound=Callable[..., Any])


def accepts(*schemes: str) -> Callable[[_F], _F]:
    """Register the credentials an authentication dependency accepts (see above)."""

    def register(dependency: _F) -> _F:
        ACCEPTED_CREDENTIALS[dependency] = frozenset(schemes)
        return dependency

    return register


# Run for every request authenticated by an API key (rate limits), with a way to the key's
# session: called, it gives the request's session, bound to the key's organization (made on
# first use where the request has none yet). A hook must not open a session of its own (a
# request holding one connection while waiting for a second can starve the pool). Registered
# by the app factory, so identity stays below the domains that define those limits.
KeySession = Callable[[], AsyncSession]
API_KEY_HOOKS: list[Callable[[ApiKey, KeySession], Awaitable[None]]] = []


class Permission:
    """What an action needs: one of these member roles, or this API key scope."""

    def __init__(self, name: str, roles: frozenset[Role], scope: Scope) -> None:
        self.name, self.roles, self.scope = name, roles, scope


ANY_ROLE = frozenset(Role)
ADMINS = frozenset({Role.OWNER, Role.ADMIN})

READ_ORG = Permission("read_org", ANY_ROLE, Scope.JOBS_READ)
USAGE_READ = Permission(
    "usage_read", frozenset({Role.OWNER, Role.ADMIN, Role.BILLING}), Scope.USAGE_READ
)
JOBS_READ = Permission("jobs_read", ANY_ROLE, Scope.JOBS_READ)
JOBS_WRITE = Permission(
    "jobs_write", frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}), Scope.JOBS_WRITE
)
MANAGE_ORG = Permission("manage_org", ADMINS, Scope.ADMIN)
MANAGE_MEMBERS = Permission("manage_members", ADMINS, Scope.ADMIN)
MANAGE_API_KEYS = Permission("manage_api_keys", ADMINS, Scope.ADMIN)
READ_AUDIT = Permission("read_audit", ADMINS, Scope.ADMIN)


class OrganizationSuspended(Problem):
    status, kind, title = 403, "organization-suspended", "Organization suspended"


def require_not_suspended(org: Organization) -> None:
    """Refuse every request acting in a suspended organization."""
    if org.suspended_at is not None:
        raise OrganizationSuspended(
            "This organization is suspended by the platform operator; "
            "contact support to have it restored."
        )


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: a user (session token) or an API key bound to one org."""

    user: User | None = None
    api_key: ApiKey | None = None
    # An API key's organization, read with the key (one query fewer per request).
    key_org: Organization | None = None
    # The session the key was found in, bound to its organization; the request goes on in it.
    session: AsyncSession | None = None

    @property
    def user_id(self) -> uuid.UUID | None:
        return self.user.id if self.user else None

    @property
    def member_id(self) -> uuid.UUID | None:
        """The member a request counts against: the user, or the person who created the
        API key (usage by member and member sub-limits follow the key's creator)."""
        if self.user is not None:
            return self.user.id
        return self.api_key.created_by_id if self.api_key else None

    @property
    def api_key_id(self) -> uuid.UUID | None:
        return self.api_key.id if self.api_key else None

    @property
    def key_org_id(self) -> uuid.UUID | None:
        return self.api_key.organization_id if self.api_key else None

    @property
    def scopes(self) -> frozenset[str]:
        return frozenset(self.api_key.scopes) if self.api_key else frozenset()


def key_allows(key: ApiKey, permission: Permission) -> bool:
    """Whether an API key's scopes grant ``permission`` (``admin`` grants every one)."""
    return permission.scope.value in key.scopes or Scope.ADMIN.value in key.scopes


@dataclass
class OrgScope:
    """A request acting inside one organization, with its RLS-bound session."""

    org: Organization
    principal: Principal
    session: AsyncSession
    role: Role | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def org_id(self) -> uuid.UUID:
        return self.org.id

    def allows(self, permission: Permission) -> bool:
        if self.principal.api_key is not None:
            return key_allows(self.principal.api_key, permission)
        return self.role is not None and self.role in permission.roles

    def require(self, permission: Permission) -> None:
        if self.allows(permission):
            return
        if self.principal.api_key is not None:
            raise Forbidden(
                f"This API key lacks the '{permission.scope.value}' scope.",
                kind="missing-scope",
                required_scope=permission.scope.value,
            )
        raise Forbidden(
            "Your role in this organization does not allow this.",
            kind="insufficient-role",
            required_roles=sorted(r.value for r in permission.roles),
        )


# Methods a cross-site page cannot use to change anything (the cookie is SameSite=Lax too).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# A header a cross-site form cannot send, and a cross-site script only after a CORS preflight
# this API never grants: its presence shows the request comes from a page of this site.
CSRF_HEADER = "X-Requested-With"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def check_cookie_request(request: Request) -> None:
    """Cross-site request forgery: an unsafe request authenticated by the session cookie must
    come from this site, shown by an ``Origin`` of this server (or ``HM_PUBLIC_BASE_URL``) or
    by the :data:`CSRF_HEADER` header; a foreign ``Origin`` is refused whatever else is sent."""
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        own = {_origin(str(request.base_url)), _origin(get_settings().public_base_url)}
        if origin.lower() in own:
            return
        raise Forbidden(
            f"A request from {origin} cannot use this site's session cookie.",
            kind="csrf-check-failed",
        )
    if request.headers.get(CSRF_HEADER):
        return
    raise Forbidden(
        f"A request authenticated by the session cookie must send an Origin of this site or "
        f"the {CSRF_HEADER} header.",
        kind="csrf-check-failed",
    )


async def cookie_csrf(request: Request) -> None:
    """:func:`check_cookie_request` for routes whose authentication lives elsewhere
    (fastapi-users' own user and cookie routes): when the cookie is what authenticates."""
    route_name = getattr(request.scope.get("route"), "name", "")
    if route_name.endswith(".login"):  # takes a password; a cookie there authenticates nothing
        return
    if request.headers.get("authorization") is None and request.cookies.get(COOKIE_NAME):
        check_cookie_request(request)


def _bearer_value(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None for any other form."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    token = _bearer_value(header)
    if token is None:
        raise Unauthorized("The Authorization header must be 'Bearer <token>'.")
    return token


async def authenticate_api_key(
    session: AsyncSession, org_id: uuid.UUID, token: str
) -> tuple[ApiKey, Organization]:
    """Find a live key, and its organization, as the first statement of ``session``'s
    transaction, which binds it to ``org_id`` (the organization the token names)."""
    bind_org_with_first_statement(session)
    found = None
    for key_hash in keyed_hashes(token):  # a second try only while a key rotation is under way
        found = await repository.get_api_key_with_org(session, org_id, key_hash)
        if found is not None:
            break
    if found is None:
        raise Unauthorized("Unknown API key.", kind="invalid-api-key")
    key, org = found
    now = datetime.now(UTC)
    require_live_key(key, org, now)
    if _use_to_record(key, now) and await repository.touch_api_key(session, key.id, now):
        key.last_used_at = now
    return key, org


def require_live_key(key: ApiKey, org: Organization, now: datetime) -> None:
    """401 for a revoked or expired key, 403 when its organization is suspended."""
    if key.revoked_at is not None:
        raise Unauthorized("This API key has been revoked.", kind="api-key-revoked")
    if key.expires_at is not None and key.expires_at <= now:
        raise Unauthorized("This API key has expired.", kind="api-key-expired")
    require_not_suspended(org)


def _use_to_record(key: ApiKey, now: datetime) -> bool:
    """Whether this request records the key's use: last_used_at is kept at a coarse
    resolution, not one write per request (and the write is skipped while another request
    holds the row for the same purpose, so requests never queue on it)."""
    resolution = timedelta(seconds=get_settings().api_key_last_used_resolution_seconds)
    return key.last_used_at is None or now - key.last_used_at >= resolution


_FUNCTION_NAME = re.compile(r"hm_[a-z0-9_]+")


@dataclass(frozen=True)
class KeyRead:
    """What :func:`read_with_api_key` read: the live key, its organization, and the other
    columns of the function's row."""

    key: ApiKey
    org: Organization
    columns: tuple[Any, ...]


async def read_with_api_key(
    request: Request, permission: Permission, function: str, *args: Any
) -> KeyRead | None:
    """The request's API key and a read, in one statement outside any transaction:
    ``function(org, key_hash, *args)`` returns ``api_key`` and ``organization`` as
    ``hm_api_key_for_request`` does (which binds the organization for the rest of the
    statement) and then its own columns, and no row for an unknown key.

    For the hottest reads (a job polled while it runs): one round trip where the usual path
    (:func:`key_org_scope`) takes a BEGIN, the key, the read and a COMMIT. It covers only the
    plain case, a live key that holds ``permission`` and whose use need not be recorded now,
    and then runs the API-key hooks (rate limits) as the usual path does. Anything else is
    None, and the caller goes the usual way, which answers as it always has (401, 403, a
    refused credential counted, last_used_at written).
    """
    try:
        token = _bearer_token(request)
    except Unauthorized:
        return None
    if token is None or not token.startswith(API_KEY_PREFIX + "_"):
        return None
    try:
        parsed = parse_token(token, API_KEY_PREFIX)
    except InvalidToken:
        return None
    if not _FUNCTION_NAME.fullmatch(function):
        raise ValueError(f"not a function of ours: {function!r}")
    placeholders = ", ".join("%s" for _ in range(2 + len(args)))
    sql = f"SELECT * FROM {function}({placeholders})"  # noqa: S608 - checked just above
    row = None
    try:
        for key_hash in keyed_hashes(token):  # a second try only while a key rotation is under way
            row = await fetch_one_statement(sql, (parsed.org_id, key_hash, *args))
            if row is not None:
                break
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return None  # a dropped connection: the usual way, on a fresh one, answers as it would
    if row is None:
        return None
    key, org = from_json(ApiKey, row[0]), from_json(Organization, row[1])
    now = datetime.now(UTC)
    try:
        require_live_key(key, org, now)
    except Problem:
        return None
    if _use_to_record(key, now) or not key_allows(key, permission):
        return None
    if API_KEY_HOOKS:
        # No connection is held here; a hook that needs one (a rate limit not yet cached)
        # gets a session bound to the key's organization, made then: usually none is.
        made: list[AsyncSession] = []

        def key_session() -> AsyncSession:
            if not made:
                made.append(async_tenant_session(org.id))
            return made[0]

        try:
            for hook in API_KEY_HOOKS:
                await hook(key, key_session)
            if made and made[0].in_transaction():
                await commit(made[0])
        except BaseException:
            if made and made[0].in_transaction():
                await rollback(made[0])
            raise
        finally:
            if made:
                await made[0].close()
    return KeyRead(key, org, tuple(row[2:]))


def request_token(request: Request) -> str | None:
    """The session token a request authenticates with (bearer or cookie), if any."""
    header = request.headers.get("authorization")
    if header:
        return _bearer_value(header)
    return request.cookies.get(COOKIE_NAME) or None


async def refused_credentials() -> None:
    """A request's credentials failed: it counts against its client address, both as a
    request without credentials and as a guess (429 once the address must wait)."""
    await authguard.refuse_credentials()
    await ratelimit.enforce_for_address()


# Paths that answer without credentials and must not be throttled by address: load
# balancers' probes, and Stripe's signed events (a few Stripe addresses send them all).
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/v1/stripe/webhook"})
# Path prefixes of pages that read the session cookie themselves (the portal registers its
# own): the user is read before the page, counted per user, and handed to the page in
# ``request.state.session_user``; without a working cookie, the request counts per address.
SESSION_PATH_PREFIXES: list[str] = []
# Dependencies that authenticate a route besides those in ACCEPTED_CREDENTIALS (fastapi-users'
# own user routes register theirs).
AUTHENTICATING_DEPENDENCIES: set[Callable[..., Any]] = set()
_route_authenticates: dict[tuple[str, frozenset[str]], bool] = {}


def _authenticates(route: Any) -> bool:
    """Whether a route checks credentials (and so counts the request by whom they name)."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return False
    key = (str(getattr(route, "path", "")), frozenset(getattr(route, "methods", None) or ()))
    known = _route_authenticates.get(key)
    if known is None:
        calls: list[Callable[..., Any]] = []
        pending = list(dependant.dependencies)
        while pending:
            sub = pending.pop()
            if sub.call is not None:
                calls.append(sub.call)
            pending.extend(sub.dependencies)
        known = _route_authenticates[key] = any(
            c in ACCEPTED_CREDENTIALS or c in AUTHENTICATING_DEPENDENCIES for c in calls
        )
    return known


def _sends_credentials(request: Request) -> bool:
    return request.headers.get("authorization") is not None or bool(
        request.cookies.get(COOKIE_NAME)
    )


async def limit_uncredentialed(request: Request) -> None:
    """Every route: a request is rate limited by client address unless the route checks the
    credentials it sends (those count it by API key or user, or by address when they fail).
    Credentials sent to a route that never looks at them buy nothing."""
    path = request.url.path
    if path in UNLIMITED_PATHS:
        return
    if any(path.startswith(prefix) for prefix in SESSION_PATH_PREFIXES):
        # Read the cookie once here; the page takes the user from request.state.
        user = await cookie_session_user(request)
        request.state.session_user = user
        if user is not None:
            await ratelimit.enforce_for_user(user.id)
            return
    elif _sends_credentials(request) and _authenticates(request.scope.get("route")):
        return
    await ratelimit.enforce_for_address()


async def cookie_session_user(request: Request) -> User | None:
    """The active user of the session cookie, or None (no cookie, expired, inactive)."""
    token = request.cookies.get(COOKIE_NAME)
    if not token:
        return None
    async with async_global_session() as session:
        strategy = get_database_strategy(HashedAccessTokenDatabase(session))
        user = await strategy.read_token(token, UserManager(UserDatabase(session)))
        await commit(session)  # nothing written; unlike a rollback, keeps `user` loaded
    if user is None or not user.is_active:
        return None
    # The request's later global transactions act for this user (app.user_id).
    current_user_id.set(user.id)
    return user


@asynccontextmanager
async def authenticated(request: Request) -> AsyncIterator[Principal]:
    """Bearer API key (``hmk_…``), bearer session token, or the session cookie (unsafe methods
    checked by :func:`check_cookie_request`); 401 otherwise.

    An API key is looked up in a session bound to the organization its token names, and that
    session, with its open transaction, serves the rest of the request (see
    :func:`open_org_scope`): one transaction per request, committed before the response.
    """
    try:
        token = _bearer_token(request)
    except Unauthorized:
        await refused_credentials()
        raise
    if token is None:
        token = request.cookies.get(COOKIE_NAME)
        if not token:
            raise Unauthorized("Send 'Authorization: Bearer <API key or session token>'.")
        check_cookie_request(request)
        if token.startswith(API_KEY_PREFIX + "_"):
            await refused_credentials()
            raise Unauthorized("The session cookie carries a session, not an API key.")
    if token.startswith(API_KEY_PREFIX + "_"):
        try:
            parsed = parse_token(token, API_KEY_PREFIX)
        except InvalidToken as exc:
            await refused_credentials()
            raise Unauthorized("Unknown API key.", kind="invalid-api-key") from exc
        async with async_tenant_session(parsed.org_id) as key_session:
            try:
                try:
                    key, org = await authenticate_api_key(key_session, parsed.org_id, token)
                except Unauthorized:
                    await refused_credentials()
                    raise
                for hook in API_KEY_HOOKS:
                    await hook(key, lambda: key_session)
                yield Principal(api_key=key, key_org=org, session=key_session)
                # Already committed by the org scope when the route had one.
                await commit(key_session)
            except BaseException:
                await rollback(key_session)
                raise
        return
    # Session tokens only: API-key requests never build the account machinery. The read has
    # its own short transaction: its connection goes back to the pool at once instead of
    # waiting beside the organization's session for the rest of the request.
    async with async_global_session() as session:
        strategy = get_database_strategy(HashedAccessTokenDatabase(session))
        user = await strategy.read_token(token, UserManager(UserDatabase(session)))
        await commit(session)  # nothing written; unlike a rollback, keeps `user` loaded
    if user is None or not user.is_active:
        await refused_credentials()
        raise Unauthorized("The session token is invalid or has expired.", kind="invalid-token")
    # The request's later global transactions act for this user (app.user_id).
    current_user_id.set(user.id)
    await ratelimit.enforce_for_user(user.id)
    yield Principal(user=user)


@accepts(API_KEY_SCHEME, SESSION_SCHEME, SESSION_COOKIE_SCHEME)
async def current_principal(request: Request) -> AsyncIterator[Principal]:
    async with authenticated(request) as principal:
        yield principal


# scope="function": the API key's transaction ends before the response is sent.
CurrentPrincipal = Annotated[Principal, Depends(current_principal, scope="function")]


@accepts(SESSION_SCHEME, SESSION_COOKIE_SCHEME)
async def require_user(principal: CurrentPrincipal) -> User:
    if principal.user is None:
        raise Forbidden("This action needs a signed-in user, not an API key.", kind="user-required")
    return principal.user


CurrentUser = Annotated[User, Depends(require_user)]


@asynccontextmanager
async def _org_session(org_id: uuid.UUID, principal: Principal) -> AsyncIterator[AsyncSession]:
    """The API key's own session (already in this org's transaction), or a new one."""
    if principal.session is not None:
        yield principal.session
        return
    async with async_tenant_session(org_id) as session:
        yield session


@asynccontextmanager
async def open_org_scope(org_id: uuid.UUID, principal: Principal) -> AsyncIterator[OrgScope]:
    """Enter ``org_id`` for the request: RLS session, membership check, commit at the end.

    Anything that does not prove access answers 404, so no one learns that another
    organization exists.
    """
    if principal.api_key is not None and principal.key_org_id != org_id:
        raise NotFound("No such organization.")
    token = current_org_id.set(org_id)
    try:
        async with _org_session(org_id, principal) as session:
            org = principal.key_org or await repository.get_organization(session, org_id)
            if org is None:
                raise NotFound("No such organization.")
            role: Role | None = None
            if principal.user is not None:
                membership = await repository.get_membership(session, principal.user.id)
                if membership is None:
                    raise NotFound("No such organization.")
                role = Role(membership.role)
            require_not_suspended(org)
            # People, not API keys: an organization may require two-factor sign-in.
            if (
                principal.user is not None
                and org.require_two_factor
                and not await totp.has_totp(session, principal.user.id)
            ):
                raise totp.two_factor_required()
            try:
                yield OrgScope(org=org, principal=principal, session=session, role=role)
                await commit(session)
            except BaseException:
                await rollback(session)
                raise
    finally:
        current_org_id.reset(token)


# The org scopes authenticate by themselves rather than depend on CurrentPrincipal: one
# dependency layer fewer on every request (a route takes an org scope or a principal).


@accepts(API_KEY_SCHEME, SESSION_SCHEME, SESSION_COOKIE_SCHEME)
async def org_scope_from_path(
    request: Request,
    org_id: Annotated[uuid.UUID, Path(description="Organization id")],
) -> AsyncIterator[OrgScope]:
    async with authenticated(request) as principal, open_org_scope(org_id, principal) as scope:
        yield scope


@asynccontextmanager
async def key_org_scope(request: Request) -> AsyncIterator[OrgScope]:
    """The API key's organization, for routes without an org in the path: authenticate, then
    enter the organization (403 ``api-key-required`` for any other credential)."""
    async with authenticated(request) as principal:
        if principal.api_key is None:
            raise Forbidden(
                "This endpoint acts in an API key's organization: authenticate with an API key.",
                kind="api-key-required",
            )
        async with open_org_scope(principal.api_key.organization_id, principal) as scope:
            yield scope


@accepts(API_KEY_SCHEME)
async def org_scope_from_key(request: Request) -> AsyncIterator[OrgScope]:
    """Routes without an org in the path act in the API key's organization."""
    async with key_org_scope(request) as scope:
        yield scope


# scope="function": commit before the response is sent (see GlobalSessionDep).
OrgScopeDep = Annotated[OrgScope, Depends(org_scope_from_path, scope="function")]
KeyOrgScopeDep = Annotated[OrgScope, Depends(org_scope_from_key, scope="function")]


# The permission each permission dependency checks (see :func:`requires`): the OpenAPI
# document lists it for every route that runs one (``x-required-scopes``, ``x-required-roles``).
REQUIRED_PERMISSIONS: dict[Callable[..., Any], Permission] = {}


@functools.cache
def requires(
    permission: Permission, *, key_org: bool = False
) -> Callable[[OrgScope], Awaitable[OrgScope]]:
    """A dependency: the request's org scope, once it holds ``permission`` (403
    ``missing-scope`` or ``insufficient-role`` otherwise). The organization is the path's
    ``{org_id}``, or with ``key_org`` the API key's own. One dependency per permission and
    organization source, so a route that runs it twice checks once."""

    async def in_path_org(scope: OrgScopeDep) -> OrgScope:
        scope.require(permission)
        return scope

    async def in_key_org(scope: KeyOrgScopeDep) -> OrgScope:
        scope.require(permission)
        return scope

    dependency = in_key_org if key_org else in_path_org
    REQUIRED_PERMISSIONS[dependency] = permission
    return dependency


# A route takes the org scope through the permission it needs: ``scope: ManageMembers``.
ReadOrg = Annotated[OrgScope, Depends(requires(READ_ORG))]
ManageOrg = Annotated[OrgScope, Depends(requires(MANAGE_ORG))]
ManageMembers = Annotated[OrgScope, Depends(requires(MANAGE_MEMBERS))]
ManageApiKeys = Annotated[OrgScope, Depends(requires(MANAGE_API_KEYS))]
ReadAudit = Annotated[OrgScope, Depends(requires(READ_AUDIT))]
UsageRead = Annotated[OrgScope, Depends(requires(USAGE_READ))]
# In the API key's organization (routes without ``{org_id}``).
KeyJobsRead = Annotated[OrgScope, Depends(requires(JOBS_READ, key_org=True))]
KeyJobsWrite = Annotated[OrgScope, Depends(requires(JOBS_WRITE, key_org=True))]
KeyUsageRead = Annotated[OrgScope, Depends(requires(USAGE_READ, key_org=True))]
