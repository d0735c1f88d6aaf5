"""Organizations, memberships and roles, invitations, audit — and no cross-tenant leaks."""

from __future__ import annotations

import asyncio
import re
import secrets
import string

import httpx
import pytest

from hiddenmodel.inputs import RESERVED_SLUGS
from tests.conftest import (
    Account,
    Org,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)


async def _invite(client: httpx.AsyncClient, org: Org, email: str, role: str = "member") -> str:
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": email, "role": role},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


async def _join(client: httpx.AsyncClient, org: Org, role: str = "member") -> Account:
    member = await register(client)
    token = await _invite(client, org, member.email, role)
    r = await client.post("/v1/invitations/accept", json={"token": token}, headers=member.headers)
    assert r.status_code == 200, r.text
    return member


async def test_create_get_update_list(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    r = await client.get(f"/v1/orgs/{org.id}", headers=org.owner.headers)
    assert r.status_code == 200 and r.json()["slug"] == org.slug
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"name": "Renamed"}, headers=org.owner.headers
    )
    assert r.json()["name"] == "Renamed"
    r = await client.get("/v1/orgs", headers=org.owner.headers)
    assert [(o["id"], o["role"]) for o in r.json()] == [(org.id, "owner")]


async def test_an_admin_api_key_renames_its_organization(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    key = await make_key(client, org, ["admin"])
    headers = bearer(key["key"])
    r = await client.patch(f"/v1/orgs/{org.id}", json={"name": "By key"}, headers=headers)
    assert r.status_code == 200 and r.json()["name"] == "By key", r.text
    assert db_scalar("SELECT name FROM organizations WHERE id = :o", o=org.id) == "By key"


async def test_create_refusals_write_nothing(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    other = await register(client)
    before = db_scalar("SELECT count(*) FROM memberships WHERE user_id = :u", u=other.id)
    # A name no other test uses: another module may name an organization "X".
    name = unique("refused")
    r = await client.post("/v1/orgs", json={"slug": org.slug, "name": name}, headers=other.headers)
    assert_problem(r, 409, "slug-taken")
    r = await client.post(
        "/v1/orgs", json={"slug": "Bad Slug!", "name": name}, headers=other.headers
    )
    assert_problem(r, 422, "validation-error")
    assert db_scalar("SELECT count(*) FROM memberships WHERE user_id = :u", u=other.id) == before
    assert db_scalar("SELECT count(*) FROM organizations WHERE name = :n", n=name) == 0


async def test_commit_happens_before_the_response(
    client: httpx.AsyncClient, app: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hiddenmodel.db
    import tenants.auth

    org = await make_org(client)
    # As a server would: the error handler answers, the exception is not re-raised at us.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # type: ignore[arg-type]
    server = httpx.AsyncClient(transport=transport, base_url="http://testserver")

    async def failing_commit(session: object) -> None:
        raise RuntimeError("commit failed")

    monkeypatch.setattr(tenants.auth, "commit", failing_commit)
    r = await server.patch(f"/v1/orgs/{org.id}", json={"name": "Lost"}, headers=org.owner.headers)
    assert_problem(r, 500, "internal-error")
    monkeypatch.setattr(tenants.auth, "commit", hiddenmodel.db.commit)
    r = await client.get(f"/v1/orgs/{org.id}", headers=org.owner.headers)
    assert r.json()["name"] != "Lost"


async def test_invitation_flow_and_mail(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    invitee = await register(client)
    token = await _invite(client, org, invitee.email.upper(), "admin")
    assert token.startswith("hmi_")
    body = db_rows(
        "SELECT body FROM email_messages WHERE to_address = :e AND kind = 'invitation'",
        e=invitee.email,
    )[0][0]
    assert token in body
    assert db_scalar("SELECT count(*) FROM invitations WHERE token_hash = :t", t=token) == 0
    r = await client.post("/v1/invitations/accept", json={"token": token}, headers=invitee.headers)
    assert r.status_code == 200 and r.json()["role"] == "admin"
    r = await client.get(f"/v1/orgs/{org.id}/members", headers=invitee.headers)
    assert {m["email"]: m["role"] for m in r.json()["items"]} == {
        org.owner.email: "owner",
        invitee.email: "admin",
    }
    # Single use.
    r = await client.post("/v1/invitations/accept", json={"token": token}, headers=invitee.headers)
    assert_problem(r, 410, "invitation-used")
    r = await client.get(f"/v1/orgs/{org.id}/invitations", headers=org.owner.headers)
    assert [i["status"] for i in r.json()["items"]] == ["accepted"]


async def test_invitation_refusals(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    invitee = await register(client)
    stranger = await register(client)
    token = await _invite(client, org, invitee.email)
    # Someone else's invitation, a garbled token, a well-formed unknown one: all 404.
    r = await client.post("/v1/invitations/accept", json={"token": token}, headers=stranger.headers)
    assert_problem(r, 404, "invitation-not-found")
    assert_problem(
        await client.post(
            "/v1/invitations/accept", json={"token": "hmi_nope"}, headers=invitee.headers
        ),
        404,
        "invitation-not-found",
    )
    forged = token[:-12] + ("a" if token[-12] != "a" else "b") + token[-11:]
    r = await client.post("/v1/invitations/accept", json={"token": forged}, headers=invitee.headers)
    assert_problem(r, 404, "invitation-not-found")
    # Expired.
    db_rows(
        "UPDATE invitations SET expires_at = now() - interval '1 minute' "
        "WHERE organization_id = :o",
        o=org.id,
    )
    r = await client.post("/v1/invitations/accept", json={"token": token}, headers=invitee.headers)
    assert_problem(r, 410, "invitation-expired")
    # Revoked.
    token2 = await _invite(client, org, invitee.email)
    inv_id = db_scalar(
        "SELECT id FROM invitations WHERE organization_id = :o AND expires_at > now()", o=org.id
    )
    r = await client.delete(f"/v1/orgs/{org.id}/invitations/{inv_id}", headers=org.owner.headers)
    assert r.status_code == 200 and r.json()["status"] == "revoked"
    r = await client.post("/v1/invitations/accept", json={"token": token2}, headers=invitee.headers)
    assert_problem(r, 410, "invitation-revoked")
    assert db_scalar("SELECT count(*) FROM memberships WHERE user_id = :u", u=invitee.id) == 0
    # Already a member.
    member = await _join(client, org)
    token3 = await _invite(client, org, member.email)
    r = await client.post("/v1/invitations/accept", json={"token": token3}, headers=member.headers)
    assert_problem(r, 409, "already-member")


async def test_concurrent_accepts_of_one_invitation_admit_one(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    invitee = await register(client)
    token = await _invite(client, org, invitee.email)
    results = await asyncio.gather(
        *[
            client.post("/v1/invitations/accept", json={"token": token}, headers=invitee.headers)
            for _ in range(5)
        ]
    )
    assert sorted(r.status_code for r in results)[0] == 200
    assert sum(r.status_code == 200 for r in results) == 1
    assert db_scalar("SELECT count(*) FROM memberships WHERE user_id = :u", u=invitee.id) == 1


async def test_role_rules(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    admin = await _join(client, org, "admin")
    member = await _join(client, org, "member")
    # A member may not manage members or invite.
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations", json={"email": "a@example.com"}, headers=member.headers
    )
    assert_problem(r, 403, "insufficient-role")
    r = await client.patch(
        f"/v1/orgs/{org.id}/members/{admin.id}", json={"role": "member"}, headers=member.headers
    )
    assert_problem(r, 403, "insufficient-role")
    # An admin manages non-owners but may not grant or touch ownership.
    r = await client.patch(
        f"/v1/orgs/{org.id}/members/{member.id}", json={"role": "billing"}, headers=admin.headers
    )
    assert r.status_code == 204
    r = await client.patch(
        f"/v1/orgs/{org.id}/members/{member.id}", json={"role": "owner"}, headers=admin.headers
    )
    assert_problem(r, 403, "owner-required")
    r = await client.delete(f"/v1/orgs/{org.id}/members/{org.owner.id}", headers=admin.headers)
    assert_problem(r, 403, "owner-required")
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": "o@example.com", "role": "owner"},
        headers=admin.headers,
    )
    assert_problem(r, 403, "owner-required")
    r = await client.patch(
        f"/v1/orgs/{org.id}/members/{member.id}", json={"role": "king"}, headers=admin.headers
    )
    assert_problem(r, 422, "validation-error")
    # Removal, then the removed member sees nothing.
    r = await client.delete(f"/v1/orgs/{org.id}/members/{member.id}", headers=admin.headers)
    assert r.status_code == 204
    assert_problem(await client.get(f"/v1/orgs/{org.id}", headers=member.headers), 404)
    r = await client.delete(f"/v1/orgs/{org.id}/members/{member.id}", headers=admin.headers)
    assert_problem(r, 404)


async def test_an_org_always_keeps_an_owner(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    r = await client.delete(f"/v1/orgs/{org.id}/members/{org.owner.id}", headers=org.owner.headers)
    assert_problem(r, 409, "last-owner")
    r = await client.patch(
        f"/v1/orgs/{org.id}/members/{org.owner.id}",
        json={"role": "admin"},
        headers=org.owner.headers,
    )
    assert_problem(r, 409, "last-owner")
    second = await _join(client, org, "owner")
    # Two owners demoting each other at once: one must fail, one owner must remain.
    results = await asyncio.gather(
        client.patch(
            f"/v1/orgs/{org.id}/members/{second.id}",
            json={"role": "member"},
            headers=org.owner.headers,
        ),
        client.patch(
            f"/v1/orgs/{org.id}/members/{org.owner.id}",
            json={"role": "member"},
            headers=second.headers,
        ),
    )
    # The loser either saw the last-owner rule or had already lost its own ownership.
    assert sorted(r.status_code for r in results) in ([204, 409], [204, 403])
    owners = db_scalar(
        "SELECT count(*) FROM memberships WHERE organization_id = :o AND role = 'owner'", o=org.id
    )
    assert owners == 1
    # A member may leave (invited by whichever owner won the race).
    survivor = db_scalar(
        "SELECT user_id FROM memberships WHERE organization_id = :o AND role = 'owner'", o=org.id
    )
    owner = org.owner if str(survivor) == org.owner.id else second
    member = await _join(client, Org(id=org.id, slug=org.slug, owner=owner))
    r = await client.delete(f"/v1/orgs/{org.id}/members/{member.id}", headers=member.headers)
    assert r.status_code == 204


async def test_audit_log_records_changes(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    member = await _join(client, org, "member")
    await client.patch(
        f"/v1/orgs/{org.id}/members/{member.id}", json={"role": "admin"}, headers=org.owner.headers
    )
    key = await make_key(client, org)
    await client.delete(f"/v1/orgs/{org.id}/api-keys/{key['id']}", headers=org.owner.headers)
    await client.delete(f"/v1/orgs/{org.id}/members/{member.id}", headers=org.owner.headers)
    r = await client.get(f"/v1/orgs/{org.id}/audit-events", headers=org.owner.headers)
    actions = [e["action"] for e in r.json()["items"]]
    for action in (
        "organization.created",
        "invitation.created",
        "invitation.accepted",
        "member.added",
        "member.role_changed",
        "api_key.created",
        "api_key.revoked",
        "member.removed",
    ):
        assert action in actions
    changed = next(e for e in r.json()["items"] if e["action"] == "member.role_changed")
    assert changed["data"] == {"old_role": "member", "new_role": "admin"}
    assert changed["actor_user_id"] == org.owner.id
    r = await client.get(
        f"/v1/orgs/{org.id}/audit-events",
        params={"action": "api_key.created"},
        headers=org.owner.headers,
    )
    assert [e["action"] for e in r.json()["items"]] == ["api_key.created"]


async def test_keyset_pagination(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    for _ in range(4):
        await _join(client, org)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await client.get(f"/v1/orgs/{org.id}/members", params=params, headers=org.owner.headers)
        assert r.status_code == 200
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [m["user_id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 5
    r = await client.get(
        f"/v1/orgs/{org.id}/members", params={"cursor": "!!garbage"}, headers=org.owner.headers
    )
    assert_problem(r, 400, "invalid-cursor")
    r = await client.get(
        f"/v1/orgs/{org.id}/members", params={"limit": 0}, headers=org.owner.headers
    )
    assert_problem(r, 422)


async def test_nothing_leaks_across_organizations(client: httpx.AsyncClient) -> None:
    org_a = await make_org(client)
    org_b = await make_org(client)
    key_b = await make_key(client, org_b, ["admin"])
    member_a = await _join(client, org_a)
    inv = db_scalar("SELECT id FROM invitations WHERE organization_id = :o", o=org_a.id)
    key_a = await make_key(client, org_a)
    paths = [
        ("GET", f"/v1/orgs/{org_a.id}"),
        ("PATCH", f"/v1/orgs/{org_a.id}"),
        ("GET", f"/v1/orgs/{org_a.id}/members"),
        ("PATCH", f"/v1/orgs/{org_a.id}/members/{member_a.id}"),
        ("DELETE", f"/v1/orgs/{org_a.id}/members/{member_a.id}"),
        ("GET", f"/v1/orgs/{org_a.id}/invitations"),
        ("POST", f"/v1/orgs/{org_a.id}/invitations"),
        ("DELETE", f"/v1/orgs/{org_a.id}/invitations/{inv}"),
        ("GET", f"/v1/orgs/{org_a.id}/api-keys"),
        ("POST", f"/v1/orgs/{org_a.id}/api-keys"),
        ("DELETE", f"/v1/orgs/{org_a.id}/api-keys/{key_a['id']}"),
        ("GET", f"/v1/orgs/{org_a.id}/audit-events"),
    ]
    bodies = {
        "PATCH": {"name": "x", "role": "admin"},
        "POST": {"email": "e@example.com", "name": "k", "scopes": ["admin"]},
    }
    for principal in (org_b.owner.headers, bearer(key_b["key"])):
        for method, path in paths:
            r = await client.request(method, path, json=bodies.get(method), headers=principal)
            assert_problem(r, 404)
    # Org B's own ids under org A's path are not found either (no cross-path confusion).
    r = await client.delete(
        f"/v1/orgs/{org_b.id}/api-keys/{key_a['id']}", headers=org_b.owner.headers
    )
    assert_problem(r, 404)
    assert db_scalar("SELECT revoked_at FROM api_keys WHERE id = :k", k=key_a["id"]) is None
    assert db_scalar("SELECT count(*) FROM memberships WHERE user_id = :u", u=member_a.id) == 1


async def test_slug_pattern_examples_are_valid(client: httpx.AsyncClient) -> None:
    owner = await register(client)
    base = unique("s")
    # The shortest and the longest allowed, exactly: 2 and 63 characters.
    # Drawn until it is not a reserved word ("v1" is one: one draw in 260).
    shortest = "v1"
    while shortest in RESERVED_SLUGS:
        shortest = secrets.choice(string.ascii_lowercase) + secrets.choice(string.digits)
    for slug in (shortest, f"{base}-b", base + "x" * (63 - len(base))):
        r = await client.post("/v1/orgs", json={"slug": slug, "name": "n"}, headers=owner.headers)
        assert r.status_code == 201, (slug, r.text)
        assert r.json()["slug"] == slug
    assert {len(shortest), len(base + "x" * (63 - len(base)))} == {2, 63}
    for slug in ("-ab", "ab-", "a", "A-b", "a_b", "x" * 64):
        r = await client.post("/v1/orgs", json={"slug": slug, "name": "n"}, headers=owner.headers)
        assert_problem(r, 422)
    assert re.fullmatch(r"[a-z0-9-]+", unique("s"))
