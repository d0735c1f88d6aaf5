"""A login token alone cannot take an account over; registration and password reset do not
tell who has an account; member addresses only for who manages members; production refuses
development switches."""

from __future__ import annotations

import logging

import httpx
import pytest
from pydantic import ValidationError

from hiddenmodel.settings import DEV_SECRET_KEY, Settings
from tests.conftest import (
    PASSWORD,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import add_member, last_mail, mail_count, token_in

NEW_PASSWORD = "Another-strong-77"


async def _login(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post("/v1/auth/login", data={"username": email, "password": password})


async def test_email_change_takes_effect_only_when_confirmed(client: httpx.AsyncClient) -> None:
    account = await register(client)
    new_email = f"{unique('new')}@example.com"
    r = await client.patch("/v1/users/me", json={"email": new_email}, headers=account.headers)
    assert_problem(r, 400, "current-password-required")
    r = await client.patch(
        "/v1/users/me",
        json={"email": new_email, "current_password": "Wrong-password-1"},
        headers=account.headers,
    )
    assert_problem(r, 400, "invalid-current-password")
    assert mail_count(new_email, "email_change") == 0

    r = await client.patch(
        "/v1/users/me",
        json={"email": new_email, "current_password": PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["email"] == account.email  # not yet
    assert new_email in last_mail(account.email, "email_change_notice")
    token = token_in(last_mail(new_email, "email_change"))
    assert (await _login(client, new_email, PASSWORD)).status_code == 400

    r = await client.post("/v1/auth/confirm-email", json={"token": token})
    assert r.status_code == 200, r.text
    assert r.json()["email"] == new_email and r.json()["is_verified"] is True
    assert (await _login(client, new_email, PASSWORD)).status_code == 200
    assert (await _login(client, account.email, PASSWORD)).status_code == 400
    # Single use.
    r = await client.post("/v1/auth/confirm-email", json={"token": token})
    assert_problem(r, 400, "email-change-bad-token")


async def test_email_change_link_expires(client: httpx.AsyncClient) -> None:
    account = await register(client)
    new_email = f"{unique('new')}@example.com"
    r = await client.patch(
        "/v1/users/me",
        json={"email": new_email, "current_password": PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text
    token = token_in(last_mail(new_email, "email_change"))
    db_rows(
        "UPDATE email_changes SET expires_at = now() - interval '1 second' WHERE user_id = :u",
        u=account.id,
    )
    assert_problem(
        await client.post("/v1/auth/confirm-email", json={"token": token}),
        400,
        "email-change-bad-token",
    )
    assert db_scalar("SELECT email FROM users WHERE id = :u", u=account.id) == account.email


async def test_email_change_to_a_taken_address_changes_nothing(client: httpx.AsyncClient) -> None:
    account, other = await register(client), await register(client)
    r = await client.patch(
        "/v1/users/me",
        json={"email": other.email, "current_password": PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text  # the same answer as for a free address
    assert mail_count(other.email, "email_change") == 0
    assert mail_count(other.email, "email_change_existing") == 1
    assert db_scalar("SELECT count(*) FROM email_changes WHERE user_id = :u", u=account.id) == 0


async def test_password_change_needs_current_password_and_ends_other_sessions(
    client: httpx.AsyncClient,
) -> None:
    account = await register(client)
    second = (await _login(client, account.email, PASSWORD)).json()["access_token"]
    r = await client.post(
        "/v1/auth/cookie/login", data={"username": account.email, "password": PASSWORD}
    )
    cookie = {"Cookie": r.headers["set-cookie"].split(";")[0]}
    r = await client.patch("/v1/users/me", json={"password": NEW_PASSWORD}, headers=account.headers)
    assert_problem(r, 400, "current-password-required")
    r = await client.patch(
        "/v1/users/me",
        json={"password": NEW_PASSWORD, "current_password": "Wrong-password-1"},
        headers=account.headers,
    )
    assert_problem(r, 400, "invalid-current-password")
    assert (await client.get("/v1/me", headers=bearer(second))).status_code == 200

    r = await client.patch(
        "/v1/users/me",
        json={"password": "weak", "current_password": PASSWORD},
        headers=account.headers,
    )
    assert_problem(r, 400, "update-user-invalid-password")
    r = await client.patch(
        "/v1/users/me",
        json={"password": NEW_PASSWORD, "current_password": PASSWORD},
        headers=account.headers,
    )
    assert r.status_code == 200, r.text
    # The caller's own session stays; every other one ends.
    assert (await client.get("/v1/me", headers=account.headers)).status_code == 200
    assert_problem(await client.get("/v1/me", headers=bearer(second)), 401, "invalid-token")
    assert_problem(await client.get("/v1/me", headers=cookie), 401, "invalid-token")
    assert (await _login(client, account.email, PASSWORD)).status_code == 400
    assert (await _login(client, account.email, NEW_PASSWORD)).status_code == 200
    assert mail_count(account.email, "password_changed") == 1


async def test_name_changes_without_password(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.patch("/v1/users/me", json={"name": "Ana"}, headers=account.headers)
    assert r.status_code == 200 and r.json()["name"] == "Ana"


@pytest.mark.parametrize(
    "body",
    [
        {"email": None},
        {"password": None},
        {"email": "not-an-address"},
        {"is_superuser": True},
        {"is_verified": True},
    ],
)
async def test_bad_account_updates_are_422_and_log_no_row(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, body: dict[str, object]
) -> None:
    account = await register(client)
    with caplog.at_level(logging.DEBUG):
        r = await client.patch("/v1/users/me", json=body, headers=account.headers)
    assert_problem(r, 422, "validation-error")
    assert "argon2" not in caplog.text and "hashed_password" not in caplog.text
    row = db_rows("SELECT email, is_superuser, is_verified FROM users WHERE id = :u", u=account.id)[
        0
    ]
    assert tuple(row) == (account.email, False, False)


async def test_registration_does_not_tell_who_has_an_account(client: httpx.AsyncClient) -> None:
    account = await register(client)
    users = db_scalar("SELECT count(*) FROM users")
    r = await client.post(
        "/v1/auth/register", json={"email": account.email.upper(), "password": PASSWORD}
    )
    fresh = await client.post(
        "/v1/auth/register", json={"email": f"{unique()}@example.com", "password": PASSWORD}
    )
    assert r.status_code == fresh.status_code == 201
    assert set(r.json()) == set(fresh.json())
    assert r.json()["id"] != account.id and r.json()["is_verified"] is False
    assert db_scalar("SELECT count(*) FROM users") == users + 1
    assert mail_count(account.email, "register_existing") == 1
    # A weak password is refused alike, before anything else is looked at.
    r = await client.post("/v1/auth/register", json={"email": account.email, "password": "weak"})
    assert_problem(r, 400, "register-invalid-password")


async def test_forgot_password_answers_alike(client: httpx.AsyncClient) -> None:
    account = await register(client)
    known = await client.post("/v1/auth/forgot-password", json={"email": account.email})
    unknown = await client.post(
        "/v1/auth/forgot-password", json={"email": f"{unique()}@example.com"}
    )
    assert known.status_code == unknown.status_code == 202
    assert known.content == unknown.content
    assert mail_count(account.email, "reset_password") == 1


async def test_member_addresses_only_for_member_managers(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    member = await add_member(client, org)
    admin = await add_member(client, org, "admin")
    path = f"/v1/orgs/{org.id}/members"

    def emails(r: httpx.Response) -> set[object]:
        assert r.status_code == 200, r.text
        return {m["email"] for m in r.json()["items"]}

    everyone = {org.owner.email, member.email, admin.email}
    assert emails(await client.get(path, headers=org.owner.headers)) == everyone
    assert emails(await client.get(path, headers=admin.headers)) == everyone
    assert emails(await client.get(path, headers=member.headers)) == {None}
    read_key = bearer((await make_key(client, org, ["jobs:read"]))["key"])
    admin_key = bearer((await make_key(client, org, ["admin"]))["key"])
    assert emails(await client.get(path, headers=read_key)) == {None}
    assert emails(await client.get(path, headers=admin_key)) == everyone


def test_production_refuses_development_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HM_WEBHOOK_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.setenv("HM_ENVIRONMENT", "production")
    assert Settings().is_production  # the test's secret key, no development switch: starts
    with pytest.raises(ValidationError, match="HM_WEBHOOK_ALLOW_PRIVATE_URLS"):
        Settings(webhook_allow_private_urls=True)
    monkeypatch.setenv("HM_WEBHOOK_ALLOW_PRIVATE_URLS", "true")
    with pytest.raises(ValidationError, match="HM_WEBHOOK_ALLOW_PRIVATE_URLS"):
        Settings()
    monkeypatch.delenv("HM_WEBHOOK_ALLOW_PRIVATE_URLS")
    monkeypatch.setenv("HM_SECRET_KEY", DEV_SECRET_KEY)
    with pytest.raises(ValidationError, match="HM_SECRET_KEY"):
        Settings()
    # Development keeps its conveniences.
    monkeypatch.setenv("HM_ENVIRONMENT", "development")
    assert Settings().webhook_allow_private_urls is True


async def test_database_errors_log_no_row_values(caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.exc import IntegrityError
    from starlette.requests import Request

    from hiddenmodel.db import async_global_session
    from hiddenmodel.errors import _unhandled_handler
    from tenants.models import User

    secret_hash = "$argon2id$v=19$m=64,t=1,p=1$never-in-a-log"
    async with async_global_session() as session:
        session.add(User(email=None, hashed_password=secret_hash))  # NOT NULL breaks
        with pytest.raises(IntegrityError) as caught:
            await session.flush()
        await session.rollback()
    # PostgreSQL itself repeats the failing row; the statement's parameters are hidden.
    assert "SQL parameters hidden" in str(caught.value)
    with caplog.at_level(logging.DEBUG):
        r = await _unhandled_handler(Request({"type": "http", "headers": []}), caught.value)
    assert r.status_code == 500
    assert "NotNullViolation" in caplog.text and "email" in caplog.text
    assert "never-in-a-log" not in caplog.text
