"""Least privilege inside PostgreSQL: what the app role may read and run, and what logs carry.

The app role (``hm_app``, every API request) reads no password hash and no token hash; the
lookups by hash are definer functions that answer with a verdict. The cross-tenant sweeps
run only as ``hm_worker``; ``hm_user_organizations`` answers only for the bound user. A
failed statement whose parameters hold a hash leaves no hash in the logs.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, ProgrammingError

from hiddenmodel.db import async_engine, sync_engine
from hiddenmodel.security import keyed_hash
from hiddenmodel.settings import get_settings
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
from tests.factories import keyed_org, submit

HASH_COLUMNS = [
    ("users", "hashed_password"),
    ("access_tokens", "token_hash"),
    ("api_keys", "key_hash"),
    ("invitations", "token_hash"),
    ("email_changes", "token_hash"),
    ("user_totp", "secret_ciphertext"),
    ("totp_recovery_codes", "code_hash"),
]

# Each worker-only function with arguments that make it run.
WORKER_CALLS = {
    "hm_claim_dispatch": "SELECT * FROM hm_claim_dispatch(100, 100)",
    "hm_jobs_to_reconcile": "SELECT * FROM hm_jobs_to_reconcile(60, 60, 3600)",
    "hm_running_jobs": "SELECT * FROM hm_running_jobs()",
    "hm_usage_events_due": "SELECT * FROM hm_usage_events_due(100)",
    "hm_billing_customer_orgs": "SELECT * FROM hm_billing_customer_orgs()",
    "hm_webhook_deliveries_due": "SELECT * FROM hm_webhook_deliveries_due(0, 100)",
    "hm_jobs_past_retention": "SELECT * FROM hm_jobs_past_retention(now(), 100)",
    "hm_retention_by_org": "SELECT * FROM hm_retention_by_org()",
    "hm_start_job": "SELECT hm_start_job(gen_random_uuid(), gen_random_uuid(), 'w')",
    "hm_finish_succeeded_job": (
        "SELECT hm_finish_succeeded_job(gen_random_uuid(), gen_random_uuid(), 1, '[]', '{}',"
        " 1.0, 0.1, 0.0, 0.0, 1, 0.25, 100)"
    ),
}

ARGON2 = "$argon2"
HMAC_HEX = re.compile(r"\b[0-9a-f]{64}\b")


@pytest.fixture
def as_app() -> Iterator[Engine]:
    engine = create_engine(get_settings().database_url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def as_ops() -> Iterator[Engine]:
    engine = create_engine(get_settings().database_ops_url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def as_worker() -> Iterator[Engine]:
    engine = create_engine(get_settings().database_worker_url, poolclass=pool.NullPool)
    yield engine
    engine.dispose()


def _bind(conn: Connection, setting: str, value: object) -> None:
    conn.execute(text("SELECT set_config(:s, :v, true)"), {"s": setting, "v": str(value)})


# --- hashes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("table", "column"), HASH_COLUMNS)
async def test_the_app_role_cannot_read_a_hash(
    client: httpx.AsyncClient,
    as_app: Engine,
    as_worker: Engine,
    as_ops: Engine,
    table: str,
    column: str,
) -> None:
    org = await make_org(client)
    await make_key(client, org)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": f"{unique('inv')}@example.com", "role": "member"},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.patch(
        "/v1/users/me",
        json={"email": f"{unique('moved')}@example.com", "current_password": PASSWORD},
        headers=org.owner.headers,
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/v1/users/me/totp", json={"current_password": PASSWORD}, headers=org.owner.headers
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        "/v1/users/me/totp/confirm",
        json={"code": pyotp.TOTP(r.json()["secret"]).now()},
        headers=org.owner.headers,
    )
    assert r.status_code == 200, r.text
    # The rows exist (the superuser reads them) ...
    assert db_scalar(f"SELECT count({column}) FROM {table}") > 0
    # ... and none of the roles that serve requests or run workers can read a hash.
    for engine in (as_app, as_worker, as_ops):
        for sql in (
            f"SELECT {column} FROM {table}",
            f"SELECT * FROM {table}",
            f"SELECT count(*) FROM {table} WHERE {column} = 'x'",
            f"SELECT to_jsonb(t) FROM {table} t",
        ):
            with engine.connect() as conn:
                _bind(conn, "app.org_id", org.id)
                with pytest.raises(ProgrammingError, match="permission denied"):
                    conn.execute(text(sql))


def test_the_auth_role_reads_a_password_hash_and_nothing_else() -> None:
    engine = create_engine(get_settings().database_auth_url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            hashes = conn.execute(text("SELECT id, hashed_password FROM users LIMIT 1")).all()
            assert hashes and hashes[0][1].startswith(ARGON2)
        for sql in (
            "SELECT email FROM users",
            "SELECT count(*) FROM access_tokens",
            "SELECT count(*) FROM api_keys",
            "UPDATE users SET hashed_password = 'x' WHERE false",
        ):
            with engine.connect() as conn, pytest.raises(ProgrammingError, match="permission"):
                conn.execute(text(sql))
    finally:
        engine.dispose()


async def test_sign_in_sign_out_reset_and_api_keys_work_without_reading_hashes(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    me = await client.get("/v1/me", headers=org.owner.headers)
    assert me.status_code == 200, me.text
    assert [o["id"] for o in me.json()["organizations"]] == [org.id]
    # A wrong password is refused, the right one signs in (bearer and cookie).
    r = await client.post(
        "/v1/auth/login", data={"username": org.owner.email, "password": PASSWORD + "x"}
    )
    assert r.status_code == 400, r.text
    r = await client.post(
        "/v1/auth/cookie/login", data={"username": org.owner.email, "password": PASSWORD}
    )
    assert r.status_code == 204, r.text
    # A new password: the old one no longer signs in; reset ends the sessions.
    new_password = "Another-horse-43"
    r = await client.patch(
        "/v1/users/me",
        json={"password": new_password, "current_password": PASSWORD},
        headers=org.owner.headers,
    )
    assert r.status_code == 200, r.text
    assert "hashed_password" not in r.text
    r = await client.post(
        "/v1/auth/login", data={"username": org.owner.email, "password": new_password}
    )
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    r = await client.post("/v1/auth/logout", headers=bearer(token))
    assert r.status_code == 204, r.text
    assert (await client.get("/v1/me", headers=bearer(token))).status_code == 401
    assert (
        db_scalar("SELECT count(*) FROM access_tokens WHERE token_hash = :h", h=keyed_hash(token))
        == 0
    )
    # An API key finds its organization (hm_api_key_for_request) and acts in it.
    key = await make_key(client, org)
    r = await client.get("/v1/me", headers=bearer(key["key"]))
    assert r.status_code == 200, r.text
    assert r.json()["organization"]["id"] == org.id
    assert "key_hash" not in r.text


async def test_a_reset_token_is_checked_against_the_hash(client: httpx.AsyncClient) -> None:
    account = await register(client)
    r = await client.post("/v1/auth/forgot-password", json={"email": account.email})
    assert r.status_code == 202, r.text
    body = db_scalar(
        "SELECT body FROM email_messages WHERE to_address = :a AND kind = 'reset_password' "
        "ORDER BY created_at DESC LIMIT 1",
        a=account.email,
    )
    token = body.rsplit("token: ", 1)[1].strip()
    r = await client.post(
        "/v1/auth/reset-password", json={"token": token, "password": "Reset-horse-44"}
    )
    assert r.status_code == 200, r.text
    # Spent: the fingerprint was of the old hash.
    r = await client.post(
        "/v1/auth/reset-password", json={"token": token, "password": "Reset-horse-45"}
    )
    assert_problem(r, 400)
    r = await client.post(
        "/v1/auth/login", data={"username": account.email, "password": "Reset-horse-44"}
    )
    assert r.status_code == 200, r.text


# --- verdict functions -------------------------------------------------------------------


async def test_a_session_token_lookup_answers_with_the_user_only(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    account = await register(client)
    with as_app.connect() as conn:
        rows = conn.execute(
            text("SELECT * FROM hm_access_token_user(:h, NULL)"), {"h": keyed_hash(account.token)}
        ).all()
        assert [tuple(r._mapping) for r in rows] == [("out_user", "out_created")]
        assert str(rows[0].out_user) == account.id
        later = datetime.now(UTC) + timedelta(minutes=1)
        assert not conn.execute(
            text("SELECT * FROM hm_access_token_user(:h, :t)"),
            {"h": keyed_hash(account.token), "t": later},
        ).all()
        assert not conn.execute(
            text("SELECT * FROM hm_access_token_user(:h, NULL)"), {"h": keyed_hash("nope")}
        ).all()


async def test_other_sessions_end_only_for_the_bound_user(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    account = await register(client)
    other = await register(client)
    second = (
        await client.post("/v1/auth/login", data={"username": account.email, "password": PASSWORD})
    ).json()["access_token"]
    tokens = "SELECT count(*) FROM access_tokens WHERE user_id = :u"
    assert db_scalar(tokens, u=account.id) == 2
    call = text("SELECT hm_access_tokens_end_others(:u, :keep)")
    with as_app.begin() as conn:  # bound to another user: ends nothing
        _bind(conn, "app.user_id", other.id)
        assert conn.execute(call, {"u": account.id, "keep": None}).scalar() == 0
    with as_app.begin() as conn:  # nobody bound: nothing either
        assert conn.execute(call, {"u": account.id, "keep": None}).scalar() == 0
    assert db_scalar(tokens, u=account.id) == 2
    with as_app.begin() as conn:
        _bind(conn, "app.user_id", account.id)
        keep = keyed_hash(second)
        assert conn.execute(call, {"u": account.id, "keep": keep}).scalar() == 1
    assert (await client.get("/v1/users/me", headers=bearer(second))).status_code == 200
    assert (await client.get("/v1/users/me", headers=account.headers)).status_code == 401


async def test_an_email_change_lookup_answers_without_the_hash(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    account = await register(client)
    token = f"hme_{uuid.uuid4().hex}"
    db_rows(
        "INSERT INTO email_changes (id, user_id, new_email, token_hash, expires_at) "
        "VALUES (gen_random_uuid(), :u, :e, :h, now() + interval '1 hour')",
        u=account.id,
        e=f"{unique('new')}@example.com",
        h=keyed_hash(token),
    )
    call = text("SELECT * FROM hm_email_change_by_token(:h)")
    with as_app.connect() as conn:
        rows = conn.execute(call, {"h": keyed_hash(token)}).all()
        assert len(rows) == 1 and str(rows[0].user_id) == account.id
        assert "token_hash" not in rows[0]._mapping
        assert conn.execute(call, {"h": keyed_hash("hme_nope")}).all() == []


async def test_an_api_key_lookup_is_bound_to_its_organization_and_hides_the_hash(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    a = await make_org(client)
    b = await make_org(client)
    key = await make_key(client, a)
    with as_app.connect() as conn:
        found = conn.execute(
            text("SELECT api_key FROM hm_api_key_for_request(:o, :h)"),
            {"o": a.id, "h": keyed_hash(key["key"])},
        ).all()
        assert len(found) == 1 and found[0].api_key["id"] == key["id"]
        assert "key_hash" not in found[0].api_key
    with as_app.connect() as conn:
        assert not conn.execute(
            text("SELECT api_key FROM hm_api_key_for_request(:o, :h)"),
            {"o": b.id, "h": keyed_hash(key["key"])},
        ).all()


async def test_an_invitation_lookup_answers_only_in_its_organization(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    a = await make_org(client)
    b = await make_org(client)
    r = await client.post(
        f"/v1/orgs/{a.id}/invitations",
        json={"email": f"{unique('inv')}@example.com", "role": "member"},
        headers=a.owner.headers,
    )
    assert r.status_code == 201, r.text
    stored = db_scalar("SELECT token_hash FROM invitations WHERE id = :i", i=r.json()["id"])
    call = text("SELECT out_invitation FROM hm_invitation_by_token(:h)")
    with as_app.connect() as conn:
        _bind(conn, "app.org_id", a.id)
        assert [str(x) for x in conn.execute(call, {"h": stored}).scalars()] == [r.json()["id"]]
    with as_app.connect() as conn:
        _bind(conn, "app.org_id", b.id)
        assert conn.execute(call, {"h": stored}).all() == []
    with as_app.connect() as conn:
        assert conn.execute(call, {"h": stored}).all() == []


async def test_user_organizations_answers_only_for_the_bound_user(
    client: httpx.AsyncClient, as_app: Engine
) -> None:
    a = await make_org(client)
    b = await make_org(client)
    call = text("SELECT organization_id FROM hm_user_organizations(:u)")
    with as_app.connect() as conn:
        _bind(conn, "app.user_id", b.owner.id)
        assert conn.execute(call, {"u": a.owner.id}).all() == []
        assert [str(x) for x in conn.execute(call, {"u": b.owner.id}).scalars()] == [b.id]
    with as_app.connect() as conn:  # nobody bound
        assert conn.execute(call, {"u": a.owner.id}).all() == []
    # The API binds the signed-in user: each sees their own organizations.
    for org in (a, b):
        r = await client.get("/v1/orgs", headers=org.owner.headers)
        assert r.status_code == 200, r.text
        assert [o["id"] for o in r.json()] == [org.id]


# --- worker-only functions ---------------------------------------------------------------


@pytest.mark.parametrize("function", sorted(WORKER_CALLS))
def test_a_worker_function_is_refused_to_the_app_role(
    function: str, as_app: Engine, as_worker: Engine
) -> None:
    with as_app.connect() as conn:
        _bind(conn, "app.org_id", uuid.uuid4())
        with pytest.raises(ProgrammingError, match=f"permission denied for function {function}"):
            conn.execute(text(WORKER_CALLS[function]))
    with as_worker.connect() as conn:
        conn.execute(text(WORKER_CALLS[function])).all()
        conn.rollback()


@pytest.mark.usefixtures("no_dispatch")
async def test_dispatch_in_another_organizations_context_claims_nothing(
    client: httpx.AsyncClient, as_app: Engine, as_worker: Engine
) -> None:
    _, headers = await keyed_org(client)
    other, _ = await keyed_org(client)
    r = await submit(client, headers)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    waiting = "SELECT count(*) FROM job_outbox WHERE job_id = :j"
    with as_app.connect() as conn:
        _bind(conn, "app.org_id", other.id)
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("SELECT * FROM hm_claim_dispatch(100, 100)"))
    assert db_scalar(waiting, j=job) == 1
    assert db_scalar("SELECT dispatched_at FROM jobs WHERE id = :j", j=job) is None
    # The worker role claims it (rolled back here: no worker would run it).
    with as_worker.connect() as conn:
        claimed = conn.execute(text("SELECT out_job FROM hm_claim_dispatch(100, 100)")).scalars()
        assert uuid.UUID(job) in set(claimed)
        conn.rollback()
    assert db_scalar(waiting, j=job) == 1


def test_the_roles_are_what_the_sessions_log_in_as() -> None:
    assert async_engine().url.username == "hm_app"
    assert sync_engine().url.username == "hm_worker"
    rows = db_rows(
        "SELECT rolname, rolsuper, rolbypassrls FROM pg_roles "
        "WHERE rolname IN ('hm_worker', 'hm_auth') ORDER BY rolname"
    )
    assert [tuple(r) for r in rows] == [("hm_auth", False, False), ("hm_worker", False, False)]


# --- logs --------------------------------------------------------------------------------


def test_engines_hide_statement_parameters(as_app: Engine) -> None:
    assert async_engine().sync_engine.hide_parameters
    assert sync_engine().hide_parameters
    secret = keyed_hash(unique("token"))
    with sync_engine().connect() as conn, pytest.raises(DBAPIError) as failed:
        # No such user: a foreign-key violation whose statement carries the token hash.
        conn.execute(
            text("INSERT INTO access_tokens (token_hash, user_id) VALUES (:h, :u)"),
            {"h": secret, "u": uuid.uuid4()},
        )
    assert secret not in str(failed.value)
    assert "parameters hidden" in str(failed.value)


@pytest.fixture
def failing_writes() -> Iterator[Any]:
    """A trigger that fails every write of the tables holding hashes, for chosen user ids."""
    ids: list[str] = []
    db_rows("CREATE TABLE IF NOT EXISTS hm_test_failing (user_id uuid PRIMARY KEY)")
    db_rows(
        """
        CREATE OR REPLACE FUNCTION hm_test_fail() RETURNS trigger LANGUAGE plpgsql
        SECURITY DEFINER AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM hm_test_failing f
                       WHERE f.user_id::text = to_jsonb(NEW) ->> CASE TG_TABLE_NAME
                           WHEN 'users' THEN 'id' ELSE 'user_id' END) THEN
                RAISE EXCEPTION 'planted failure' USING ERRCODE = 'XX000';
            END IF;
            RETURN NEW;
        END $$
        """
    )
    for table in ("users", "access_tokens"):
        db_rows(
            f"CREATE OR REPLACE TRIGGER hm_test_fail BEFORE INSERT OR UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION hm_test_fail()"
        )

    def fail_for(user_id: str) -> None:
        ids.append(user_id)
        db_rows("INSERT INTO hm_test_failing VALUES (:u)", u=user_id)

    yield fail_for
    for table in ("users", "access_tokens"):
        db_rows(f"DROP TRIGGER IF EXISTS hm_test_fail ON {table}")
    db_rows("DROP FUNCTION IF EXISTS hm_test_fail() CASCADE")
    db_rows("DROP TABLE IF EXISTS hm_test_failing")


async def test_a_failed_write_of_a_hash_leaves_no_hash_in_the_log(
    app: Any, failing_writes: Any, caplog: pytest.LogCaptureFixture
) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        account = await register(client)
        failing_writes(account.id)
        # SQLAlchemy's own log too, at its most talkative (statements, parameters, rows).
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, "sqlalchemy.engine"):
            # A new password: the UPDATE's parameters hold its hash.
            r = await client.patch(
                "/v1/users/me",
                json={"password": "Changed-horse-46", "current_password": PASSWORD},
                headers=account.headers,
            )
            assert_problem(r, 500, "internal-error")
            # A sign-in: the INSERT's parameters hold the new session token's hash.
            r = await client.post(
                "/v1/auth/login", data={"username": account.email, "password": PASSWORD}
            )
            assert_problem(r, 500, "internal-error")
    logged = caplog.text
    assert "unhandled database error" in logged and "planted failure" not in logged
    assert "sqlstate XX000" in logged
    assert ARGON2 not in logged
    assert not HMAC_HEX.search(logged), HMAC_HEX.findall(logged)
    assert keyed_hash(account.token) not in logged
    # Nothing was half-written: the password is unchanged.
    assert await _can_sign_in(app, account.email, PASSWORD), "the old password must still sign in"


async def _can_sign_in(app: Any, email: str, password: str) -> bool:
    db_rows("DELETE FROM hm_test_failing")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        r = await client.post("/v1/auth/login", data={"username": email, "password": password})
    return r.status_code == 200
