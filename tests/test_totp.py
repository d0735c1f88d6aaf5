"""Two-factor sign-in (TOTP): enrollment, the code step of sign-in (bearer, cookie, portal),
guessing control, replay, recovery codes, the organization requirement, and the secret's
column kept from the roles that serve requests."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pyotp
import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, pool, text
from sqlalchemy.exc import ProgrammingError

from hiddenmodel.settings import get_settings
from tenants.totp import unseal_secret
from tests.conftest import (
    PASSWORD,
    Account,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
)
from tests.factories import add_member
from tests.portal_http import csrf_of, portal_client, post_form
from tests.portal_http import sign_in as portal_sign_in

STEP = 30


def _code(secret: str, steps_from_now: int = 0) -> str:
    return pyotp.TOTP(secret).at(int(time.time()) + steps_from_now * STEP)


async def _enroll(client: httpx.AsyncClient, account: Account) -> tuple[str, list[str]]:
    """Turn TOTP on for ``account``; answers its secret and recovery codes."""
    r = await client.post(
        "/v1/users/me/totp", json={"current_password": PASSWORD}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    secret = r.json()["secret"]
    assert r.json()["otpauth_uri"] == pyotp.TOTP(secret).provisioning_uri(
        name=account.email, issuer_name="Hidden Model"
    )
    # The previous step's code: confirming leaves this step's code for the test's sign-in.
    r = await client.post(
        "/v1/users/me/totp/confirm", json={"code": _code(secret, -1)}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    codes = r.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    return secret, codes


async def _password_step(
    client: httpx.AsyncClient, email: str, path: str = "/v1/auth/login"
) -> str:
    r = await client.post(path, data={"username": email, "password": PASSWORD})
    assert_problem(r, 401, "totp-required")
    assert "access_token" not in r.text and "set-cookie" not in r.headers
    challenge: str = r.json()["challenge"]
    return challenge


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> Any:
    settings = get_settings()

    def set_limits(**values: Any) -> None:
        for name, value in values.items():
            monkeypatch.setattr(settings, name, value)

    return set_limits


async def test_enroll_confirm_and_sign_in_with_bearer_and_cookie(client: httpx.AsyncClient) -> None:
    account = await register(client)
    # Enrollment needs the current password, and is not active until confirmed.
    r = await client.post(
        "/v1/users/me/totp", json={"current_password": "Wrong-pass-9"}, headers=account.headers
    )
    assert_problem(r, 400, "invalid-current-password")
    r = await client.post(
        "/v1/users/me/totp", json={"current_password": PASSWORD}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    pending = r.json()["secret"]
    r = await client.post("/v1/auth/login", data={"username": account.email, "password": PASSWORD})
    assert r.status_code == 200, r.text  # not active yet
    r = await client.post(
        "/v1/users/me/totp/confirm",
        json={"code": "000000" if _code(pending) != "000000" else "111111"},
        headers=account.headers,
    )
    assert_problem(r, 400, "invalid-totp-code")

    secret, _ = await _enroll(client, account)  # a new enrollment replaces the pending one
    assert secret != pending
    # Bearer: the password alone gives a challenge, not a session; the code gives the token.
    challenge = await _password_step(client, account.email)
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": _code(secret)})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    me = await client.get("/v1/users/me", headers=bearer(token))
    assert me.status_code == 200 and me.json()["email"] == account.email

    # Cookie: the same two steps; the second sets the cookie.
    challenge = await _password_step(client, account.email, "/v1/auth/cookie/login")
    r = await client.post(
        "/v1/auth/cookie/totp", json={"challenge": challenge, "code": _code(secret, 1)}
    )
    assert r.status_code == 204, r.text
    assert "hm_session=" in r.headers["set-cookie"]
    # A forged or expired challenge opens nothing.
    r = await client.post(
        "/v1/auth/totp", json={"challenge": challenge + "x", "code": _code(secret)}
    )
    assert_problem(r, 401, "invalid-totp-challenge")
    # Enrolling again while on is refused.
    r = await client.post(
        "/v1/users/me/totp", json={"current_password": PASSWORD}, headers=account.headers
    )
    assert_problem(r, 409, "totp-already-enabled")


async def test_a_code_is_not_accepted_twice(client: httpx.AsyncClient) -> None:
    account = await register(client)
    secret, _ = await _enroll(client, account)
    code = _code(secret, 1)
    challenge = await _password_step(client, account.email)
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": code})
    assert r.status_code == 200, r.text
    # The same code again (within its window) is refused, and so is an earlier step's.
    challenge = await _password_step(client, account.email)
    for replay in (code, _code(secret), _code(secret, -1)):
        r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": replay})
        assert_problem(r, 400, "invalid-totp-code")
    last_step = db_scalar("SELECT last_used_step FROM user_totp WHERE user_id = :u", u=account.id)
    assert last_step == int(time.time()) // STEP + 1 or last_step == int(time.time()) // STEP


async def test_wrong_codes_count_and_lock(client: httpx.AsyncClient, strict: Any) -> None:
    account = await register(client)
    secret, _ = await _enroll(client, account)
    strict(
        auth_free_attempts=1,
        auth_lock_after=3,
        auth_backoff_base_seconds=0.001,
        auth_lock_seconds=300,
    )
    challenge = await _password_step(client, account.email)
    wrong = "000000" if _code(secret) != "000000" else "111111"
    for _ in range(3):
        r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": wrong})
        assert_problem(r, 400, "invalid-totp-code")
    # The third failure locked the account: even the right code waits for the lock time.
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": _code(secret)})
    assert_problem(r, 429, "too-many-attempts")
    assert "Locked" in r.json()["detail"]
    assert int(r.headers["retry-after"]) > 60


async def test_a_recovery_code_works_once_and_disable(client: httpx.AsyncClient) -> None:
    account = await register(client)
    secret, codes = await _enroll(client, account)
    challenge = await _password_step(client, account.email)
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": codes[0].upper()})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": codes[0]})
    assert_problem(r, 400, "invalid-totp-code")
    # Stored by hash only.
    stored = db_rows(
        "SELECT code_hash, used_at FROM totp_recovery_codes WHERE user_id = :u", u=account.id
    )
    assert len(stored) == 10 and sum(row.used_at is not None for row in stored) == 1
    assert not {row.code_hash for row in stored} & set(codes)
    # Turning it off needs the password and a code (or recovery code).
    r = await client.request(
        "DELETE",
        "/v1/users/me/totp",
        json={"current_password": PASSWORD, "code": "abcde-fghjk"},
        headers=account.headers,
    )
    assert_problem(r, 400, "invalid-totp-code")
    r = await client.request(
        "DELETE",
        "/v1/users/me/totp",
        json={"current_password": PASSWORD, "code": codes[1]},
        headers=account.headers,
    )
    assert r.status_code == 204, r.text
    r = await client.post("/v1/auth/login", data={"username": account.email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert (
        db_scalar("SELECT count(*) FROM totp_recovery_codes WHERE user_id = :u", u=account.id) == 0
    )
    assert secret


async def test_organization_requires_two_factor_of_members_not_api_keys(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    member = await add_member(client, org)
    key = await make_key(client, org)
    # Only an owner, and one with two-factor on, may require it.
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": True}, headers=member.headers
    )
    assert r.status_code == 403, r.text
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": True}, headers=org.owner.headers
    )
    assert_problem(r, 409, "two-factor-required")
    await _enroll(client, org.owner)
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": True}, headers=org.owner.headers
    )
    assert r.status_code == 200 and r.json()["require_two_factor"] is True, r.text
    assert "organization.two_factor_required" in [
        row.action
        for row in db_rows("SELECT action FROM audit_events WHERE organization_id = :o", o=org.id)
    ]
    # The member without two-factor is refused; the owner's session (opened before) works.
    r = await client.get(f"/v1/orgs/{org.id}", headers=member.headers)
    assert_problem(r, 403, "two-factor-required")
    assert r.json()["enroll_url"].endswith("/portal/account")
    r = await client.get(f"/v1/orgs/{org.id}/members", headers=org.owner.headers)
    assert r.status_code == 200, r.text
    flags = {m["user_id"]: m["two_factor"] for m in r.json()["items"]}
    assert flags == {org.owner.id: True, member.id: False}
    # API keys are not people: unaffected.
    r = await client.get("/v1/jobs", headers=bearer(key["key"]))
    assert r.status_code == 200, r.text
    # Once enrolled, the member is let in.
    await _enroll(client, member)
    r = await client.get(f"/v1/orgs/{org.id}", headers=member.headers)
    assert r.status_code == 200, r.text


async def test_the_secret_is_sealed_and_unreadable_by_the_app_role(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    secret, _ = await _enroll(client, account)
    sealed = bytes(
        db_scalar("SELECT secret_ciphertext FROM user_totp WHERE user_id = :u", u=account.id)
    )
    assert secret.encode() not in sealed
    for url in (get_settings().database_url, get_settings().database_ops_url):
        engine = create_engine(url, poolclass=pool.NullPool)
        try:
            for sql in (
                "SELECT secret_ciphertext FROM user_totp",
                "SELECT * FROM user_totp",
                "SELECT code_hash FROM totp_recovery_codes",
            ):
                with (
                    engine.connect() as conn,
                    pytest.raises(ProgrammingError, match="permission denied"),
                ):
                    conn.execute(text(sql))
        finally:
            engine.dispose()


async def test_portal_sign_in_with_the_code_step_and_account_page(
    app: Any, client: httpx.AsyncClient
) -> None:
    account = await register(client)
    async with portal_client(app, account) as browser:
        r = await post_form(
            browser, "/portal/account", "/portal/account/totp", {"current_password": PASSWORD}
        )
        assert r.status_code == 200, r.text
        assert "otpauth://totp/" in r.text
        secret = r.text.split('class="totp-secret">', 1)[1].split("<", 1)[0]
        r = await post_form(
            browser, "/portal/account", "/portal/account/totp/confirm", {"code": _code(secret, -1)}
        )
        assert r.status_code == 200, r.text
        assert r.text.count("<li><code>") == 10
    async with portal_client(app) as browser:
        r = await portal_sign_in(browser, account.email)
        assert r.status_code == 200, r.text
        assert 'name="code"' in r.text and "hm_session" not in r.headers.get("set-cookie", "")
        challenge = r.text.split('name="challenge" value="', 1)[1].split('"', 1)[0]
        r = await browser.post(
            "/portal/login/totp",
            data={
                "challenge": challenge,
                "code": "12345",
                "next": "/portal/",
                "csrf_token": csrf_of(r.text),
            },
        )
        assert r.status_code == 400 and 'name="code"' in r.text, r.text
        r = await browser.post(
            "/portal/login/totp",
            data={
                "challenge": challenge,
                "code": _code(secret),
                "next": "/portal/account",
                "csrf_token": csrf_of(r.text),
            },
        )
        assert r.status_code == 303, r.text
        page = await browser.get("/portal/account")
        assert page.status_code == 200 and "Turn off two-factor sign-in" in page.text


async def test_portal_pages_of_an_organization_requiring_two_factor(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    member = await add_member(client, org, "admin")
    await _enroll(client, org.owner)
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": True}, headers=org.owner.headers
    )
    assert r.status_code == 200, r.text
    async with portal_client(app, member) as browser:
        page = await browser.get(f"/portal/orgs/{org.id}/members")
        assert page.status_code == 403
        assert 'href="/portal/account#two-factor"' in page.text


async def _portal_with_code(browser: httpx.AsyncClient, account: Account, secret: str) -> None:
    """Sign ``browser`` in through the portal's password and code steps."""
    r = await portal_sign_in(browser, account.email)
    assert r.status_code == 200 and 'name="code"' in r.text, r.text
    challenge = r.text.split('name="challenge" value="', 1)[1].split('"', 1)[0]
    r = await browser.post(
        "/portal/login/totp",
        data={
            "challenge": challenge,
            "code": _code(secret, 1),
            "next": "/portal/",
            "csrf_token": csrf_of(r.text),
        },
    )
    assert r.status_code == 303, r.text


async def test_portal_owner_switch_and_members_column(app: Any, client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    admin = await add_member(client, org, "admin")
    secret, _ = await _enroll(client, org.owner)
    members = f"/portal/orgs/{org.id}/members"
    async with portal_client(app) as browser:
        await _portal_with_code(browser, org.owner, secret)
        page = await browser.get(members)
        assert "Require two-factor sign-in" in page.text
        r = await post_form(
            browser, members, f"/portal/orgs/{org.id}/two-factor", {"require": "on"}
        )
        assert r.status_code == 303, r.text
        page = await browser.get(members)
        assert "Required:" in page.text and "Stop requiring two-factor sign-in" in page.text
        # The members table says who has two-factor on.
        assert page.text.count("<td>On</td>") == 1
    body = (await client.get(f"/v1/orgs/{org.id}", headers=org.owner.headers)).json()
    assert body["require_two_factor"] is True
    # An admin cannot change it (and, without two-factor, cannot even use the organization).
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": False}, headers=admin.headers
    )
    assert_problem(r, 403, "two-factor-required")
    await _enroll(client, admin)
    r = await client.patch(
        f"/v1/orgs/{org.id}", json={"require_two_factor": False}, headers=admin.headers
    )
    assert_problem(r, 403, "insufficient-role")


async def test_sealed_secrets_and_challenges_survive_a_key_rotation(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = await register(client)
    secret, codes = await _enroll(client, account)
    challenge = await _password_step(client, account.email)
    settings = get_settings()
    monkeypatch.setattr(settings, "secret_key_previous", settings.secret_key)
    monkeypatch.setattr(
        settings, "secret_key", SecretStr("rotated-totp-key-0123456789abcdef0123456789")
    )
    # The challenge signed, the secret sealed and the recovery codes hashed under the old key
    # all still work while it is the previous key.
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": _code(secret, 1)})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/auth/totp", json={"challenge": challenge, "code": codes[0]})
    assert r.status_code == 200, r.text
    # The accepted code sealed the secret again under the new key: it opens without the old.
    monkeypatch.setattr(settings, "secret_key_previous", None)
    blob = bytes(
        db_scalar("SELECT secret_ciphertext FROM user_totp WHERE user_id = :u", u=account.id)
    )
    assert unseal_secret(blob, uuid.UUID(account.id)) == secret
