"""Refuse, for every route at once, request text the database cannot store: the path, each
query parameter, and each field of an urlencoded form post (the login form, the portal's
forms). A refusal is a 422 problem whose ``errors`` name the parameter, like a validation
error; the route never runs.

JSON bodies are checked by their schemas (:class:`hiddenmodel.inputs.RequestModel`) and
multipart fields by their annotated types, where the field's name is known.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hiddenmodel.errors import problem_response
from hiddenmodel.inputs import text_problem

FORM_MEDIA_TYPE = b"application/x-www-form-urlencoded"


def _first_problem(pairs: list[tuple[str, str]], where: str) -> dict[str, Any] | None:
    for name, value in pairs:
        for text in (name, value):
            problem = text_problem(text)
            if problem:
                return {"loc": [where, name], "msg": problem, "type": "text_refused"}
    return None


def _pairs(raw: bytes) -> list[tuple[str, str]]:
    return parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="utf-8")


class InputGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error: dict[str, Any] | None = None
        # Starlette has already decoded the path; the raw form is checked as well so an
        # encoded character in a path parameter is named the same way.
        raw_path = scope.get("raw_path")
        path = unquote(raw_path.decode("latin-1")) if raw_path else scope["path"]
        problem = text_problem(path) or text_problem(scope["path"])
        if problem:
            error = {"loc": ["path"], "msg": problem, "type": "text_refused"}
        if error is None and scope.get("query_string"):
            error = _first_problem(_pairs(scope["query_string"]), "query")
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            content_type = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if content_type.split(b";")[0].strip().lower() == FORM_MEDIA_TYPE:
                body, receive = await _buffered(receive)
                error = _first_problem(_pairs(body), "body")
        if error is not None:
            response = problem_response(
                422,
                "validation-error",
                "Validation error",
                f"{error['loc'][-1]}: {error['msg']}.",
                errors=[error],
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _buffered(receive: Receive) -> tuple[bytes, Receive]:
    """Read the whole body (bounded by the body size limit outside this middleware) and a
    ``receive`` that hands it to the app again."""
    chunks: list[bytes] = []
    messages: list[Message] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break

    async def replay() -> Message:
        if messages:
            return messages.pop(0)
        return await receive()

    return b"".join(chunks), replay
