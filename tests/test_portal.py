"""The admin portal over HTTP: sign-in, CSRF, headers, permissions on every page, and the
pages' actions going through the same services as the API (httpx on the ASGI app)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
)
from tests.factories import png, submit
from tests.polling import until_sync
from tests.portal_http import add_member, csrf_of, portal_client, post_form, sign_in


def org_pages(org_id: str) -> list[str]:
    base = f"/portal/orgs/{org_id}"
    return [
        base,
        f"{base}/jobs",
        f"{base}/batches",
        f"{base}/members",
        f"{base}/api-keys",
        f"{base}/usage",
        f"{base}/usage.csv",
        f"{base}/billing",
        f"{base}/audit",
    ]


async def test_pages_carry_security_headers_and_no_inline_script(app: Any) -> None:
    async with portal_client(app) as client:
        r = await client.get("/portal/login")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"
    assert "hm_csrf=" in r.headers["set-cookie"]
    # Scripts are files, never inline; every input has its label.
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", r.text) is None
    assert " style=" not in r.text
    for input_id in re.findall(r'<input id="([^"]+)"', r.text):
        assert f'for="{input_id}"' in r.text, input_id
    # The API keeps its own answers: no portal headers outside /portal.
    async with portal_client(app) as client:
        assert "content-security-policy" not in (await client.get("/healthz")).headers


async def test_sign_in_renews_the_session_and_sign_out_ends_it(
    app: Any, client: httpx.AsyncClient
) -> None:
    account = await register(client)
    async with portal_client(app) as browser:
        r = await browser.get("/portal/")
        assert r.status_code == 303
        assert r.headers["location"] == "/portal/login?next=%2Fportal%2F"
        r = await sign_in(browser, account.email, "wrong-Password-1")
        assert r.status_code == 400 and "Wrong e-mail address or password" in r.text
        seed_before = browser.cookies.get("hm_csrf")
        r = await sign_in(browser, account.email)
        assert r.status_code == 303 and r.headers["location"] == "/portal/"
        first = browser.cookies.get("hm_session")
        assert first and browser.cookies.get("hm_csrf") != seed_before
        assert (await browser.get("/portal/")).status_code == 200
        # Signing in again replaces the session: the first one no longer works.
        await sign_in(browser, account.email)
        second = browser.cookies.get("hm_session")
        assert second and second != first
        assert (await client.get("/v1/users/me", headers=bearer(first))).status_code == 401
        assert (await client.get("/v1/users/me", headers=bearer(second))).status_code == 200
        r = await post_form(browser, "/portal/", "/portal/logout", {})
        assert r.status_code == 303 and r.headers["location"] == "/portal/login"
        assert browser.cookies.get("hm_session") is None
        assert (await client.get("/v1/users/me", headers=bearer(second))).status_code == 401
        assert (await browser.get("/portal/")).status_code == 303


async def test_sign_in_never_redirects_off_the_portal(app: Any, client: httpx.AsyncClient) -> None:
    account = await register(client)
    async with portal_client(app) as browser:
        page = await browser.get("/portal/login")
        for target in ("https://evil.example/", "//evil.example/", "/v1/me", "/portal\\@evil"):
            await browser.post(
                "/portal/logout", data={"csrf_token": csrf_of(page.text)}
            )  # not signed in: a no-op
            page = await browser.get("/portal/login")
            r = await browser.post(
                "/portal/login",
                data={
                    "email": account.email,
                    "password": PASSWORD,
                    "next": target,
                    "csrf_token": csrf_of(page.text),
                },
            )
            assert r.status_code == 303 and r.headers["location"] == "/portal/", target


def _post_routes() -> list[str]:
    from fastapi.routing import APIRoute

    import portal.app  # noqa: F401 - registers every page module's routes
    from portal.web import router

    return [r.path for r in router.routes if isinstance(r, APIRoute) and "POST" in r.methods]


async def test_every_form_without_its_csrf_token_is_refused(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    # An operator too, so that the operator forms reach their CSRF check.
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=org.owner.id)
    routes = _post_routes()
    assert len(routes) >= 15, routes
    async with portal_client(app, org.owner) as browser:
        page = await browser.get(f"/portal/orgs/{org.id}/members")
        token = csrf_of(page.text)
        for path in routes:
            url = (
                path.replace("{org_id}", org.id)
                .replace("{subject}", "members")
                .replace("{subject_id}", org.owner.id)
            )
            url = re.sub(r"\{[a-z_]+\}", str(uuid.uuid4()), url)
            for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": token[:-1] + "x"}):
                r = await browser.post(url, data={"email": "x@example.com", **data})
                assert r.status_code == 403, (url, r.status_code)
                assert "security token" in r.text, url
        # Nothing was changed by any of them.
        assert (
            db_scalar("SELECT count(*) FROM memberships WHERE organization_id = :o", o=org.id) == 1
        )
        # Another browser's token is worthless here: tokens are bound to their seed cookie.
        async with portal_client(app, org.owner) as other:
            other_token = csrf_of((await other.get("/portal/login")).text)
        r = await browser.post(
            f"/portal/orgs/{org.id}/api-keys",
            data={"name": "k", "scopes": "jobs:read", "csrf_token": other_token},
        )
        assert r.status_code == 403


async def test_another_organizations_pages_are_not_found(
    app: Any, client: httpx.AsyncClient
) -> None:
    org_a = await make_org(client)
    org_b = await make_org(client)
    key_a = await make_key(client, org_a)
    async with portal_client(app, org_b.owner) as browser:
        for url in [
            *org_pages(org_a.id),
            f"/portal/orgs/{org_a.id}/quotas/members/{org_a.owner.id}",
            f"/portal/orgs/{org_a.id}/quotas/api-keys/{key_a['id']}",
            f"/portal/orgs/{org_a.id}/jobs/{uuid.uuid4()}",
            f"/portal/orgs/{uuid.uuid4()}",
            "/portal/orgs/not-a-uuid/jobs",
            "/portal/operator",
            f"/portal/operator/orgs/{org_a.id}",
        ]:
            r = await browser.get(url)
            assert r.status_code == 404, url
            assert r.headers["content-type"].startswith("text/html"), url
            assert org_a.slug not in r.text
        # Their own organization's key cannot be revoked through B's path either.
        r = await post_form(
            browser,
            f"/portal/orgs/{org_b.id}/api-keys",
            f"/portal/orgs/{org_b.id}/api-keys/{key_a['id']}/revoke",
            {},
        )
        assert r.status_code == 404
        r = await post_form(
            browser,
            f"/portal/orgs/{org_b.id}/api-keys",
            f"/portal/orgs/{org_a.id}/api-keys/{key_a['id']}/revoke",
            {},
        )
        assert r.status_code == 404
    assert db_scalar("SELECT revoked_at FROM api_keys WHERE id = :k", k=key_a["id"]) is None


async def test_roles_see_only_their_pages(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    billing = await add_member(client, org, "billing")
    member = await add_member(client, org, "member")
    base = f"/portal/orgs/{org.id}"
    expected = {
        billing.email: {
            "/usage": 200,
            "/billing": 200,
            "/usage.csv": 200,
            "": 403,
            "/jobs": 403,
            "/members": 403,
            "/api-keys": 403,
            "/audit": 403,
        },
        member.email: {
            "": 200,
            "/jobs": 200,
            "/usage": 403,
            "/billing": 403,
            "/members": 403,
            "/api-keys": 403,
            "/audit": 403,
        },
        org.owner.email: {
            "": 200,
            "/jobs": 200,
            "/usage": 200,
            "/billing": 200,
            "/members": 200,
            "/api-keys": 200,
            "/audit": 200,
        },
    }
    for email, pages in expected.items():
        async with portal_client(app) as browser:
            await sign_in(browser, email)
            for suffix, status in pages.items():
                r = await browser.get(base + suffix)
                assert r.status_code == status, (email, suffix, r.status_code)
            home = await browser.get("/portal/")
            assert home.status_code == 303
            landing = base + ("/billing" if email == billing.email else "")
            assert home.headers["location"] == landing
            # The navigation offers only what the role may open.
            nav = (await browser.get(landing)).text
            assert (f'href="{base}/members"' in nav) == (email == org.owner.email)
            assert (f'href="{base}/jobs"' in nav) == (email != billing.email)


async def test_members_invite_role_and_owner_rules(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    admin = await add_member(client, org, "admin")
    members_url = f"/portal/orgs/{org.id}/members"
    async with portal_client(app, org.owner) as owner:
        invitee = f"{uuid.uuid4().hex[:10]}@example.com"
        r = await post_form(
            owner, members_url, f"{members_url}/invite", {"email": invitee, "role": "member"}
        )
        assert r.status_code == 303
        mail = db_rows(
            "SELECT body FROM email_messages WHERE to_address = :a AND kind = 'invitation'",
            a=invitee,
        )
        assert len(mail) == 1 and "/portal/invitations/accept?token=hmi_" in mail[0].body
        assert invitee in (await owner.get(members_url)).text  # pending, with its revoke button
        invitation_id = db_scalar("SELECT id FROM invitations WHERE email = :e", e=invitee)
        r = await post_form(
            owner, members_url, f"/portal/orgs/{org.id}/invitations/{invitation_id}/revoke", {}
        )
        assert r.status_code == 303
        assert db_scalar("SELECT revoked_at FROM invitations WHERE id = :i", i=invitation_id)
        assert invitee not in (await owner.get(members_url)).text
        r = await post_form(
            owner,
            members_url,
            f"{members_url}/invite",
            {"email": "not-an-address", "role": "member"},
        )
        assert r.status_code == 422
        assert (
            'aria-describedby="email-error"' in r.text and 'id="email-error" role="alert"' in r.text
        )
        # The last owner cannot leave or be demoted: the service's rule, shown on the page.
        r = await post_form(
            owner, members_url, f"{members_url}/{org.owner.id}/role", {"role": "member"}
        )
        assert r.status_code == 409 and "at least one owner" in r.text
    async with portal_client(app, admin) as browser:
        # An admin may not touch an owner.
        r = await post_form(browser, members_url, f"{members_url}/{org.owner.id}/remove", {})
        assert r.status_code == 403 and "Only an owner" in r.text
        member = await add_member(client, org, "member")
        r = await post_form(
            browser, members_url, f"{members_url}/{member.id}/role", {"role": "billing"}
        )
        assert r.status_code == 303
        r = await post_form(browser, members_url, f"{members_url}/{member.id}/remove", {})
        assert r.status_code == 303
    assert db_scalar("SELECT count(*) FROM memberships WHERE organization_id = :o", o=org.id) == 2
    actions = [
        row.action
        for row in db_rows("SELECT action FROM audit_events WHERE organization_id = :o", o=org.id)
    ]
    assert "member.role_changed" in actions and "member.removed" in actions


async def test_accept_an_invitation_in_the_portal(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    invitee = await register(client)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": invitee.email, "role": "admin"},
        headers=org.owner.headers,
    )
    token = r.json()["token"]
    accept_url = f"/portal/invitations/accept?token={token}"
    async with portal_client(app) as browser:
        r = await browser.get(accept_url)
        assert (
            r.status_code == 303
            and "next=%2Fportal%2Finvitations%2Faccept" in r.headers["location"]
        )
        await sign_in(browser, invitee.email)
        page = (await browser.get(accept_url)).text
        assert f"join <strong>{org.slug.title()}</strong> as <strong>admin</strong>" in page
        r = await post_form(browser, accept_url, "/portal/invitations/accept", {"token": token})
        assert r.status_code == 303 and r.headers["location"] == f"/portal/orgs/{org.id}"
        assert (await browser.get(f"/portal/orgs/{org.id}/members")).status_code == 200
        assert "This invitation is accepted." in (await browser.get(accept_url)).text
        r = await browser.post(
            "/portal/invitations/accept", data={"token": token, "csrf_token": csrf_of(page)}
        )
        assert r.status_code == 410 and "already been used" in r.text
    # Someone else's invitation shows nothing of it.
    async with portal_client(app, org.owner) as browser:
        page = (await browser.get(accept_url)).text
        assert "There is no invitation for" in page and org.slug.title() not in page
        assert "Join the organization" not in page


async def test_api_key_shown_once_then_revoked(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    keys_url = f"/portal/orgs/{org.id}/api-keys"
    async with portal_client(app, org.owner) as browser:
        r = await post_form(
            browser, keys_url, keys_url, {"name": "ci", "scopes": ["jobs:read", "usage:read"]}
        )
        assert r.status_code == 201, r.text
        secret = re.search(r'value="(hmk_[^"]+)"', r.text)
        assert secret
        key = secret.group(1)
        listing = (await browser.get(keys_url)).text
        assert key not in listing and "ci" in listing
        assert (await client.get("/v1/usage/limits", headers=bearer(key))).status_code == 200
        key_id = db_scalar("SELECT id FROM api_keys WHERE organization_id = :o", o=org.id)
        r = await post_form(browser, keys_url, f"{keys_url}/{key_id}/revoke", {})
        assert r.status_code == 303
        assert_problem(
            await client.get("/v1/usage/limits", headers=bearer(key)), 401, "api-key-revoked"
        )
        r = await post_form(browser, keys_url, keys_url, {"name": "", "scopes": "jobs:read"})
        assert r.status_code == 422 and 'id="name-error" role="alert"' in r.text
        r = await post_form(
            browser, keys_url, keys_url, {"name": "k", "scopes": "jobs:read", "expires_at": "soon"}
        )
        assert r.status_code == 422 and 'id="expires_at-error" role="alert"' in r.text
        # The same form posted twice (a reload, a double click) creates one key.
        page = (await browser.get(keys_url)).text
        once = re.search(r'name="form_once" value="([^"]+)"', page)
        assert once
        form = {"name": "once", "scopes": "jobs:read", "csrf_token": csrf_of(page)}
        form["form_once"] = once.group(1)
        assert (await browser.post(keys_url, data=form)).status_code == 201
        again = await browser.post(keys_url, data=form)
        assert again.status_code == 303 and "hmk_" not in again.text
        assert (
            db_scalar(
                "SELECT count(*) FROM api_keys WHERE organization_id = :o AND name = 'once'",
                o=org.id,
            )
            == 1
        )


async def test_member_quota_within_the_plan(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    url = f"/portal/orgs/{org.id}/quotas/members/{org.owner.id}"
    db_rows(
        "INSERT INTO org_billing (organization_id, plan_id, overrides) "
        "SELECT :o, id, CAST('{\"monthly_images\": 100}' AS jsonb) FROM plans WHERE is_default",
        o=org.id,
    )
    async with portal_client(app, org.owner) as browser:
        r = await post_form(browser, url, url, {"monthly_images": "5", "monthly_gpu_seconds": ""})
        assert r.status_code == 303
        r = await client.get(
            f"/v1/orgs/{org.id}/quota-limits/members/{org.owner.id}", headers=org.owner.headers
        )
        assert r.json()["monthly_images"] == 5 and r.json()["monthly_gpu_seconds"] is None
        r = await post_form(browser, url, url, {"monthly_images": "500"})
        assert r.status_code == 422 and "monthly_images" in r.text
        assert 'aria-invalid="true"' in r.text
        r = await post_form(browser, url, url, {"monthly_images": "many"})
        assert r.status_code == 422
    r = await client.get(
        f"/v1/orgs/{org.id}/quota-limits/members/{org.owner.id}", headers=org.owner.headers
    )
    assert r.json()["monthly_images"] == 5


async def test_usage_csv_and_pages_render(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    async with portal_client(app, org.owner) as browser:
        for url in org_pages(org.id):
            r = await browser.get(url)
            assert r.status_code == 200, (url, r.text[:500])
        r = await browser.get(f"/portal/orgs/{org.id}/usage.csv?group_by=operation")
        assert r.headers["content-type"].startswith("text/csv")
        assert f"usage-{org.slug}-operation-" in r.headers["content-disposition"]
        dashboard = (await browser.get(f"/portal/orgs/{org.id}")).text
        assert "<svg" in dashboard and dashboard.count('class="bar"') == 30


async def test_password_reset_and_verify_pages(app: Any, client: httpx.AsyncClient) -> None:
    account = await register(client)
    async with portal_client(app) as browser:
        r = await post_form(browser, "/portal/forgot", "/portal/forgot", {"email": account.email})
        assert r.status_code == 200 and "on its way" in r.text
        r = await post_form(
            browser, "/portal/forgot", "/portal/forgot", {"email": "nobody@example.com"}
        )
        assert r.status_code == 200 and "on its way" in r.text
        body = db_rows(
            "SELECT body FROM email_messages WHERE to_address = :a AND kind = 'reset_password'",
            a=account.email,
        )[0].body
        token = re.search(r"/portal/reset\?token=(\S+)", body)
        assert token
        reset_url = f"/portal/reset?token={token.group(1)}"
        r = await post_form(
            browser, reset_url, "/portal/reset", {"token": token.group(1), "password": "short"}
        )
        assert r.status_code == 400 and "at least" in r.text
        r = await post_form(
            browser,
            reset_url,
            "/portal/reset",
            {"token": token.group(1), "password": "Another-horse-77"},
        )
        assert r.status_code == 200 and "password is changed" in r.text
        assert (await client.get("/v1/users/me", headers=account.headers)).status_code == 401
        assert (await sign_in(browser, account.email, "Another-horse-77")).status_code == 303
        r = await post_form(
            browser,
            "/portal/reset?token=bad",
            "/portal/reset",
            {"token": "bad", "password": "Another-horse-78"},
        )
        assert r.status_code == 400 and "invalid or has expired" in r.text

        body = db_rows(
            "SELECT body FROM email_messages WHERE to_address = :a AND kind = 'verify'",
            a=account.email,
        )[0].body
        verify = re.search(r"/portal/verify\?token=(\S+)", body)
        assert verify
        verify_url = f"/portal/verify?token={verify.group(1)}"
        assert "Verify this address" in (await browser.get(verify_url)).text
        assert db_scalar("SELECT is_verified FROM users WHERE id = :u", u=account.id) is False
        r = await post_form(browser, verify_url, "/portal/verify", {"token": verify.group(1)})
        assert r.status_code == 200 and "is verified" in r.text
        assert db_scalar("SELECT is_verified FROM users WHERE id = :u", u=account.id) is True


@pytest.mark.usefixtures("s3")
async def test_operator_suspends_and_unsuspends(app: Any, client: httpx.AsyncClient) -> None:

    org = await make_org(client)
    key = bearer((await make_key(client, org))["key"])
    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    async with portal_client(app, operator) as browser:
        listing = await browser.get(f"/portal/operator?q={org.slug}")
        assert listing.status_code == 200 and org.slug in listing.text
        org_url = f"/portal/operator/orgs/{org.id}"
        r = await post_form(browser, org_url, f"{org_url}/suspension", {"action": "suspend"})
        assert r.status_code == 303
        assert "suspended since" in (await browser.get(org_url)).text
    # Refused at once, with a clear problem, for its keys and its members alike.
    assert_problem(await client.get("/v1/usage/limits", headers=key), 403, "organization-suspended")
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": '{"width": 32}'},
        files={"image": ("p.png", png(), "image/png")},
        headers=key,
    )
    assert_problem(r, 403, "organization-suspended")
    assert_problem(
        await client.get(f"/v1/orgs/{org.id}", headers=org.owner.headers),
        403,
        "organization-suspended",
    )
    async with portal_client(app, org.owner) as owner:
        r = await owner.get(f"/portal/orgs/{org.id}")
        assert r.status_code == 403 and "suspended" in r.text
    # Non-members still learn nothing.
    stranger = await register(client)
    assert_problem(await client.get(f"/v1/orgs/{org.id}", headers=stranger.headers), 404)
    # Through the API as well, and back.
    r = await client.post(f"/v1/admin/orgs/{org.id}/unsuspend", headers=operator.headers)
    assert r.status_code == 200 and r.json()["suspended_at"] is None
    assert (await client.get(f"/v1/orgs/{org.id}", headers=key)).status_code == 200
    r = await client.post(f"/v1/admin/orgs/{org.id}/suspend", headers=operator.headers)
    assert r.status_code == 200 and r.json()["suspended_at"] is not None
    assert_problem(
        await client.post(f"/v1/admin/orgs/{org.id}/suspend", headers=org.owner.headers),
        403,
        "operator-required",
    )
    assert_problem(
        await client.post(f"/v1/admin/orgs/{uuid.uuid4()}/suspend", headers=operator.headers), 404
    )
    # Nobody joins a suspended organization either.
    invitee = await register(client)
    db_rows("UPDATE organizations SET suspended_at = NULL WHERE id = :o", o=org.id)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": invitee.email, "role": "member"},
        headers=org.owner.headers,
    )
    db_rows("UPDATE organizations SET suspended_at = now() WHERE id = :o", o=org.id)
    assert_problem(
        await client.post(
            "/v1/invitations/accept", json={"token": r.json()["token"]}, headers=invitee.headers
        ),
        403,
        "organization-suspended",
    )
    await client.post(f"/v1/admin/orgs/{org.id}/unsuspend", headers=operator.headers)
    actions = [
        row.action
        for row in db_rows(
            "SELECT action FROM audit_events WHERE organization_id = :o ORDER BY created_at",
            o=org.id,
        )
    ]
    assert actions.count("organization.suspended") == 2
    assert actions.count("organization.unsuspended") == 2
    purposes = {
        row.purpose
        for row in db_rows(
            "SELECT purpose FROM operator_audit_events WHERE detail->>'org_id' = :o", o=org.id
        )
    }
    assert {"admin.orgs.suspend", "admin.orgs.unsuspend", "admin.orgs.read"} <= purposes


@pytest.mark.usefixtures("no_dispatch")
async def test_a_suspended_organizations_queued_jobs_wait(client: httpx.AsyncClient) -> None:
    """The dispatch claim leaves a suspended organization's jobs in the outbox. Each claim runs
    in a transaction that is rolled back, so no running dispatcher is disturbed."""
    from sqlalchemy import create_engine, pool, text

    from tests.conftest import superuser_url

    org = await make_org(client)
    key = bearer((await make_key(client, org))["key"])
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": '{"width": 32}'},
        files={"image": ("p.png", png(), "image/png")},
        headers=key,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)

    def claimed(suspended: bool) -> bool:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(
                text(
                    "UPDATE organizations SET suspended_at = "
                    "CASE WHEN :s THEN now() ELSE NULL END WHERE id = :o"
                ),
                {"s": suspended, "o": org.id},
            )
            # Only this job is in question: other outbox rows are out of the claim's reach.
            conn.execute(text("DELETE FROM job_outbox WHERE job_id <> :j"), {"j": job_id})
            rows = conn.execute(text("SELECT out_job FROM hm_claim_dispatch(100, 100)")).all()
            tx.rollback()
        return any(str(row.out_job) == job_id for row in rows)

    try:
        assert db_scalar("SELECT count(*) FROM job_outbox WHERE job_id = :j", j=job_id) == 1
        assert claimed(suspended=True) is False
        assert claimed(suspended=False) is True
    finally:
        engine.dispose()


async def test_a_job_dispatched_before_the_suspension_does_not_run(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """A job whose message was sent before the suspension reaches a worker after it: the
    worker leaves it queued and back in the outbox; restored, it runs once and is billed once."""
    org = await make_org(client)
    key = bearer((await make_key(client, org))["key"])
    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    r = await submit(client, key)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    # The dispatcher sends it with no worker running: the message waits in the broker.
    no_dispatch.start_dispatcher()
    until_sync(
        lambda: db_scalar("SELECT dispatched_at FROM jobs WHERE id = :j", j=job_id),
        timeout=60,  # the dispatcher process starts first
        what="the dispatch",
    )
    no_dispatch.stop()
    r = await client.post(f"/v1/admin/orgs/{org.id}/suspend", headers=operator.headers)
    assert r.status_code == 200, r.text
    no_dispatch.start_worker()
    until_sync(
        lambda: db_scalar("SELECT count(*) FROM job_outbox WHERE job_id = :j", j=job_id) == 1,
        timeout=60,
        what="the job back in the outbox",
    )
    job = db_rows("SELECT status, attempts, dispatched_at FROM jobs WHERE id = :j", j=job_id)[0]
    assert (job.status, job.attempts, job.dispatched_at) == ("queued", 0, None)

    r = await client.post(f"/v1/admin/orgs/{org.id}/unsuspend", headers=operator.headers)
    assert r.status_code == 200, r.text
    no_dispatch.start_dispatcher()
    until_sync(
        lambda: db_scalar("SELECT status FROM jobs WHERE id = :j", j=job_id) == "succeeded",
        timeout=60,
        what="the job run after the restore",
    )
    assert db_scalar("SELECT attempts FROM jobs WHERE id = :j", j=job_id) == 1
    until_sync(
        lambda: db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id),
        what="the job's usage event",
    )
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id) == 1
    no_dispatch.stop()


async def test_webhook_endpoints_in_the_portal(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    url = f"/portal/orgs/{org.id}/webhooks"
    async with portal_client(app, org.owner) as browser:
        r = await post_form(browser, url, url, {"url": "ftp://example.com/hook"})
        assert r.status_code == 422 and 'id="url-error" role="alert"' in r.text
        r = await post_form(
            browser,
            url,
            url,
            {"url": "http://127.0.0.1:9/hook", "event_types": ["job.succeeded", "webhook.test"]},
        )
        assert r.status_code == 201, r.text
        first_secret = re.search(r'id="new-secret" class="mono" readonly value="([^"]+)"', r.text)
        assert first_secret
        endpoint_id = db_scalar(
            "SELECT id FROM webhook_endpoints WHERE organization_id = :o", o=org.id
        )
        page = f"{url}/{endpoint_id}"
        assert first_secret.group(1) not in (await browser.get(page)).text
        assert (await post_form(browser, page, f"{page}/test", {})).status_code == 303
        assert "webhook.test" in (await browser.get(page)).text
        r = await post_form(browser, page, f"{page}/rotate", {})
        rotated = re.search(r'id="new-secret" class="mono" readonly value="([^"]+)"', r.text)
        assert rotated and rotated.group(1) != first_secret.group(1)
        delivery_id = db_scalar(
            "SELECT id FROM webhook_deliveries WHERE organization_id = :o", o=org.id
        )
        redeliver = f"/portal/orgs/{org.id}/webhook-deliveries/{delivery_id}/redeliver"
        r = await post_form(browser, page, redeliver, {})
        assert r.status_code == 409 and "still being attempted" in r.text
        db_rows("UPDATE webhook_deliveries SET status = 'failed' WHERE id = :d", d=delivery_id)
        assert (await post_form(browser, page, redeliver, {})).status_code == 303
        assert (
            db_scalar(
                "SELECT count(*) FROM webhook_deliveries WHERE redelivery_of = :d", d=delivery_id
            )
            == 1
        )
        assert (await post_form(browser, page, f"{page}/disable", {})).status_code == 303
        assert "disabled" in (await browser.get(url)).text
        assert (await post_form(browser, page, f"{page}/delete", {})).status_code == 303
        assert (await browser.get(page)).status_code == 404


async def test_operator_sees_queues_and_workers(
    app: Any, client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    # A real worker process with nothing to run: listed from its liveness key.
    idle = no_dispatch.start_worker()
    org = await make_org(client)
    key = bearer((await make_key(client, org))["key"])
    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    r = await client.post(f"/v1/admin/orgs/{org.id}/suspend", headers=operator.headers)
    assert r.status_code == 200
    # Submitted just before the suspension (as the suspension would find it): queued, waiting.
    db_rows("UPDATE organizations SET suspended_at = NULL WHERE id = :o", o=org.id)
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": '{"width": 32}'},
        files={"image": ("p.png", png(), "image/png")},
        headers=key,
    )
    assert r.status_code == 202, r.text
    db_rows("UPDATE organizations SET suspended_at = now() WHERE id = :o", o=org.id)
    worker = f"portal-test-{uuid.uuid4().hex[:6]}@host"
    db_rows(
        "UPDATE jobs SET worker = :w, heartbeat_at = now() WHERE id = :j",
        w=worker,
        j=r.json()["id"],
    )
    assert db_scalar("SELECT status FROM jobs WHERE id = :j", j=r.json()["id"]) == "queued"
    async with portal_client(app, operator) as browser:
        page = await browser.get("/portal/operator/queues")
    assert page.status_code == 200
    row = re.search(
        rf"{org.slug}</a> <span class=\"muted\">\(suspended\)</span></td>(.*?)</tr>",
        page.text,
        re.S,
    )
    assert row, page.text
    assert re.findall(r'<td class="num">(\d+)</td>', row.group(1))[:2] == ["1", "1"]
    # The worker named only by a job's heartbeat announces nothing: gone.
    gone = re.search(rf'<tr data-worker="{re.escape(worker)}">(.*?)</tr>', page.text, re.S)
    assert gone, page.text
    assert "<td>gone</td>" in gone.group(1)
    assert re.findall(r'<td class="num">(\d+)</td>', gone.group(1)) == ["0", "0"]
    alive = re.search(rf'<tr data-worker="[^"]*#{idle.pid}-[0-9a-f]+">(.*?)</tr>', page.text, re.S)
    assert alive, page.text
    assert "<td>alive</td>" in alive.group(1)
    assert f'<td class="num">{idle.pid}</td>' in alive.group(1)
    no_dispatch.stop_workers()
    assert (
        db_scalar(
            "SELECT count(*) FROM operator_audit_events WHERE purpose = 'admin.queues.read' "
            "AND detail->>'operator_id' = :u",
            u=operator.id,
        )
        == 1
    )
    async with portal_client(app, operator) as browser:
        page = await browser.get(
            "/portal/operator/usage?group_by=operation&start=2020-01-01&end=2024-01-01"
        )
        assert page.status_code == 200
        assert "Stripe reconciliation" in page.text and 'role="alert"' in page.text  # > 1 year
        assert (await browser.get("/portal/operator/usage?group_by=day")).status_code == 200
    assert (
        db_scalar(
            "SELECT count(*) FROM operator_audit_events WHERE purpose = 'admin.usage.report' "
            "AND detail->>'operator_id' = :u",
            u=operator.id,
        )
        == 2
    )
    async with portal_client(app, org.owner) as owner:
        for url in ("/portal/operator/queues", "/portal/operator/usage"):
            assert (await owner.get(url)).status_code == 404


@pytest.mark.usefixtures("recorder")
async def test_billing_sends_the_owner_to_stripe(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    admin = await add_member(client, org, "admin")
    url = f"/portal/orgs/{org.id}/billing"
    async with portal_client(app, org.owner) as browser:
        page = await browser.get(url)
        assert "Estimated charge" in page.text and 'value="pro"' in page.text
        r = await post_form(browser, url, f"{url}/checkout", {"plan": "pro"})
        assert r.status_code == 303
        assert r.headers["location"].startswith("https://checkout.stripe.com/")
        r = await post_form(browser, url, f"{url}/checkout", {"plan": "free"})
        assert r.status_code == 422 and "cannot be bought" in r.text
        r = await post_form(browser, url, f"{url}/portal", {})
        assert r.status_code == 303 and "stripe.com" in r.headers["location"]
        assert "checkout.stripe.com" in r.headers.get("content-security-policy", "")
    actions = [
        row.action
        for row in db_rows("SELECT action FROM audit_events WHERE organization_id = :o", o=org.id)
    ]
    assert "billing.checkout_started" in actions
    # An admin reads usage and the statement, but billing stays with owners and billing members.
    async with portal_client(app, admin) as browser:
        page = await browser.get(url)
        assert page.status_code == 200 and "Go to Stripe Checkout" not in page.text
        r = await post_form(browser, url, f"{url}/checkout", {"plan": "pro"})
        assert r.status_code == 403


@pytest.mark.usefixtures("no_dispatch")
async def test_jobs_browser_filters_and_cancel(app: Any, client: httpx.AsyncClient) -> None:

    org = await make_org(client)
    key = bearer((await make_key(client, org))["key"])
    ids = []
    for width in (32, 40):
        r = await client.post(
            "/v1/jobs",
            data={"operation": "resize", "params": f'{{"width": {width}}}'},
            files={"image": ("p.png", png(), "image/png")},
            headers=key,
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    # No dispatcher runs during this test: both stay queued.
    status = {
        row.id: row.status
        for row in db_rows("SELECT id::text, status FROM jobs WHERE organization_id = :o", o=org.id)
    }
    assert set(status.values()) == {"queued"}
    jobs_url = f"/portal/orgs/{org.id}/jobs"
    async with portal_client(app, org.owner) as browser:
        listing = (await browser.get(jobs_url)).text
        assert all(f'data-job="{i}"' in listing for i in ids)
        job_url = f"{jobs_url}/{ids[0]}"
        detail = (await browser.get(job_url)).text
        assert 'data-events="' in detail and "Cancel job" in detail
        r = await post_form(browser, job_url, f"{job_url}/cancel", {})
        assert r.status_code == 303
        assert db_scalar("SELECT status FROM jobs WHERE id = :j", j=ids[0]) == "canceled"
        canceled = (await browser.get(f"{jobs_url}?status=canceled")).text
        assert f'data-job="{ids[0]}"' in canceled and f'data-job="{ids[1]}"' not in canceled
        none = (await browser.get(f"{jobs_url}?operation=ghost_mannequin")).text
        assert "No jobs match." in none
        today = datetime.now(UTC).date().isoformat()
        during = (await browser.get(f"{jobs_url}?start={today}&end={today}")).text
        assert all(f'data-job="{i}"' in during for i in ids)
        before = (await browser.get(f"{jobs_url}?end=2020-01-01")).text
        assert "No jobs match." in before
        # The event stream of a finished job: its final state, then the end.
        events = await browser.get(f"{job_url}/events")
        assert events.headers["content-type"].startswith("text/event-stream")
        assert "event: job" in events.text and '"canceled"' in events.text
        r = await browser.get(f"{jobs_url}/{uuid.uuid4()}/events")
        assert r.status_code == 404


def test_the_portal_never_imports_workers() -> None:
    import ast
    from pathlib import Path

    import portal

    sources = list(Path(portal.__file__).parent.glob("*.py"))
    assert len(sources) >= 7, sources
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n == "workers" or n.startswith("workers.")], path


async def test_operator_sets_plan_and_overrides(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    org_url = f"/portal/operator/orgs/{org.id}"
    async with portal_client(app, operator) as browser:
        r = await post_form(
            browser,
            org_url,
            f"{org_url}/plan",
            {
                "plan": "pro",
                "override_monthly_images": "1234",
                "override_storage_bytes": "unlimited",
                "override_max_running_jobs": "",
            },
        )
        assert r.status_code == 303, r.text
        body = (await client.get(f"/v1/admin/orgs/{org.id}", headers=operator.headers)).json()
        assert body["plan"] == "pro"
        assert body["overrides"] == {"monthly_images": 1234, "storage_bytes": None}
        # The effective limits: the overrides, and the plan's where none is set.
        limits = body["limits"]
        assert limits["monthly_images"] == 1234 and limits["storage_bytes"] is None
        assert limits["max_running_jobs"] == 16
        page = (await browser.get(org_url)).text
        assert 'value="1234"' in page and 'value="unlimited"' in page
        assert "monthly_images 1234" in page and "storage_bytes unlimited" in page
        assert "max_running_jobs 16" in page
        r = await post_form(
            browser, org_url, f"{org_url}/plan", {"plan": "nope", "override_monthly_images": "1"}
        )
        assert r.status_code == 422 and 'role="alert"' in r.text
        r = await post_form(
            browser, org_url, f"{org_url}/plan", {"plan": "pro", "override_monthly_images": "-5"}
        )
        assert r.status_code == 422 and 'role="alert"' in r.text
    body = (await client.get(f"/v1/admin/orgs/{org.id}", headers=operator.headers)).json()
    assert body["overrides"] == {"monthly_images": 1234, "storage_bytes": None}
    assert "billing.plan_set" in [
        row.action
        for row in db_rows("SELECT action FROM audit_events WHERE organization_id = :o", o=org.id)
    ]


async def test_members_page_shows_and_clears_locks(
    app: Any, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hiddenmodel.settings import get_settings

    settings = get_settings()
    monkeypatch.setattr(settings, "auth_free_attempts", 1)
    monkeypatch.setattr(settings, "auth_lock_after", 2)
    org = await make_org(client)
    member = await add_member(client, org, "member")
    async with portal_client(app) as browser:
        for status in (400, 400, 429):
            r = await sign_in(browser, member.email, "Wrong-password-1")
            assert r.status_code == status, r.text
    async with portal_client(app, org.owner) as owner:
        members = f"/portal/orgs/{org.id}/members"
        page = await owner.get(members)
        assert "Locked accounts" in page.text and member.email in page.text
        r = await post_form(owner, members, f"{members}/{member.id}/unlock", {})
        assert r.status_code == 303, r.text
        assert "Locked accounts" not in (await owner.get(members)).text
    async with portal_client(app) as browser:
        assert (await sign_in(browser, member.email)).status_code == 303


async def test_confirm_email_page(app: Any, client: httpx.AsyncClient) -> None:
    account = await register(client)
    new_email = f"new{uuid.uuid4().hex[:10]}@example.com"
    r = await client.patch(
        "/v1/users/me",
        json={"email": new_email, "current_password": PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text
    body = db_scalar(
        "SELECT body FROM email_messages WHERE to_address = :e AND kind = 'email_change'",
        e=new_email,
    )
    link = re.search(r"(/portal/confirm-email\?token=\S+)", body)
    assert link, body
    token = link.group(1).split("=", 1)[1]
    async with portal_client(app) as browser:
        r = await post_form(browser, link.group(1), "/portal/confirm-email", {"token": token})
        assert r.status_code == 200 and f"is now {new_email}" in r.text, r.text
        r = await post_form(browser, link.group(1), "/portal/confirm-email", {"token": token})
        assert r.status_code == 400
    assert db_scalar("SELECT email FROM users WHERE id = :u", u=account.id) == new_email
