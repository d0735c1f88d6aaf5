"""Accounts: register, login, logout, reset, verify, /v1/me — and their refusals."""

from __future__ import annotations

import re

import httpx

from tests.conftest import PASSWORD, assert_problem, db_rows, db_scalar, register, unique


def _last_mail(email: str, kind: str) -> str:
    rows = db_rows(
        "SELECT body FROM email_messages WHERE to_address = :e AND kind = :k "
        "ORDER BY created_at DESC LIMIT 1",
        e=email.lower(),
        k=kind,
    )
    assert rows, f"no {kind} mail to {email}"
    body: str = rows[0][0]
    return body


def _token_in(body: str) -> str:
    match = re.search(r"^token: (\S+)$", body, re.M)
    assert match, body
    return match.group(1)


async def test_register_login_me_logout(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.get("/v1/me", headers=account.headers)
    assert r.status_code == 200
    body = r.json()
    assert body["kind"] == "user" and body["user"]["email"] == account.email
    assert body["organizations"] == []
    assert "hashed_password" not in r.text
    # Session tokens are stored only as keyed hashes.
    assert (
        db_scalar("SELECT count(*) FROM access_tokens WHERE token_hash = :t", t=account.token) == 0
    )
    r = await client.post("/v1/auth/logout", headers=account.headers)
    assert r.status_code == 204
    assert_problem(await client.get("/v1/me", headers=account.headers), 401, "invalid-token")


async def test_register_refusals_write_nothing(client: httpx.AsyncClient) -> None:
    before = db_scalar("SELECT count(*) FROM users")
    r = await client.post("/v1/auth/register", json={"email": "not-an-email", "password": PASSWORD})
    assert_problem(r, 422, "validation-error")
    assert any(e["loc"][-1] == "email" for e in r.json()["errors"])
    email = f"{unique()}@example.com"
    for weak in ("short1!", "aaaaaaaaaaaaaa", "password123", "alllowercaseletters"):
        r = await client.post("/v1/auth/register", json={"email": email, "password": weak})
        assert_problem(r, 400, "register-invalid-password")
        assert r.json()["detail"]
    r = await client.post(
        "/v1/auth/register",
        content=b'{"email": "x@example.com", "password": ',
        headers={"content-type": "application/json"},
    )
    assert_problem(r, 400, "malformed-json")
    assert db_scalar("SELECT count(*) FROM users") == before


async def test_duplicate_registration_and_bad_login(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(
        "/v1/auth/register", json={"email": account.email.upper(), "password": PASSWORD}
    )
    # The same answer as a new account (see test_account_security): nobody learns who has one.
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/auth/login", data={"username": account.email, "password": "Wrong-password-1"}
    )
    assert_problem(r, 400, "login-bad-credentials")


async def test_forgot_and_reset_password_ends_old_sessions(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post("/v1/auth/forgot-password", json={"email": account.email})
    assert r.status_code == 202
    token = _token_in(_last_mail(account.email, "reset_password"))
    r = await client.post("/v1/auth/reset-password", json={"token": token, "password": "weak"})
    assert_problem(r, 400, "reset-password-invalid-password")
    new_password = "Another-strong-77"
    r = await client.post(
        "/v1/auth/reset-password", json={"token": token, "password": new_password}
    )
    assert r.status_code == 200, r.text
    assert_problem(await client.get("/v1/me", headers=account.headers), 401)
    r = await client.post(
        "/v1/auth/login", data={"username": account.email, "password": new_password}
    )
    assert r.status_code == 200
    r = await client.post(
        "/v1/auth/reset-password", json={"token": "garbage", "password": new_password}
    )
    assert_problem(r, 400, "reset-password-bad-token")


async def test_verify_email(client: httpx.AsyncClient) -> None:
    account = await register(client)
    token = _token_in(_last_mail(account.email, "verify"))
    r = await client.post("/v1/auth/verify", json={"token": token})
    assert r.status_code == 200 and r.json()["is_verified"] is True
    r = await client.post("/v1/auth/verify", json={"token": token})
    assert_problem(r, 400, "verify-user-already-verified")


async def test_cookie_login_for_the_portal(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post(
        "/v1/auth/cookie/login", data={"username": account.email, "password": PASSWORD}
    )
    assert r.status_code == 204
    cookie = r.headers["set-cookie"]
    assert "hm_session=" in cookie and "HttpOnly" in cookie and "SameSite=lax" in cookie


async def test_unauthenticated_and_malformed_authorization(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/me")
    assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    assert_problem(await client.get("/v1/me", headers={"Authorization": "Basic abc"}), 401)
    assert_problem(
        await client.get("/v1/me", headers={"Authorization": "Bearer nonsense"}),
        401,
        "invalid-token",
    )


async def test_operators_are_superusers(client: httpx.AsyncClient) -> None:
    account = await register(client)
    other = await register(client)
    assert_problem(await client.get(f"/v1/users/{other.id}", headers=account.headers), 403)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :id", id=account.id)
    r = await client.get(f"/v1/users/{other.id}", headers=account.headers)
    assert r.status_code == 200 and r.json()["email"] == other.email
