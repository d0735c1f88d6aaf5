"""A dependency down answers 503 with Retry-After, never 500; a cut-off submit leaves nothing."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, pool, text

from hiddenmodel import storage
from hiddenmodel.db import dispose_engines
from hiddenmodel.redis import close_redis
from hiddenmodel.settings import get_settings
from tests.conftest import assert_problem, db_scalar, superuser_url
from tests.factories import keyed_org, png, set_overrides, submit, wait_job

pytestmark = pytest.mark.usefixtures("services")


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def restore_settings(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[pytest.MonkeyPatch]:
    """Point the app elsewhere for one test; afterwards, back to the real services."""
    try:
        yield monkeypatch
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        await dispose_engines()
        await close_redis()


def _assert_unavailable(r: httpx.Response, kind: str) -> None:
    assert_problem(r, 503, kind)
    assert int(r.headers["retry-after"]) == get_settings().dependency_retry_after_seconds


async def test_database_down_is_503_database_unavailable(
    client: httpx.AsyncClient, restore_settings: pytest.MonkeyPatch
) -> None:
    org, headers = await keyed_org(client)
    port = _closed_port()
    restore_settings.setenv(
        "HM_DATABASE_URL", f"postgresql+psycopg://hm_app:hm_app@127.0.0.1:{port}/hiddenmodel"
    )
    get_settings.cache_clear()
    await dispose_engines()
    _assert_unavailable(await client.get("/v1/jobs", headers=headers), "database-unavailable")
    _assert_unavailable(await submit(client, headers), "database-unavailable")
    _assert_unavailable(
        await client.get(f"/v1/orgs/{org.id}", headers=org.owner.headers), "database-unavailable"
    )
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_redis_down_is_503_broker_unavailable(
    client: httpx.AsyncClient, restore_settings: pytest.MonkeyPatch
) -> None:
    org, headers = await keyed_org(client)
    # A rate limit makes every request of the key ask Redis first.
    set_overrides(org, requests_per_minute=1000)
    restore_settings.setenv("HM_REDIS_URL", f"redis://127.0.0.1:{_closed_port()}/0")
    get_settings.cache_clear()
    await close_redis()
    _assert_unavailable(await submit(client, headers), "broker-unavailable")
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_a_submit_cut_off_by_the_database_deletes_its_stored_input(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    first = await submit(client, headers)
    assert first.status_code == 202, first.text
    # Finished, so its output is written before the objects are counted.
    await wait_job(client, headers, first.json()["id"])
    kept = storage.list_keys(storage.org_prefix(uuid.UUID(org.id)))
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    lock = engine.connect()
    try:
        # Hold the organization's quota counter: the next admission stops there, after its
        # input was stored, until its connection is cut.
        lock.execute(
            text(
                "SELECT 1 FROM quota_counters WHERE organization_id = :o "
                "AND subject_type = 'org' FOR UPDATE"
            ),
            {"o": org.id},
        )
        pending = asyncio.create_task(submit(client, headers, image=png(40, 40)))
        deadline = time.monotonic() + 20
        waiting: Any = None
        while waiting is None:
            assert time.monotonic() < deadline, "the admission never reached the lock"
            waiting = db_scalar(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND query LIKE '%hm_submit_job%'"
            )
            await asyncio.sleep(0.02)
        assert len(storage.list_keys(storage.org_prefix(uuid.UUID(org.id)))) > len(kept)
        db_scalar("SELECT pg_terminate_backend(:p)", p=waiting)
        r = await pending
    finally:
        lock.rollback()
        lock.close()
        engine.dispose()
    _assert_unavailable(r, "database-unavailable")
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 1
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == kept
