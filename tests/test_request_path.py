"""What an API-key request costs the database, and the shortcuts that keep it cheap safe.

A submit is one transaction of two statements: ``hm_api_key_for_request`` (binds the
organization and finds the key) and ``hm_submit_job``. These tests pin that down, and prove
that the shortcuts hold: the binding still comes from the token's organization, a session
that skips the separate ``set_config`` fails closed, no request needs a second connection,
and the last-used touch never makes one request wait for another.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, event, pool, text

from hiddenmodel import db
from hiddenmodel.db import async_engine, async_tenant_session, bind_org_with_first_statement
from hiddenmodel.jobs import events
from hiddenmodel.security import keyed_hash
from tenants import repository
from tenants.models import ApiKey, Organization
from tests.conftest import bearer, db_rows, db_scalar, make_key, make_org, superuser_url
from tests.factories import submit

pytestmark = pytest.mark.usefixtures("s3")


async def _keyed(client: httpx.AsyncClient) -> tuple[Any, dict[str, Any]]:
    org = await make_org(client)
    return org, await make_key(client, org, ["jobs:read", "jobs:write"])


@pytest.fixture
def statements() -> Iterator[dict[str, list[str]]]:
    """Transactions begun and statements sent by this process's app engine."""
    seen: dict[str, list[str]] = {"begin": [], "sql": []}
    engine = async_engine().sync_engine

    def on_begin(conn: Any) -> None:
        seen["begin"].append("BEGIN")

    def on_sql(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen["sql"].append(statement)

    event.listen(engine, "begin", on_begin)
    event.listen(engine, "before_cursor_execute", on_sql)
    yield seen
    event.remove(engine, "begin", on_begin)
    event.remove(engine, "before_cursor_execute", on_sql)


async def test_a_submit_is_one_transaction_of_two_statements(
    client: httpx.AsyncClient, statements: dict[str, list[str]]
) -> None:
    _, key = await _keyed(client)
    headers = bearer(key["key"])
    assert (await submit(client, headers)).status_code == 202  # warms the key's rate limits
    statements["begin"].clear()
    statements["sql"].clear()
    r = await submit(client, headers)
    assert r.status_code == 202, r.text
    assert statements["begin"] == ["BEGIN"]
    assert len(statements["sql"]) == 2, statements["sql"]
    assert "hm_api_key_for_request" in statements["sql"][0]
    assert "hm_submit_job" in statements["sql"][1]
    assert r.json()["queue_position"] is not None


async def test_the_key_lookup_binds_the_tokens_organization(client: httpx.AsyncClient) -> None:
    org, key = await _keyed(client)
    other, other_key = await _keyed(client)
    org_id, other_id = uuid.UUID(org.id), uuid.UUID(other.id)
    async with async_tenant_session(org_id) as session:
        bind_org_with_first_statement(session)
        found = await repository.get_api_key_with_org(session, org_id, keyed_hash(key["key"]))
        assert found is not None and str(found[0].id) == key["id"]
        bound = await session.scalar(text("SELECT current_setting('app.org_id')"))
        assert bound == org.id
        # Row-level security now applies with this organization, as after set_config.
        assert await session.scalar(text("SELECT count(*) FROM organizations")) == 1
        await session.rollback()
    # A token naming one organization with another's key finds nothing.
    async with async_tenant_session(org_id) as session:
        bind_org_with_first_statement(session)
        assert (
            await repository.get_api_key_with_org(session, org_id, keyed_hash(other_key["key"]))
            is None
        )
        await session.rollback()
    async with async_tenant_session(other_id) as session:
        bind_org_with_first_statement(session)
        assert (
            await repository.get_api_key_with_org(session, other_id, keyed_hash(key["key"])) is None
        )
        await session.rollback()


async def test_skipping_set_config_without_binding_fails_closed(
    client: httpx.AsyncClient,
) -> None:
    org, _ = await _keyed(client)
    async with async_tenant_session(uuid.UUID(org.id)) as session:
        bind_org_with_first_statement(session)
        # The first statement binds nothing: no row is visible, no write passes.
        assert await session.scalar(text("SELECT hm_current_org_id()")) is None
        assert await session.scalar(text("SELECT count(*) FROM organizations")) == 0
        assert await session.scalar(text("SELECT count(*) FROM api_keys")) == 0
        await session.rollback()
    # The marker lasts one transaction: the next one is bound as usual.
    async with async_tenant_session(uuid.UUID(org.id)) as session:
        assert await session.scalar(text("SELECT count(*) FROM organizations")) == 1
        await session.rollback()


async def test_key_and_organization_come_back_with_every_readable_column(
    client: httpx.AsyncClient,
) -> None:
    org, key = await _keyed(client)
    org_id = uuid.UUID(org.id)
    db_rows(
        "UPDATE api_keys SET expires_at = now() + interval '1 day', "
        "last_used_at = now() - interval '1 hour' WHERE id = :k",
        k=key["id"],
    )
    async with async_tenant_session(org_id) as session:
        bind_org_with_first_statement(session)
        found = await repository.get_api_key_with_org(session, org_id, keyed_hash(key["key"]))
        assert found is not None
        loaded_key = await session.get(ApiKey, uuid.UUID(key["id"]))
        loaded_org = await session.get(Organization, org_id)
        for model, detached, loaded in (
            (ApiKey, found[0], loaded_key),
            (Organization, found[1], loaded_org),
        ):
            for column in model.__table__.c:
                if column.key == "key_hash":
                    continue  # the app role may not read it; the function leaves it out
                assert getattr(detached, column.key) == getattr(loaded, column.key), column.key
        assert found[0].key_hash is None
        await session.rollback()


@asynccontextmanager
async def _pool_of_one(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """The app's pool shrunk to one connection that cannot be waited for long: a request
    that holds one connection while waiting for a second fails at once instead of, in a busy
    pool, deadlocking with others doing the same."""
    original = db._engine_kwargs

    def one_connection(settings: Any) -> dict[str, Any]:
        return {**original(settings), "pool_size": 1, "max_overflow": 0, "pool_timeout": 3}

    await db.dispose_engines()
    monkeypatch.setattr(db, "_engine_kwargs", one_connection)
    try:
        yield
    finally:
        await db.dispose_engines()
        monkeypatch.setattr(db, "_engine_kwargs", original)


async def test_an_api_key_request_never_needs_a_second_connection(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Holding one connection while waiting for a second deadlocks a busy pool; with a pool
    # of one that cannot be waited for long, it fails at once. The key's rate limits are
    # not cached yet: they are read in the request's own session.
    from hiddenmodel.usage import ratelimits

    org, key = await _keyed(client)
    ratelimits.forget(uuid.UUID(org.id))
    headers = bearer(key["key"])
    async with _pool_of_one(monkeypatch):
        r = await submit(client, headers)
        assert r.status_code == 202, r.text
        assert (await client.get(f"/v1/jobs/{r.json()['id']}", headers=headers)).status_code == 200
        assert (await client.get("/v1/jobs", headers=headers)).status_code == 200
        assert (await client.get("/v1/me", headers=headers)).status_code == 200


async def test_the_last_used_touch_never_waits_for_another_request(
    client: httpx.AsyncClient,
) -> None:
    _, key = await _keyed(client)
    headers = bearer(key["key"])
    stale = datetime.now(UTC) - timedelta(hours=1)
    db_rows("UPDATE api_keys SET last_used_at = :t WHERE id = :k", t=stale, k=key["id"])
    holder = create_engine(superuser_url(), poolclass=pool.NullPool)
    with holder.connect() as conn:
        # Another request that is touching the same key right now holds its row.
        conn.execute(
            text("SELECT 1 FROM api_keys WHERE id = :k FOR NO KEY UPDATE"), {"k": key["id"]}
        )
        started = time.monotonic()
        r = await asyncio.wait_for(client.get("/v1/jobs", headers=headers), timeout=5)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 2.0
        assert db_scalar("SELECT last_used_at FROM api_keys WHERE id = :k", k=key["id"]) == stale
        conn.rollback()
    assert (await client.get("/v1/jobs", headers=headers)).status_code == 200
    assert db_scalar("SELECT last_used_at FROM api_keys WHERE id = :k", k=key["id"]) > stale


async def test_wakes_sent_while_one_is_in_flight_collapse_into_one_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: list[float] = []
    release = asyncio.Event()

    async def slow_push() -> None:
        sent.append(time.monotonic())
        await release.wait()

    monkeypatch.setattr(events, "_push_wake", slow_push)
    await events.wake_dispatcher()  # starts a wake in the background
    await asyncio.sleep(0)
    assert len(sent) == 1
    for _ in range(50):  # fifty commits while it is in flight
        await events.wake_dispatcher()
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    # One follow-up wake covers all fifty: it left after their commits.
    assert len(sent) == 2
    await events.wake_dispatcher()
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(sent) == 3


async def test_inputs_record_the_digest_of_the_validated_bytes(
    client: httpx.AsyncClient,
) -> None:
    import hashlib

    from tests.factories import png

    _, key = await _keyed(client)
    r = await submit(client, bearer(key["key"]), image=png(40, 30))
    assert r.status_code == 202, r.text
    stored = db_scalar("SELECT inputs FROM jobs WHERE id = :j", j=r.json()["id"])
    assert stored["image"]["sha256"] == hashlib.sha256(png(40, 30)).hexdigest()
    assert "sha256" not in r.json()["inputs"]["image"]


async def test_account_mail_never_needs_a_second_connection(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Registration and password resets record their mail in a session of their own: the
    # request's connection must be back in the pool by then.
    email = f"solo{uuid.uuid4().hex[:8]}@example.com"
    async with _pool_of_one(monkeypatch):
        r = await client.post(
            "/v1/auth/register", json={"email": email, "password": "Studio-lights-42"}
        )
        assert r.status_code == 201, r.text
        r = await client.post("/v1/auth/forgot-password", json={"email": email})
        assert r.status_code == 202, r.text
    kinds = db_rows(
        "SELECT kind FROM email_messages WHERE to_address = :e ORDER BY created_at", e=email
    )
    assert [k for (k,) in kinds] == ["verify", "reset_password"]
