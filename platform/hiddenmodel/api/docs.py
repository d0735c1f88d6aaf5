"""Interactive API docs (Swagger UI at /docs, ReDoc at /redoc) with their scripts and styles
served by the app itself, so the pages work without internet access.

FastAPI's default pages load their assets from a CDN; the assets here come from the
`fastapi-offline` package, which ships the Swagger UI and ReDoc bundles.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def with_policy(page: HTMLResponse) -> HTMLResponse:
    """Add a Content-Security-Policy that lets the page render from this server only.

    The pages' own inline scripts (Swagger UI's start-up call) are allowed by their hashes,
    so no other inline script can run; styles may be inline because both bundles inject
    theirs at run time, and ReDoc renders its search index in a ``blob:`` worker.
    """
    body = bytes(page.body).decode()
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(code.encode()).digest()).decode() + "'"
        for code in _INLINE_SCRIPT.findall(body)
    )
    page.headers["Content-Security-Policy"] = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
        "worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'; form-action 'self'"
    )
    return page


def install_docs(app: FastAPI) -> None:
    """Serve /docs and /redoc from local assets. Create the app with `docs_url=None,
    redoc_url=None` so FastAPI's CDN-backed pages are not registered as well."""
    openapi_url = app.openapi_url
    if openapi_url is None:
        return
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def base(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = base(request)
        return with_policy(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
                swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )
        )

    @app.get(OAUTH2_REDIRECT_URL, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return with_policy(get_swagger_ui_oauth2_redirect_html())

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = base(request)
        return with_policy(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                # Google Fonts is another external request; ReDoc falls back to local fonts.
                with_google_fonts=False,
            )
        )
