"""The composition root: builds the ASGI app from every domain's router. Nothing imports it."""

from __future__ import annotations

import gc
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from enum import Enum

from fastapi import APIRouter, Depends, FastAPI
from fastapi.routing import APIRoute
from sqlalchemy.orm import configure_mappers
from starlette.formparsers import MultiPartParser
from starlette.routing import Match
from starlette.types import Scope

from hiddenmodel import __version__, storage
from hiddenmodel.admin.router import router as admin_router
from hiddenmodel.api import health
from hiddenmodel.api.docs import install_docs
from hiddenmodel.api.openapi import install_openapi_security
from hiddenmodel.batches.router import router as batches_router
from hiddenmodel.billing.router import router as billing_router
from hiddenmodel.bodylimit import BodySizeLimitMiddleware
from hiddenmodel.clientip import ClientAddressMiddleware
from hiddenmodel.db import dispose_engines
from hiddenmodel.errors import PROBLEM_RESPONSE_SCHEMA, install_error_handlers
from hiddenmodel.inputguard import InputGuardMiddleware
from hiddenmodel.jobs.router import router as jobs_router
from hiddenmodel.metrics import MetricsMiddleware, metrics_endpoint, register_queue_metrics
from hiddenmodel.ratelimit import RateLimitHeadersMiddleware
from hiddenmodel.redis import close_redis
from hiddenmodel.requestid import RequestIdMiddleware
from hiddenmodel.retention.router import router as retention_router
from hiddenmodel.securityheaders import SecurityHeadersMiddleware
from hiddenmodel.settings import get_settings
from hiddenmodel.usage.ratelimits import enforce_for_key
from hiddenmodel.usage.reports_router import router as usage_reports_router
from hiddenmodel.usage.router import router as usage_router
from hiddenmodel.webhooks.router import router as webhooks_router
from portal.app import install_portal
from tenants.account_router import router as account_router
from tenants.auth import (
    API_KEY_HOOKS,
    AUTHENTICATING_DEPENDENCIES,
    cookie_csrf,
    limit_uncredentialed,
)
from tenants.router import router as tenants_router
from tenants.schemas import UserRead, UserUpdate
from tenants.users import bearer_backend, cookie_backend, fastapi_users, limit_signed_in_user


def _operation_id(route: APIRoute) -> str:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", route.name) if w]
    return words[0].lower() + "".join(w[:1].upper() + w[1:] for w in words[1:])


JSON_BODY_LIMIT = 1024 * 1024
# A job carries up to three images (image, mask, interior) plus form fields.
UPLOAD_OVERHEAD = 64 * 1024
# How much of one uploaded file the multipart parser keeps in memory before it spills to a
# temporary file (Starlette's parser reads it from its class). Starlette's 1 MiB spilled most
# photos, and past it every chunk of the body, as it arrived, was written from the thread pool,
# and read back from it. The handlers read a job's images whole anyway; batch archives (up to
# batch_max_upload_bytes) still spill past this.
UPLOAD_MEMORY_BYTES = 16 * 1024 * 1024


def _body_limit(max_upload_bytes: int) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        if path == "/v1/jobs":
            return 3 * max_upload_bytes + UPLOAD_OVERHEAD
        if path.startswith("/v1/batches/") and path.endswith("/items"):
            return get_settings().batch_max_upload_bytes + UPLOAD_OVERHEAD
        if path.startswith("/portal/orgs/") and path.endswith("/batches"):
            # The portal's batch form: the same upload as the API's, with its form fields.
            return get_settings().batch_max_upload_bytes + UPLOAD_OVERHEAD
        return JSON_BODY_LIMIT

    return limit_for


def _freeze_startup_objects() -> None:
    """Keep the garbage collector off what the process holds for good, and off requests'
    short-lived objects.

    What a started process holds (modules, classes, the ORM's mappers, the S3 client's service
    model: some 200,000 objects) is frozen, out of every collection; before, a full collection
    walked all of it every few hundred requests, a pause of 100 to 150 ms in one of them. The
    youngest generation collects after 10,000 allocations instead of 700, so a request's own
    objects are not carried into older generations while it runs (and a listing spends less
    time collecting)."""
    configure_mappers()
    storage.s3_client()
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


# A path no route has: matching it makes every route look at it.
_NO_ROUTE_PATH = "/.hm-no-route"


def build_routes(app: FastAPI) -> None:
    """Have FastAPI build every route now, not on the request that first reaches it.

    FastAPI works out a route's dependencies, parameters and response model the first time
    the router matches a request against it, and the first request to an included router is
    matched against all of its routes: some 250 ms, paid by whichever request comes first
    after a start. Matching a path that no route has against every route, as the router
    does (nothing is dispatched, logged or counted), makes that first match here, before the
    process takes traffic."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": _NO_ROUTE_PATH,
        "raw_path": _NO_ROUTE_PATH.encode("ascii"),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "client": None,
        "server": None,
    }
    for route in app.router.routes:
        match, _ = route.matches(dict(scope))
        if match is not Match.NONE:  # nothing is built past a match: another path is needed
            raise RuntimeError(f"a route matches {_NO_ROUTE_PATH}: {route!r}")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    build_routes(app)  # before the freeze: what it builds is held for good
    _freeze_startup_objects()
    yield
    await close_redis()
    await dispose_engines()


def _without(router: APIRouter, *names: str) -> APIRouter:
    """fastapi-users' router less the routes this project serves itself (account_router)."""
    router.routes = [r for r in router.routes if getattr(r, "name", None) not in names]
    return router


def create_app() -> FastAPI:
    # Settings refuse development-only switches in production (Settings' own validation).
    settings = get_settings()
    MultiPartParser.spool_max_size = UPLOAD_MEMORY_BYTES
    app = FastAPI(
        title="Hidden Model API",
        version=__version__,
        description=(
            "Ghost-mannequin product images. Authenticate with `Authorization: Bearer <key>` "
            "(an organization API key) or a session token from `POST /v1/auth/login`. "
            "Each operation lists the credentials it accepts (`security`) and the API key "
            "scopes it needs (`x-required-scopes`). Errors are `application/problem+json`."
        ),
        generate_unique_id_function=_operation_id,
        responses={"4XX": PROBLEM_RESPONSE_SCHEMA},
        lifespan=_lifespan,
        # Served by install_docs from local assets instead of FastAPI's CDN-backed pages.
        docs_url=None,
        redoc_url=None,
        # Requests without credentials are rate limited by client address on every route.
        dependencies=[Depends(limit_uncredentialed)],
    )
    install_error_handlers(app)

    # Routes are matched in order: the busiest endpoint (job submit and polling) first.
    app.include_router(jobs_router)
    app.include_router(batches_router)
    auth_tags: list[str | Enum] = ["auth"]
    app.include_router(account_router)
    app.include_router(
        fastapi_users.get_auth_router(bearer_backend), prefix="/v1/auth", tags=auth_tags
    )
    app.include_router(
        fastapi_users.get_auth_router(cookie_backend),
        prefix="/v1/auth/cookie",
        tags=auth_tags,
        dependencies=[Depends(cookie_csrf)],
    )
    app.include_router(
        _without(fastapi_users.get_reset_password_router(), "reset:forgot_password"),
        prefix="/v1/auth",
        tags=auth_tags,
    )
    app.include_router(
        _without(fastapi_users.get_verify_router(UserRead), "verify:request-token"),
        prefix="/v1/auth",
        tags=auth_tags,
    )
    app.include_router(
        _without(
            fastapi_users.get_users_router(UserRead, UserUpdate),
            "users:current_user",
            "users:patch_current_user",
        ),
        prefix="/v1/users",
        tags=["users"],
        dependencies=[Depends(cookie_csrf), Depends(limit_signed_in_user)],
    )
    app.include_router(tenants_router)
    app.include_router(usage_router)
    app.include_router(retention_router)
    app.include_router(billing_router)
    app.include_router(usage_reports_router)
    app.include_router(admin_router)
    app.include_router(webhooks_router)
    if enforce_for_key not in API_KEY_HOOKS:
        API_KEY_HOOKS.append(enforce_for_key)
    AUTHENTICATING_DEPENDENCIES.add(limit_signed_in_user)
    app.include_router(health.router)
    register_queue_metrics()
    app.add_route("/metrics", metrics_endpoint, include_in_schema=False)
    install_docs(app)
    install_portal(app)
    install_openapi_security(app)

    # Innermost: reads a form body only once the size limit has let it through.
    app.add_middleware(InputGuardMiddleware)
    app.add_middleware(BodySizeLimitMiddleware, limit_for=_body_limit(settings.max_upload_bytes))
    app.add_middleware(RateLimitHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(ClientAddressMiddleware)
    # Outermost: every answer gets the headers, refusals of the middlewares above included.
    app.add_middleware(SecurityHeadersMiddleware)
    return app
