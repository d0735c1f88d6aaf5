"""RFC 9457 problem details: one stable ``type`` per kind of error."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException

from hiddenmodel.requestid import current_request_id
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)

PROBLEM_BASE = "https://hiddenmodel.dev/problems/"
PROBLEM_MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An error the client can act on. ``kind`` becomes the stable ``type`` URI."""

    status: int = 400
    kind: str = "bad-request"
    title: str = "Bad request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        status: int | None = None,
        kind: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title or self.title)
        self.detail = detail
        if status is not None:
            self.status = status
        if kind is not None:
            self.kind = kind
        if title is not None:
            self.title = title
        self.headers = headers or {}
        self.extra = extra


class NotFound(Problem):
    status, kind, title = 404, "not-found", "Not found"


class Unauthorized(Problem):
    status, kind, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class Forbidden(Problem):
    status, kind, title = 403, "forbidden", "Forbidden"


class Conflict(Problem):
    status, kind, title = 409, "conflict", "Conflict"


class Gone(Problem):
    status, kind, title = 410, "gone", "Gone"


def problem_response(
    status: int,
    kind: str,
    title: str,
    detail: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {"type": PROBLEM_BASE + kind, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    request_id = current_request_id.get()
    if request_id:
        body["request_id"] = request_id
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


_STATUS_KINDS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Validation error"),
    429: ("rate-limited", "Too many requests"),
}


async def _problem_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return problem_response(exc.status, exc.kind, exc.title, exc.detail, exc.headers, **exc.extra)


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    if any(e["type"] == "json_invalid" for e in errors):
        return problem_response(
            400, "malformed-json", "Malformed JSON", "The request body is not valid JSON."
        )
    return problem_response(
        422, "validation-error", "Validation error", "The request is not valid.", errors=errors
    )


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind, title = _STATUS_KINDS.get(exc.status_code, ("http-error", "HTTP error"))
    detail: str | None = None
    extra: dict[str, Any] = {}
    # fastapi-users raises HTTPException with a machine-readable code as detail.
    raw: Any = exc.detail  # fastapi-users passes a dict here despite the str annotation
    if isinstance(raw, str):
        if raw.isupper() and " " not in raw:
            kind = raw.lower().replace("_", "-")
            detail = raw.replace("_", " ").capitalize() + "."
        else:
            detail = raw
    elif isinstance(raw, dict):
        code = raw.get("code")
        if isinstance(code, str):
            kind = code.lower().replace("_", "-")
        reason = raw.get("reason")
        detail = str(reason) if reason else None
    return problem_response(exc.status_code, kind, title, detail, dict(exc.headers or {}), **extra)


# A dependency that cannot be reached, or dropped the connection mid-request (a restart): the
# request is refused as a whole (its transaction rolled back, what it stored deleted by its
# owner), so trying again later is safe.
DATABASE_UNAVAILABLE: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,
)
BROKER_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


async def _unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    database = isinstance(exc, DATABASE_UNAVAILABLE)
    kind = "database-unavailable" if database else "broker-unavailable"
    what = "database" if database else "queue"
    if isinstance(exc, sa_exc.StatementError) and exc.statement is not None:
        log.warning("%s: %s", kind, database_error_summary(exc))
    else:  # a connection that failed: its message names the server, not a row
        log.warning("%s: %s", kind, getattr(exc, "orig", None) or exc)
    retry = get_settings().dependency_retry_after_seconds
    return problem_response(
        503,
        kind,
        "Service unavailable",
        f"The {what} is unavailable for a moment; retry in {retry} s.",
        {"Retry-After": str(retry)},
    )


def database_error_summary(exc: sa_exc.StatementError) -> str:
    """What went wrong in a statement, without its parameters or the server's detail.

    A parameter may be a password hash or a token hash, and the server's detail may quote
    the failing row or key: neither goes to a log. The SQLSTATE, the constraint and the
    statement's text (placeholders, not values) say enough to find the fault.
    """
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    facts = {
        "sqlstate": getattr(orig, "sqlstate", None),
        "table": getattr(diag, "table_name", None),
        "column": getattr(diag, "column_name", None),
        "constraint": getattr(diag, "constraint_name", None),
    }
    known = ", ".join(f"{k} {v}" for k, v in facts.items() if v)
    return f"{type(orig or exc).__name__} ({known}) in statement: {exc.statement}"


async def _unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, sa_exc.StatementError):
        # Not log.exception: the exception's text carries the server's detail (a failing
        # row, a key's values) and its chained driver error says it again.
        log.error(
            "unhandled database error: %s\n%s",
            database_error_summary(exc),
            "".join(traceback.format_tb(exc.__traceback__)),
        )
    else:
        log.exception("unhandled error", exc_info=exc)
    return problem_response(500, "internal-error", "Internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    for unavailable in (*DATABASE_UNAVAILABLE, *BROKER_UNAVAILABLE):
        app.add_exception_handler(unavailable, _unavailable_handler)
    app.add_exception_handler(Exception, _unhandled_handler)


PROBLEM_RESPONSE_SCHEMA: dict[str, Any] = {
    "content": {
        PROBLEM_MEDIA_TYPE: {
            "schema": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "format": "uri"},
                    "title": {"type": "string"},
                    "status": {"type": "integer"},
                    "detail": {"type": "string"},
                    "request_id": {"type": "string"},
                },
                "required": ["type", "title", "status"],
            },
            "example": {
                "type": PROBLEM_BASE + "not-found",
                "title": "Not found",
                "status": 404,
                "detail": "No such organization.",
            },
        }
    },
    "description": "Problem details (RFC 9457)",
}
