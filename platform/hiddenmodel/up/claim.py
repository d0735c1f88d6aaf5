"""One ``up`` per PostgreSQL database and per Redis database.

Two ``up``s sharing either share the job queues: the second one's dispatcher and workers
would take the first one's jobs and, reading inputs from an S3 of their own, fail them as
``input-missing``. So ``up`` holds a claim on both for as long as it runs: a session advisory
lock in its database, and a Redis connection named for it. Both end with the process however
it ends (a kill -9 closes its connections), so a stale claim never blocks the next ``up``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import redis
from sqlalchemy import make_url

from hiddenmodel.up.supervisor import UpError

# The advisory lock's key ("hmup"): advisory locks are per database.
UP_LOCK = 0x686D7570
CLIENT_NAME_PREFIX = "hiddenmodel-up"
_ADVICE = (
    "its workers would take this one's jobs. Stop it, or give this one a database and a Redis "
    "database of its own (HM_DATABASE_URL, HM_REDIS_URL, or HM_EMBEDDED=1)"
)


def _libpq_url(database_url: str) -> str:
    return make_url(database_url).set(drivername="postgresql").render_as_string(False)


def _client_name(who: str) -> str:
    # A Redis client name holds no spaces.
    return f"{CLIENT_NAME_PREFIX}:{who}".replace(" ", "_")


def _claim_database(database_url: str, who: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(
        _libpq_url(database_url), autocommit=True, application_name=f"{CLIENT_NAME_PREFIX} {who}"
    )
    try:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (UP_LOCK,)).fetchone()
        if row is not None and row[0]:
            return conn
        holder = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = 0 AND l.objid = %s"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (UP_LOCK,),
        ).fetchone()
        name = holder[0] if holder and holder[0] else CLIENT_NAME_PREFIX
        database = conn.info.dbname
    except BaseException:
        conn.close()
        raise
    conn.close()
    raise UpError(
        f"another `hiddenmodel up` uses the PostgreSQL database '{database}' "
        f"({name.removeprefix(CLIENT_NAME_PREFIX).strip() or 'still starting'}): {_ADVICE}"
    )


def _claim_redis(redis_url: str, who: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url, single_connection_client=True)
    try:
        client.client_setname(_client_name(who))
        mine = client.client_id()
        db = client.connection_pool.connection_kwargs.get("db", 0)
        try:
            clients = client.client_list()
        except redis.ResponseError:  # CLIENT LIST refused (an ACL): nothing to check against
            return client
        # Of two starting at once, the older connection keeps the claim.
        others = [
            c
            for c in clients
            if str(c.get("name", "")).startswith(CLIENT_NAME_PREFIX + ":")
            and int(c.get("db", -1)) == int(db)
            and int(c["id"]) < int(mine)
        ]
    except BaseException:
        client.close()
        raise
    if not others:
        return client
    client.close()
    holder = str(others[0]["name"]).removeprefix(CLIENT_NAME_PREFIX + ":").replace("_", " ")
    raise UpError(f"another `hiddenmodel up` uses Redis database {db} ({holder}): {_ADVICE}")


@contextmanager
def claim_services(database_url: str, redis_url: str, who: str) -> Iterator[None]:
    """Hold the database and the Redis database for this ``up`` (``who`` says which, for
    the message another ``up`` prints); :class:`UpError` when another ``up`` holds either."""
    conn = _claim_database(database_url, who)
    try:
        client = _claim_redis(redis_url, who)
        try:
            yield
        finally:
            client.close()
    finally:
        conn.close()
