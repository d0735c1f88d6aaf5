"""API keys: org-bound, prefixed and checksummed, shown once, hashed, scoped, revocable."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx

from hiddenmodel.security import InvalidToken, parse_token
from tests.conftest import assert_problem, bearer, db_rows, db_scalar, make_key, make_org


async def test_key_is_shown_once_and_stored_hashed(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    created = await make_key(client, org, ["jobs:write", "jobs:read", "jobs:read"])
    token = created["key"]
    assert token.startswith("hmk_")
    assert parse_token(token, "hmk").org_id.hex == org.id.replace("-", "")
    assert created["scopes"] == ["jobs:read", "jobs:write"]
    assert created["prefix"].startswith("hmk_") and token[-8:] not in created["prefix"]
    listing = (await client.get(f"/v1/orgs/{org.id}/api-keys", headers=org.owner.headers)).json()
    assert [k["id"] for k in listing["items"]] == [created["id"]]
    assert "key" not in listing["items"][0] and token not in str(listing)
    stored = db_rows("SELECT key_hash, prefix FROM api_keys WHERE id = :i", i=created["id"])[0]
    assert token not in stored and len(stored[0]) == 64


async def test_key_acts_in_its_org(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    key = await make_key(client, org, ["jobs:read"])
    r = await client.get("/v1/me", headers=bearer(key["key"]))
    assert r.status_code == 200
    assert r.json()["kind"] == "api_key" and r.json()["organization"]["slug"] == org.slug
    r = await client.get(f"/v1/orgs/{org.id}", headers=bearer(key["key"]))
    assert r.status_code == 200


async def test_checksum_catches_typos() -> None:
    import uuid

    from hiddenmodel.security import generate_token

    token = generate_token("hmk", uuid.uuid4())
    parse_token(token, "hmk")
    for bad in (
        token[:-1] + ("A" if token[-1] != "A" else "B"),
        token.replace("hmk_", "hmi_"),
        token[:20],
        "hmk_" + "a" * 60,
    ):
        try:
            parse_token(bad, "hmk")
        except InvalidToken:
            continue
        raise AssertionError(f"accepted {bad}")


async def test_unknown_revoked_expired_keys_are_401(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    key = await make_key(client, org)
    token = key["key"]
    typo = token[:-1] + ("x" if token[-1] != "x" else "y")
    assert_problem(await client.get("/v1/me", headers=bearer(typo)), 401, "invalid-api-key")
    # Well formed, right checksum, never issued.
    import uuid

    from hiddenmodel.security import generate_token

    forged = generate_token("hmk", uuid.UUID(org.id))
    assert_problem(await client.get("/v1/me", headers=bearer(forged)), 401, "invalid-api-key")

    db_rows(
        "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = :i", i=key["id"]
    )
    assert_problem(await client.get("/v1/me", headers=bearer(token)), 401, "api-key-expired")

    key2 = await make_key(client, org)
    r = await client.delete(f"/v1/orgs/{org.id}/api-keys/{key2['id']}", headers=org.owner.headers)
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert_problem(await client.get("/v1/me", headers=bearer(key2["key"])), 401, "api-key-revoked")
    audit = db_scalar(
        "SELECT count(*) FROM audit_events WHERE action = 'api_key.revoked' AND target_id = :i",
        i=key2["id"],
    )
    assert audit == 1


async def test_expiry_must_be_future_and_zoned(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "k", "scopes": ["jobs:read"], "expires_at": past},
        headers=org.owner.headers,
    )
    assert_problem(r, 422)
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "k", "scopes": ["jobs:read"], "expires_at": "2030-01-01T00:00:00"},
        headers=org.owner.headers,
    )
    assert_problem(r, 422)
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "k", "scopes": ["root"]},
        headers=org.owner.headers,
    )
    assert_problem(r, 422)
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys", json={"name": "k", "scopes": []}, headers=org.owner.headers
    )
    assert_problem(r, 422)
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    key = await make_key(client, org, ["jobs:read"], expires_at=future)
    assert (await client.get("/v1/me", headers=bearer(key["key"]))).status_code == 200


async def test_scopes_are_enforced(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    usage_only = await make_key(client, org, ["usage:read"])
    r = await client.get(f"/v1/orgs/{org.id}", headers=bearer(usage_only["key"]))
    assert_problem(r, 403, "missing-scope")
    assert r.json()["required_scope"] == "jobs:read"
    jobs = await make_key(client, org, ["jobs:read", "jobs:write"])
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "x", "scopes": ["admin"]},
        headers=bearer(jobs["key"]),
    )
    assert_problem(r, 403, "missing-scope")
    # An admin key manages the org but can never grant ownership.
    admin = await make_key(client, org, ["admin"])
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "x", "scopes": ["jobs:read"]},
        headers=bearer(admin["key"]),
    )
    assert r.status_code == 201
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": "o@example.com", "role": "owner"},
        headers=bearer(admin["key"]),
    )
    assert_problem(r, 403, "owner-required")
    # Keys cannot create organizations or accept invitations: those need a person.
    r = await client.post(
        "/v1/orgs", json={"slug": "from-a-key", "name": "x"}, headers=bearer(admin["key"])
    )
    assert_problem(r, 403, "user-required")


async def test_last_used_is_recorded_coarsely(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    key = await make_key(client, org, ["jobs:read"])
    assert db_scalar("SELECT last_used_at FROM api_keys WHERE id = :i", i=key["id"]) is None
    await client.get("/v1/me", headers=bearer(key["key"]))
    first = db_scalar("SELECT last_used_at FROM api_keys WHERE id = :i", i=key["id"])
    assert first is not None
    for _ in range(3):
        await client.get("/v1/me", headers=bearer(key["key"]))
    # Within the resolution window: no write per request.
    assert db_scalar("SELECT last_used_at FROM api_keys WHERE id = :i", i=key["id"]) == first
    db_rows(
        "UPDATE api_keys SET last_used_at = now() - interval '1 hour' WHERE id = :i", i=key["id"]
    )
    await client.get("/v1/me", headers=bearer(key["key"]))
    assert db_scalar("SELECT last_used_at FROM api_keys WHERE id = :i", i=key["id"]) > first
