"""Engines and sessions.

Three kinds of session, each from its own factory:

* ``global`` sessions (role ``hm_app``) for tables that belong to no organization (users,
  mail). RLS tables read as empty from them: no ``app.org_id`` is set. When a signed-in user
  is known (:data:`hiddenmodel.tenancy.current_user_id`), each transaction binds
  ``app.user_id`` to it.
* ``tenant`` sessions (role ``hm_app``) bound to one organization. Every transaction begins
  with ``set_config('app.org_id', <org>, true)``; a tenant session with no organization raises
  before any SQL is sent.
* the ``ops`` session (role ``hm_ops``, BYPASSRLS), reachable only through
  :func:`ops_session`, which writes an audit row for each use.

The async sessions serve the API (role ``hm_app``); the sync sessions serve the worker
processes and log in as ``hm_worker`` (``HM_DATABASE_WORKER_URL``), the one role that may run
the cross-tenant sweeps. Every engine hides statement parameters from its error messages: a
failed statement's parameters may hold a password hash or a token hash.

Nobody commits but the owner of the session (the request dependency or the task).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from typing import Any

import psycopg
from sqlalchemy import Connection, create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Session, SessionTransaction, sessionmaker
from sqlalchemy.util import greenlet_spawn

from hiddenmodel.settings import Settings, get_settings
from hiddenmodel.tenancy import TenantContextMissing, current_org_id, current_user_id

ORG_SETTING = "app.org_id"
USER_SETTING = "app.user_id"


class Base(DeclarativeBase):
    """Declarative base of every mapped table; Alembic remains the source of schema."""


class TenantSession(Session):
    """A session that scopes every transaction to one organization (RLS)."""


class GlobalSession(Session):
    """A session for tables that belong to no organization."""


_BOUND_BY_FIRST_STATEMENT = "hm_bound_by_first_statement"


def bind_org_with_first_statement(session: AsyncSession) -> None:
    """Send no separate ``set_config`` for the session's next transaction: its first
    statement binds the organization itself (``hm_api_key_for_request``), which saves a
    round trip on every API-key request.

    Safe by construction: if the first statement binds nothing, ``hm_current_org_id()`` is
    NULL, so row-level security shows no row and refuses every write.
    """
    session.sync_session.info[_BOUND_BY_FIRST_STATEMENT] = True


@event.listens_for(TenantSession, "after_begin")
def _bind_org_to_transaction(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    org_id = session.info.get("org_id") or current_org_id.get()
    if org_id is None:
        raise TenantContextMissing("tenant session used with no organization bound")
    session.info["org_id"] = org_id
    if session.info.pop(_BOUND_BY_FIRST_STATEMENT, False):
        return
    connection.exec_driver_sql(
        "SELECT set_config(%(name)s, %(value)s, true)",
        {"name": ORG_SETTING, "value": str(org_id)},
    )


@event.listens_for(GlobalSession, "after_begin")
def _bind_user_to_transaction(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    user_id = current_user_id.get()
    if user_id is None:
        return
    connection.exec_driver_sql(
        "SELECT set_config(%(name)s, %(value)s, true)",
        {"name": USER_SETTING, "value": str(user_id)},
    )


def _engine_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        # SQLAlchemy puts a failed statement's parameters into the exception's message, and
        # messages end up in logs: a parameter may be a password hash or a token hash.
        "hide_parameters": True,
        "pool_size": settings.database_pool_size,
        "max_overflow": settings.database_max_overflow,
        # Pinged on checkout only after idling (see _ping_idle_connections).
        "pool_pre_ping": False,
        "pool_recycle": 1800,
    }


# A connection back from a transaction moments ago is alive; one that sat in the pool may
# have been closed by a server restart or a firewall. SQLAlchemy's pool_pre_ping pings on
# every checkout, a round trip per request under load; this pings only after idling.
PING_AFTER_IDLE_SECONDS = 5.0
_IDLE_SINCE = "hm_idle_since"


def _ping_idle_connections(engine: Engine) -> None:
    dialect = engine.dialect

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE_SECONDS:
            return  # just connected, or busy a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool replaces the connection and tries again.
            raise DisconnectionError("ping on checkout failed") from exc


_async_engines: dict[str, AsyncEngine] = {}
_sync_engines: dict[str, Engine] = {}


def async_engine(url: str | None = None) -> AsyncEngine:
    settings = get_settings()
    url = url or settings.database_url
    engine = _async_engines.get(url)
    if engine is None:
        engine = _async_engines[url] = create_async_engine(url, **_engine_kwargs(settings))
        _ping_idle_connections(engine.sync_engine)
    return engine


def sync_engine(url: str | None = None) -> Engine:
    """An engine for the worker processes: by default it logs in as ``hm_worker``."""
    settings = get_settings()
    url = url or settings.database_worker_url
    engine = _sync_engines.get(url)
    if engine is None:
        engine = _sync_engines[url] = create_engine(url, **_engine_kwargs(settings))
        _ping_idle_connections(engine)
    return engine


@lru_cache
def _async_factories() -> tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]]:
    engine = async_engine()
    tenant = async_sessionmaker(engine, sync_session_class=TenantSession, expire_on_commit=False)
    global_ = async_sessionmaker(engine, sync_session_class=GlobalSession, expire_on_commit=False)
    return tenant, global_


def async_tenant_session(org_id: uuid.UUID | None = None) -> AsyncSession:
    """A new async session scoped to ``org_id`` (default: the bound context)."""
    org = org_id or current_org_id.get()
    if org is None:
        raise TenantContextMissing("tenant session requested with no organization bound")
    return _async_factories()[0](info={"org_id": org})


def async_global_session() -> AsyncSession:
    return _async_factories()[1]()


async def fetch_one_statement(sql: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
    """The first row of one statement run outside any transaction: it is its own (autocommit),
    so it costs one round trip where a session's transaction costs a BEGIN and a COMMIT more.

    For reads that bind what they need themselves, in the same statement, such as
    ``hm_job_for_key_request`` (whose ``set_config(..., true)`` lasts as long as the statement).
    The connection comes from the API's pool and goes back to it as it came (not in
    autocommit); the driver's errors are wrapped as SQLAlchemy wraps them everywhere else, and
    a connection that dropped is discarded (``connection_invalidated`` on the error).

    It drives the pooled psycopg connection itself rather than through SQLAlchemy's
    ``Connection``: for the most frequent request of all (a poll) that wrapper, its result
    object and its isolation-level bookkeeping cost more than the statement's own round trip
    (docs/BENCHMARKS.md).
    """
    engine = async_engine()
    pooled = await engine.raw_connection()
    driver = pooled.driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    try:
        try:
            await driver.set_autocommit(True)
            cursor = await driver.execute(sql, tuple(params))
            row = await cursor.fetchone()
            await driver.set_autocommit(False)
        except psycopg.Error as exc:
            # What SQLAlchemy's psycopg dialect calls a disconnect.
            dropped = driver.closed or driver.broken
            if dropped or not await _out_of_autocommit(driver):
                await greenlet_spawn(pooled.invalidate, exc)
            raise DBAPIError.instance(
                sql, tuple(params), exc, psycopg.Error, connection_invalidated=dropped
            ) from exc
        except BaseException:
            # Cancelled mid-statement: the connection's state is unknown, it is not pooled again.
            await greenlet_spawn(pooled.invalidate)
            raise
    finally:
        await greenlet_spawn(pooled.close)
    return None if row is None else tuple(row)


def fetch_all_statement_sync(
    sql: str, params: Sequence[Any], *, commit_when_read: bool = False
) -> list[tuple[Any, ...]]:
    """:func:`fetch_one_statement` for the worker processes (``sync_engine``), every row: one
    statement that is its own transaction, one round trip. For statements that bind what they
    need themselves, such as the dispatcher's ``hm_claim_dispatch`` or ``hm_start_job``.

    In autocommit the server commits the statement whatever became of its client. With
    ``commit_when_read`` it runs in a transaction that this process commits once it has read
    the rows (two round trips more): a process that dies before leaves nothing, since
    PostgreSQL rolls back a transaction whose client went away. A claim needs that: a worker
    killed while its claim waits on a lock must not leave the job running with nobody on it.
    """
    pooled = sync_engine().raw_connection()
    driver = pooled.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        try:
            driver.autocommit = not commit_when_read
            rows = driver.execute(sql, tuple(params)).fetchall()
            if commit_when_read:
                driver.commit()
            else:
                driver.autocommit = False
        except psycopg.Error as exc:
            dropped = driver.closed or driver.broken
            if dropped or not _back_to_transactions_sync(driver):
                pooled.invalidate(exc)
            raise DBAPIError.instance(
                sql, tuple(params), exc, psycopg.Error, connection_invalidated=dropped
            ) from exc
        except BaseException:
            pooled.invalidate()
            raise
    finally:
        pooled.close()
    return [tuple(row) for row in rows]


def _back_to_transactions_sync(driver: psycopg.Connection[Any]) -> bool:
    """Whether a connection whose statement failed is idle and out of autocommit again, as
    the pool hands them out (a failed transaction rolled back first)."""
    try:
        if driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            driver.rollback()
        driver.autocommit = False
    except psycopg.Error:
        return False
    return True


async def _out_of_autocommit(driver: psycopg.AsyncConnection[Any]) -> bool:
    """Whether a connection whose statement failed went back to transactions, as the pool
    hands them out."""
    try:
        await driver.set_autocommit(False)
    except psycopg.Error:
        return False
    return True


@lru_cache
def _sync_factories() -> tuple[sessionmaker[TenantSession], sessionmaker[GlobalSession]]:
    engine = sync_engine()
    tenant = sessionmaker(engine, class_=TenantSession, expire_on_commit=False)
    global_ = sessionmaker(engine, class_=GlobalSession, expire_on_commit=False)
    return tenant, global_


@contextmanager
def tenant_session(org_id: uuid.UUID | None = None) -> Iterator[TenantSession]:
    """A sync tenant session (workers); commits on success, rolls back on error."""
    org = org_id or current_org_id.get()
    if org is None:
        raise TenantContextMissing("tenant session requested with no organization bound")
    with _sync_factories()[0](info={"org_id": org}) as session, session.begin():
        yield session


@contextmanager
def global_session() -> Iterator[GlobalSession]:
    with _sync_factories()[1]() as session, session.begin():
        yield session


@asynccontextmanager
async def ops_session(
    *, actor: str, purpose: str, detail: dict[str, Any] | None = None
) -> AsyncIterator[AsyncSession]:
    """The one door to cross-tenant reads and writes (role ``hm_ops``).

    Each use writes a row to ``operator_audit_events`` in the same transaction, so work done
    through this door cannot commit without its audit record.
    """
    engine = async_engine(get_settings().database_ops_url)
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        await session.execute(
            text(
                "INSERT INTO operator_audit_events (id, actor, purpose, detail) "
                "VALUES (:id, :actor, :purpose, CAST(:detail AS jsonb))"
            ),
            {
                "id": uuid.uuid4(),
                "actor": actor,
                "purpose": purpose,
                "detail": _json(detail or {}),
            },
        )
        yield session


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, default=str, sort_keys=True)


async def dispose_engines() -> None:
    """Close every pool (shutdown, or a test switching event loops)."""
    for engine in list(_async_engines.values()):
        await engine.dispose()
    for sync in list(_sync_engines.values()):
        sync.dispose()
    _async_engines.clear()
    _sync_engines.clear()
    _async_factories.cache_clear()
    _sync_factories.cache_clear()


AfterCommit = Callable[[], Awaitable[None]]
_AFTER_COMMIT = "hm_after_commit"


def after_commit(session: AsyncSession, callback: AfterCommit) -> None:
    """Run ``callback`` once the owner has committed ``session``; dropped on rollback."""
    session.info.setdefault(_AFTER_COMMIT, []).append(callback)


async def commit(session: AsyncSession) -> None:
    """Commit, then run what was held for after the commit (mail, task dispatch)."""
    await session.commit()
    callbacks: list[AfterCommit] = session.info.pop(_AFTER_COMMIT, [])
    for callback in callbacks:
        try:
            await callback()
        except Exception:
            logging.getLogger(__name__).exception("after-commit callback failed")


async def rollback(session: AsyncSession) -> None:
    session.info.pop(_AFTER_COMMIT, None)
    await session.rollback()
