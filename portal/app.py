"""Mounting the portal on the API's app: its pages, static files, headers and error pages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from hiddenmodel.errors import Problem
from portal import account, batches, operator, tenant
from portal.security import PREFIX, PortalMiddleware, csrf_token
from portal.web import HERE, SignInRequired, router, templates
from tenants.auth import SESSION_PATH_PREFIXES

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _status_and_message(exc: Exception) -> tuple[int, str]:
    if isinstance(exc, Problem):
        return exc.status, exc.detail or exc.title
    if isinstance(exc, RequestValidationError):
        # A malformed id in a path is an object that does not exist.
        return 404, "This page does not exist."
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, "This page does not exist." if exc.status_code == 404 else str(
            exc.detail
        )
    return 500, "Something went wrong on our side."


def _portal_errors(api_handler: Handler) -> Handler:
    """Inside the portal an error is a page a person reads; elsewhere the API's answer."""

    async def handle(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(PREFIX):
            return await api_handler(request, exc)
        status, message = _status_and_message(exc)
        if status >= 500:
            await api_handler(request, exc)  # logged as the API logs it
        return templates.TemplateResponse(
            request,
            "error.html",
            {
                "status": status,
                "message": message,
                "csrf_token": csrf_token(request),
                # An organization that requires two-factor: where to turn it on.
                "enroll_url": f"{PREFIX}/account#two-factor"
                if isinstance(exc, Problem) and exc.kind == "two-factor-required"
                else None,
            },
            status_code=status,
        )

    return handle


async def _sign_in(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': exc.next_url})}", 303)


# Importing the page modules registers their routes on ``router``.
PAGES = (account, tenant, batches, operator)


def install_portal(app: FastAPI) -> None:
    """Add the portal to ``app``; call after the API's error handlers are installed."""
    app.include_router(router)
    if PREFIX not in SESSION_PATH_PREFIXES:
        SESSION_PATH_PREFIXES.append(PREFIX)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="portal-static")
    for kind in (Problem, RequestValidationError, StarletteHTTPException, Exception):
        api_handler = app.exception_handlers[kind]
        app.add_exception_handler(kind, _portal_errors(api_handler))  # type: ignore[arg-type]
    app.add_exception_handler(SignInRequired, _sign_in)
    app.add_middleware(PortalMiddleware)
