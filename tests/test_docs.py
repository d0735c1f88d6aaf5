"""Swagger UI (/docs) and ReDoc (/redoc) work offline: their scripts and styles come from the
app itself. The browser tests drive Debian's chromium with every non-loopback request
blocked."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium

TITLE = "Hidden Model API"


class _AssetRefs(HTMLParser):
    """Every URL a page loads: <script src>, <link href>, <img src>."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {"script": "src", "link": "href", "img": "src"}
        for name, value in attrs:
            if tag in names and name == names[tag] and value:
                self.urls.append(value)


def _asset_urls(html: str) -> list[str]:
    parser = _AssetRefs()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize(
    ("page", "kinds"),
    [("/docs", {"javascript", "css", "image"}), ("/redoc", {"javascript", "image"})],
)
async def test_docs_pages_load_only_same_origin_assets(
    client: httpx.AsyncClient, page: str, kinds: set[str]
) -> None:
    r = await client.get(page)  # no credentials: the docs are public
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "://" not in re.sub(r"<!--.*?-->", "", r.text).replace("http://testserver", ""), (
        "the page names an absolute URL"
    )
    urls = _asset_urls(r.text)
    seen = set()
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, url
        assert url.startswith("/docs-assets/"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        content_type = asset.headers["content-type"]
        kind = next(k for k in ("javascript", "css", "image") if k in content_type)
        assert len(asset.content) > 1000, url
        seen.add(kind)
    assert seen == kinds, urls


async def test_docs_routes_stay_out_of_the_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert not [p for p in paths if p.startswith(("/docs", "/redoc"))]
    r = await client.get("/docs/oauth2-redirect")
    assert r.status_code == 200
    assert "://" not in r.text


@pytest.fixture(scope="module")
def live_docs_api() -> Iterator[str]:
    """The API as its own process on a loopback port."""
    require_chromium()
    from tests.conftest import _free_port
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel("api-docs", "api", "--port", str(port), "--workers", "1")
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def offline_page(tmp_path: Path) -> Iterator[tuple[object, list[str], list[str]]]:
    """A chromium page that can only reach 127.0.0.1; yields the page, the requests it was
    refused ("resource-type url") and its script errors."""
    require_chromium()
    from playwright.sync_api import Route, sync_playwright

    blocked: list[str] = []
    errors: list[str] = []

    def only_loopback(route: Route) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1" or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(f"{route.request.resource_type} {url}")
            route.abort("internetdisconnected")

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            context.route("**/*", only_loopback)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, blocked, errors
        finally:
            context.close()


def test_swagger_ui_renders_offline(
    live_docs_api: str, offline_page: tuple[object, list[str], list[str]]
) -> None:
    from playwright.sync_api import Page, expect

    page, blocked, errors = offline_page
    assert isinstance(page, Page)
    page.goto(f"{live_docs_api}/docs", wait_until="networkidle")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text(TITLE)
    operations = page.locator(".opblock")
    expect(operations.first).to_be_visible()
    assert operations.count() > 10
    expect(page.locator(".opblock-summary-path", has_text="/v1/orgs").first).to_be_visible()
    assert blocked == [], blocked
    assert errors == [], errors


def test_redoc_renders_offline(
    live_docs_api: str, offline_page: tuple[object, list[str], list[str]]
) -> None:
    from playwright.sync_api import Page, expect

    spec = httpx.get(f"{live_docs_api}/openapi.json", timeout=10).json()
    summary = spec["paths"]["/v1/orgs"]["post"]["summary"]

    page, blocked, errors = offline_page
    assert isinstance(page, Page)
    page.goto(f"{live_docs_api}/redoc", wait_until="networkidle")
    expect(page.locator("h1", has_text=TITLE)).to_be_visible()
    expect(page.locator("h2", has_text=summary).first).to_be_visible()
    assert page.locator("[role=menuitem], li[data-item-id]").count() > 10
    # ReDoc's sidebar footer links its own logo from cdn.redoc.ly; offline it is a broken
    # image and nothing else. No script, style, font or data request may leave the machine.
    assert all(b.startswith("image https://cdn.redoc.ly/") for b in blocked), blocked
    assert errors == [], errors
