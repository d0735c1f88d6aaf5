"""Security headers on every answer of the API.

* ``X-Content-Type-Options: nosniff`` so a browser never runs an answer (a problem document, an
  uploaded image served back) as something else than its declared type;
* ``Referrer-Policy: no-referrer``: links out of API answers and docs leak no URL;
* ``X-Frame-Options: DENY``: no API answer is meant to be framed;
* ``Cache-Control: no-store`` on every answer to an authenticated request (a bearer token or
  the session cookie), unless the route chose its own: tenant data never lands in a shared or
  disk cache.

Headers a route or an inner middleware already set (the portal's own, a download's caching)
are left as they are. The docs pages carry their own Content-Security-Policy
(:mod:`hiddenmodel.api.docs`).
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SESSION_COOKIE = b"hm_session="

DEFAULT_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _authenticated(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization" or (name == b"cookie" and SESSION_COOKIE in value):
            return True
    return False


class SecurityHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authenticated = _authenticated(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in DEFAULT_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
                if authenticated and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
