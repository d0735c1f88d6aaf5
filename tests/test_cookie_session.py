"""The cookie login's session works on the organization routes like a session token, and an
unsafe request authenticated by the cookie must show it comes from this site (CSRF)."""

from __future__ import annotations

import httpx

from tests.conftest import PASSWORD, assert_problem, db_scalar, make_org, register, unique


async def _cookie(client: httpx.AsyncClient, email: str) -> dict[str, str]:
    r = await client.post("/v1/auth/cookie/login", data={"username": email, "password": PASSWORD})
    assert r.status_code == 204, r.text
    token = r.cookies.get("hm_session")
    assert token
    return {"Cookie": f"hm_session={token}"}


async def test_the_cookie_session_reads_and_acts_in_the_org(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    cookie = await _cookie(client, org.owner.email)

    r = await client.get(f"/v1/orgs/{org.id}", headers=cookie)
    assert r.status_code == 200, r.text
    assert r.json()["slug"] == org.slug
    r = await client.get(f"/v1/orgs/{org.id}/members", headers=cookie)
    assert r.status_code == 200, r.text
    me = await client.get("/v1/me", headers=cookie)
    assert me.status_code == 200 and me.json()["kind"] == "user", me.text

    # Same-site writes: an Origin of this server, or the custom header.
    slug = unique("cookie")
    r = await client.post(
        "/v1/orgs",
        json={"slug": slug, "name": "Cookie"},
        headers={**cookie, "Origin": "http://testserver"},
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": f"{unique('inv')}@example.com", "role": "member"},
        headers={**cookie, "X-Requested-With": "fetch"},
    )
    assert r.status_code == 201, r.text

    # Roles still apply: a member's cookie cannot manage keys.
    member = await register(client)
    db_scalar(
        "INSERT INTO memberships (id, organization_id, user_id, role) "
        "VALUES (gen_random_uuid(), :o, :u, 'member') "
        "RETURNING user_id",
        o=org.id,
        u=member.id,
    )
    member_cookie = await _cookie(client, member.email)
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "k", "scopes": ["jobs:read"]},
        headers={**member_cookie, "X-Requested-With": "fetch"},
    )
    assert_problem(r, 403, "insufficient-role")


async def test_cross_site_writes_with_the_cookie_are_refused(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    cookie = await _cookie(client, org.owner.email)
    keys = "SELECT count(*) FROM api_keys WHERE organization_id = :o"
    body = {"name": "forged", "scopes": ["admin"]}
    for extra in (
        {},
        {"Origin": "https://evil.example"},
        {"Origin": "https://evil.example", "X-Requested-With": "fetch"},
        {"Origin": "null"},
    ):
        r = await client.post(f"/v1/orgs/{org.id}/api-keys", json=body, headers={**cookie, **extra})
        assert_problem(r, 403, "csrf-check-failed")
    r = await client.delete(f"/v1/orgs/{org.id}/members/{org.owner.id}", headers=cookie)
    assert_problem(r, 403, "csrf-check-failed")
    assert db_scalar(keys, o=org.id) == 0
    # The bearer token needs no such proof: a browser never sends it by itself.
    r = await client.post(f"/v1/orgs/{org.id}/api-keys", json=body, headers=org.owner.headers)
    assert r.status_code == 201, r.text


async def test_a_bad_or_ended_cookie_is_unauthorized(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    r = await client.get(f"/v1/orgs/{org.id}", headers={"Cookie": "hm_session=nonsense"})
    assert_problem(r, 401, "invalid-token")
    cookie = await _cookie(client, org.owner.email)
    r = await client.post("/v1/auth/cookie/logout", headers={**cookie, "X-Requested-With": "fetch"})
    assert r.status_code == 204, r.text
    assert_problem(await client.get(f"/v1/orgs/{org.id}", headers=cookie), 401, "invalid-token")


async def test_the_document_lists_the_cookie_on_org_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    op = spec["paths"]["/v1/orgs/{org_id}/api-keys"]["post"]
    assert {"sessionCookie": []} in op["security"], op["security"]
    assert (
        "X-Requested-With" in spec["components"]["securitySchemes"]["sessionCookie"]["description"]
    )


async def test_the_account_routes_check_cookie_writes_too(client: httpx.AsyncClient) -> None:
    """fastapi-users' own routes authenticate the cookie themselves; the same check applies."""
    account = await register(client)
    cookie = await _cookie(client, account.email)
    client.cookies.clear()
    r = await client.patch("/v1/users/me", json={"name": "Forged"}, headers=cookie)
    assert_problem(r, 403, "csrf-check-failed")
    r = await client.post("/v1/auth/cookie/logout", headers=cookie)
    assert_problem(r, 403, "csrf-check-failed")
    assert (await client.get("/v1/users/me", headers=cookie)).status_code == 200
    r = await client.patch(
        "/v1/users/me", json={"name": "Ana"}, headers={**cookie, "Origin": "http://testserver"}
    )
    assert r.status_code == 200 and r.json()["name"] == "Ana", r.text
    # A bearer token needs no proof, even with a cookie beside it.
    r = await client.patch("/v1/users/me", json={"name": "Bea"}, headers=account.headers)
    assert r.status_code == 200, r.text
