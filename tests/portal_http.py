"""The portal over HTTP as a browser uses it: cookies kept, forms posted with their CSRF
token (httpx on the ASGI app)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from tests.conftest import PASSWORD, Account, Org, register

CSRF = re.compile(r'name="csrf_token" value="([0-9a-f]{64})"')


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token on the page"
    return found.group(1)


@asynccontextmanager
async def portal_client(
    app: Any, account: Account | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client (cookies kept), signed in as ``account`` when given."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        if account is not None:
            r = await sign_in(client, account.email)
            assert r.status_code == 303, r.text
        yield client


async def sign_in(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD
) -> httpx.Response:
    page = await client.get("/portal/login")
    assert page.status_code == 200
    return await client.post(
        "/portal/login",
        data={"email": email, "password": password, "csrf_token": csrf_of(page.text)},
    )


async def post_form(
    client: httpx.AsyncClient, page_url: str, action: str, data: dict[str, Any]
) -> httpx.Response:
    """Post a form the way a browser does after loading ``page_url``."""
    page = await client.get(page_url)
    assert page.status_code == 200, page.text
    return await client.post(action, data={**data, "csrf_token": csrf_of(page.text)})


async def add_member(client: httpx.AsyncClient, org: Org, role: str) -> Account:
    """A member with ``role``, through the API's invitation flow."""
    account = await register(client)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": account.email, "role": role},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/invitations/accept", json={"token": r.json()["token"]}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    return account
