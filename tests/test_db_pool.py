"""The connection pool: idle connections are pinged on checkout, busy ones are not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from hiddenmodel import db
from hiddenmodel.settings import get_settings
from tests.conftest import db_rows


def _kwargs() -> dict[str, Any]:
    return {**db._engine_kwargs(get_settings()), "pool_size": 1, "max_overflow": 0}


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(get_settings().database_url, **_kwargs())
    db._ping_idle_connections(engine.sync_engine)
    yield engine
    await engine.dispose()


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT pg_backend_pid()")))


def _kill(pid: int) -> None:
    """What a server restart or a firewall does to a pooled connection."""
    assert db_rows("SELECT pg_terminate_backend(:pid)", pid=pid) == [(True,)]


async def test_idle_connection_closed_by_the_server_is_replaced_on_checkout(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = await _backend_pid(engine)
    _kill(pid)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)  # it has idled long enough
    assert await _backend_pid(engine) != pid  # the ping failed, the pool reconnected


async def test_connection_back_a_moment_ago_is_used_without_a_ping(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No ping under load: the round trip it costs is what this pool avoids. The flip side,
    # shown here, is that a connection killed between two busy checkouts fails its next use.
    pid = await _backend_pid(engine)
    _kill(pid)
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 3600.0)
    with pytest.raises(DBAPIError) as failed:
        await _backend_pid(engine)
    assert failed.value.connection_invalidated
    assert await _backend_pid(engine) != pid  # and the pool recovers at once


def test_sync_engines_ping_idle_connections_too(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = create_engine(get_settings().database_url, **_kwargs())
    db._ping_idle_connections(engine)
    try:
        with engine.connect() as conn:
            pid = conn.scalar(text("SELECT pg_backend_pid()"))
        _kill(int(pid))
        monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT pg_backend_pid()")) != pid
    finally:
        engine.dispose()
