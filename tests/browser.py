"""Debian's chromium for the browser tests (Playwright drives it; nothing is downloaded),
the portal served as its own process, and what the browser tests share: accounts and
organizations made through the API, signing in, screenshots. Registered as a plugin by
``tests/conftest.py``, so its fixtures serve every browser test module."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import PASSWORD, db_rows

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing (scripts/lib.sh ensure_chromium installs it)")
    pytest.skip(f"no {CHROMIUM}: install it with `apt-get install -y chromium`")


SCREENSHOTS = Path(__file__).resolve().parents[1] / "var" / "portal-screenshots"


@pytest.fixture(scope="module")
def live_portal(s3: None) -> Iterator[str]:
    """The API (and with it the portal) as its own process on a loopback port."""
    require_chromium()
    from tests.conftest import _free_port
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel("api-portal", "api", "--port", str(port), "--workers", "1")
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


class Browser:
    """One chromium profile that reaches only 127.0.0.1 and records every problem a page
    reports: uncaught script errors and console errors."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.problems: list[str] = []
        self.blocked: list[str] = []
        self.page = self.new_page()

    def new_page(self) -> Any:
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.problems.append(f"pageerror {exc}"))
        page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console {msg.text} at {page.url}")
                if msg.type == "error"
                else None
            ),
        )
        # Destructive actions ask first; the person agrees.
        page.on("dialog", lambda dialog: dialog.accept())
        return page


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[], Browser]]:
    from playwright.sync_api import Route, sync_playwright

    opened: list[Any] = []
    with sync_playwright() as pw:

        def make() -> Browser:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / f"profile-{len(opened)}"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                accept_downloads=True,
            )
            opened.append(context)
            made = Browser(context)

            def only_loopback(route: Route) -> None:
                url = route.request.url
                if urlsplit(url).hostname == "127.0.0.1" or url.startswith("data:"):
                    route.continue_()
                else:
                    made.blocked.append(url)
                    route.abort("internetdisconnected")

            context.route("**/*", only_loopback)
            return made

        try:
            yield make
        finally:
            for context in opened:
                context.close()


def api_account(base: str, *, superuser: bool = False) -> tuple[str, str, str]:
    """A registered user: (id, email, session token)."""
    email = f"{uuid.uuid4().hex[:10]}@example.com"
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
        assert r.status_code == 201, r.text
        user_id = r.json()["id"]
        if superuser:
            db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=user_id)
        r = c.post("/v1/auth/login", data={"username": email, "password": PASSWORD})
        return user_id, email, r.json()["access_token"]


def api_org(base: str, token: str) -> tuple[str, str]:
    slug = f"org{uuid.uuid4().hex[:10]}"
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.post(
            "/v1/orgs",
            json={"slug": slug, "name": f"Atelier {slug[-4:]}"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
        return r.json()["id"], slug


def sign_in(page: Any, base: str, email: str) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base}/portal/login")
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()


def sign_out(page: Any) -> None:
    from playwright.sync_api import expect

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def api(base: str, method: str, path: str, key: str, **kw: Any) -> httpx.Response:
    with httpx.Client(base_url=base, timeout=30) as c:
        return c.request(method, path, headers={"Authorization": f"Bearer {key}"}, **kw)


def shoot(page: Any, pages: dict[str, str]) -> None:
    """Screenshots at 375 and 1440 px; each page must fit the narrow screen (tables scroll)."""
    for width in (375, 1440):
        page.set_viewport_size({"width": width, "height": 900})
        for name, url in pages.items():
            response = page.goto(url)
            assert response is not None and response.status == 200, url
            overflow = page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, (name, width, overflow)
            page.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
