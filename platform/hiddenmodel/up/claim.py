"""One ``up`` per PostgreSQL database and per Redis database.

Two ``up``s sharing either share the job queues: the second one's dispatcher and workers
would take the first one's jobs and, reading inputs from an S3 of their own, fail them as
``input-missing``. So ``up`` holds a claim on both for as long as it runs, and claims them
before it migrates or seeds anything: a session advisory lock in its database (taken over
the owner's URL, which connects directly, never through a transaction pooler) and a Redis
connection named for it. Both are its connections: they end at once when ``up`` stops or is
killed; after a machine's crash, PostgreSQL drops the session once its TCP keepalives fail
(about a minute, set on the session).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import redis
from sqlalchemy import make_url

from hiddenmodel.up.supervisor import UpError

# The advisory lock's key ("hmup"), one int8 below 2**32: pg_locks shows it as classid 0,
# objid UP_LOCK, objsubid 1. Advisory locks are per database.
UP_LOCK = 0x686D7570
CLIENT_NAME_PREFIX = "hiddenmodel-up"
_ADVICE = (
    "its workers would take this one's jobs. Stop it, or give this one a database and a Redis "
    "database of its own (HM_DATABASE_URL, HM_REDIS_URL, or HM_EMBEDDED=1)"
)
_HOLDER = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
    " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s"
    " AND l.objsubid = 1"
    " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)
# The server drops a session whose client stopped answering after 30 + 3 x 10 s.
_SESSION_SETTINGS = (
    "SET idle_session_timeout = 0",
    "SET tcp_keepalives_idle = 30",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 3",
)


def _libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


def _connect(database_url: str, who: str) -> psycopg.Connection[Any] | None:
    """The claim's own connection; None when it cannot be made yet, as when the database
    does not exist (no ``up`` can be using it: the claim is taken once ``migrate`` has
    created it; a server that is away fails ``migrate`` with its own message)."""
    try:
        conn = psycopg.connect(
            _libpq_url(database_url),
            autocommit=True,
            # application_name holds 63 bytes: "<prefix> pid N at http://host:port".
            application_name=f"{CLIENT_NAME_PREFIX} {who}"[:63],
        )
    except psycopg.OperationalError:
        return None
    for setting in _SESSION_SETTINGS:
        # An older server without the setting: the claim holds all the same.
        with suppress(psycopg.Error):
            conn.execute(setting)
    return conn


def _lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (UP_LOCK,)).fetchone()
    return bool(row and row[0])


def _claim_database(conn: psycopg.Connection[Any]) -> None:
    """Take the lock on ``conn`` (closed on failure), or say who holds it."""
    try:
        if _lock(conn):
            return
        holder = conn.execute(_HOLDER, (UP_LOCK,)).fetchone()
        if holder is None and _lock(conn):  # the holder stopped in between
            return
        name = str(holder[0]) if holder and holder[0] else ""
        database = conn.info.dbname
    except BaseException:
        conn.close()
        raise
    conn.close()
    who = name.removeprefix(CLIENT_NAME_PREFIX).strip() or "still starting"
    raise UpError(
        f"another `hiddenmodel up` uses the PostgreSQL database '{database}' ({who}): {_ADVICE}"
    )


def _client_name(who: str) -> str:
    # A Redis client name holds no spaces.
    return f"{CLIENT_NAME_PREFIX}:{who}".replace(" ", "_")


def _claim_redis(redis_url: str, who: str) -> redis.Redis:
    """A connection named for this ``up``; :class:`UpError` when an older one of another
    ``up`` is on the same Redis database. Where the server refuses the CLIENT commands (an
    ACL), there is nothing to compare with and the connection is returned as it is."""
    # client_name: a reconnect names the connection again.
    client = redis.Redis.from_url(
        redis_url,
        single_connection_client=True,
        client_name=_client_name(who),
        socket_keepalive=True,
    )
    try:
        db = int(client.connection_pool.connection_kwargs.get("db", 0))
        try:
            mine = int(client.client_id())
            clients = client.client_list()
        except redis.ResponseError:
            return client
        # Of two starting at once, the older connection keeps the claim.
        others = [
            c
            for c in clients
            if str(c.get("name", "")).startswith(CLIENT_NAME_PREFIX + ":")
            and int(c.get("db", -1)) == db
            and int(c["id"]) < mine
        ]
    except BaseException:
        client.close()
        raise
    if not others:
        return client
    client.close()
    holder = str(others[0]["name"]).removeprefix(CLIENT_NAME_PREFIX + ":").replace("_", " ")
    raise UpError(f"another `hiddenmodel up` uses Redis database {db} ({holder}): {_ADVICE}")


class ServicesClaim:
    """This ``up``'s hold on its database and Redis database (see the module's text)."""

    def __init__(self, database_url: str, redis_url: str, who: str) -> None:
        self._database_url, self._who = database_url, who
        self._redis: redis.Redis | None = None
        self._conn: psycopg.Connection[Any] | None = None
        try:
            self.claim_database()
            self._redis = _claim_redis(redis_url, who)
        except BaseException:
            self.release()
            raise

    def claim_database(self) -> None:
        """Take the database's lock, if not held yet and the database exists."""
        if self._conn is not None:
            return
        conn = _connect(self._database_url, self._who)
        if conn is not None:
            _claim_database(conn)
            self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None


@contextmanager
def claim_services(database_url: str, redis_url: str, who: str) -> Iterator[ServicesClaim]:
    """Hold the Redis database, and the database when it exists already (call
    :meth:`ServicesClaim.claim_database` again once it does); :class:`UpError` when another
    ``up`` holds either. ``who`` says which ``up`` this is, for the other's message."""
    claim = ServicesClaim(database_url, redis_url, who)
    try:
        yield claim
    finally:
        claim.release()
