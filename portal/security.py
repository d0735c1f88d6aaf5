"""The portal's browser protections: security headers, and CSRF tokens on every form.

CSRF follows the signed double-submit pattern: a random seed lives in its own cookie, and each
form carries an HMAC of it under the server's secret. A page of another site can neither read
the seed nor compute the token. The seed is renewed at sign-in and sign-out, so a token seen
before either is worthless after it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import FormData, MutableHeaders
from starlette.requests import Request, cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hiddenmodel.errors import Problem
from hiddenmodel.inputs import text_problem
from hiddenmodel.redis import async_redis
from hiddenmodel.security import server_keys
from hiddenmodel.settings import get_settings

PREFIX = "/portal"
CSRF_COOKIE = "hm_csrf"
CSRF_FIELD = "csrf_token"
# Billing forms redirect to Stripe Checkout and the customer portal; form-action covers the
# redirect too.
STRIPE_PAGES = "https://checkout.stripe.com https://billing.stripe.com"


class CsrfRefused(Problem):
    status, kind, title = 403, "csrf-refused", "Form refused"


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def content_security_policy() -> str:
    """No inline script or style anywhere; images may also come from the object store's
    presigned URLs (job inputs and outputs)."""
    images = " ".join(o for o in ("'self'", "data:", _origin(get_settings().s3_endpoint_url)) if o)
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src {images}; connect-src 'self'; form-action 'self' {STRIPE_PAGES}; "
        "frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )


def new_seed() -> str:
    return secrets.token_urlsafe(32)


def token_for(seed: str, secret: str | None = None) -> str:
    key = (secret or get_settings().secret_key.get_secret_value()).encode()
    return hmac.new(key, b"portal-csrf:" + seed.encode(), hashlib.sha256).hexdigest()


def _valid_token(sent: str, seed: str) -> bool:
    """Under any server key that verifies: a page rendered before a key rotation still posts."""
    return any(hmac.compare_digest(sent, token_for(seed, key)) for key in server_keys())


def csrf_token(request: Request) -> str:
    return token_for(request.state.csrf_seed)


def set_seed_cookie(headers: MutableHeaders, seed: str) -> None:
    secure = "; Secure" if get_settings().cookie_secure else ""
    headers.append(
        "set-cookie", f"{CSRF_COOKIE}={seed}; Path={PREFIX}; HttpOnly; SameSite=Lax{secure}"
    )


async def checked_form(request: Request) -> FormData:
    """The posted form, once its CSRF token matches this browser's seed; 403 otherwise."""
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not _valid_token(sent, request.state.csrf_seed):
        raise CsrfRefused(
            "This form is missing its security token or it has expired. "
            "Reload the page and send it again."
        )
    # Urlencoded forms were checked before routing (hiddenmodel.inputguard); a multipart
    # form's text fields are checked here, where they are first parsed.
    for name, value in form.multi_items():
        problem = text_problem(name) or (text_problem(value) if isinstance(value, str) else None)
        if problem:
            raise Problem(
                f"{name}: {problem}.",
                status=422,
                kind="validation-error",
                title="Validation error",
                errors=[{"loc": ["body", name], "msg": problem, "type": "text_refused"}],
            )
    return form


FORM_ONCE_FIELD = "form_once"
FORM_ONCE_TTL_SECONDS = 24 * 3600


def form_once() -> str:
    """A random value for a form whose effect must not repeat (it creates a secret)."""
    return secrets.token_urlsafe(16)


async def first_submission(form: FormData) -> bool:
    """True the first time a form's one-time value is seen: a reload or a double click that
    posts the same form again is told apart, and nothing is created twice."""
    value = form.get(FORM_ONCE_FIELD)
    if not isinstance(value, str) or not 16 <= len(value) <= 64:
        return True  # a client that sends none gets no protection, and no refusal
    key = f"portal:form-once:{hashlib.sha256(value.encode()).hexdigest()}"
    return bool(await async_redis().set(key, "1", nx=True, ex=FORM_ONCE_TTL_SECONDS))


class PortalMiddleware:
    """For ``/portal`` only: security headers on every response, and a CSRF seed cookie for
    browsers that have none (set on the response that first needs it)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        cookies: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookies.update(cookie_parser(value.decode("latin-1")))
        seed = cookies.get(CSRF_COOKIE)
        if seed is not None and len(seed) < 32:
            seed = None
        fresh = seed is None
        state: dict[str, Any] = scope.setdefault("state", {})
        state["csrf_seed"] = seed or new_seed()
        policy = content_security_policy()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"
                headers["Cross-Origin-Opener-Policy"] = "same-origin"
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
                if fresh and not state.get("csrf_seed_rotated"):
                    set_seed_cookie(headers, state["csrf_seed"])
            await send(message)

        await self.app(scope, receive, send_with_headers)
