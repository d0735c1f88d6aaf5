"""What the platform's everyday requests and sweeps cost on a full database, as a ratio to the
same requests on an empty one, measured side by side in the same run.

Two databases built by the real migrations, each with 1,000 organizations (two of them
provisioned through the real services, with API keys the benchmark uses: the biggest
organization and a small one from the long tail), their members, one API key each and every
plan limit lifted:

* ``hiddenmodel_scale_empty``: no jobs at all, built afresh every run;
* ``hiddenmodel_scale_full``: ``--jobs`` jobs (10 M by default) and a usage event for each
  that succeeded, bulk-loaded in SQL as the superuser (no RLS, no triggers: the job counters,
  the queued jobs per minute and the usage roll-ups are then computed once, exactly as
  migrations 0018 and 0021 fill them), the jobs' plain indexes built after the load, then
  ``VACUUM ANALYZE``. The biggest organization has 40 % of the jobs, the others a long tail
  (organization k of 999 gets a share falling with the cube of k); ``--queued`` of them (1 %
  by default) are queued, with their outbox rows, 0.02 % running; the rest finished over 13
  months (more of them recent). With ``--reuse`` a full database loaded by an earlier run
  is kept when it holds the same jobs and was migrated by the same migration files (the
  jobs the earlier runs submitted are deleted first); otherwise it is loaded again.

Each database gets its own API under uvicorn (one worker, on loopback) and its own process
for the dispatcher's and reconciler's functions. Every request kind is then timed
interleaved, one call on the empty database, one on the full one, the next pair in the other
order, so both see the same machine at the same moments; the load average is recorded
around each. For each: p50/p99 latency and the server CPU per call (the process that serves
it plus the database backends of its database, read from /proc) of:

submit (``POST /v1/jobs``, a small PNG, big and small organization); ``GET /v1/jobs`` first
page, a page filtered by status and operation, a page of queued jobs 10,000 rows deep by
cursor; ``GET /v1/jobs/{id}`` (queued and finished jobs); the usage report by day and its CSV
for last month, and last month's statement (big and small organization); one dispatcher
claim (``hm_claim_dispatch``, rolled back so every repetition sees the same queue; how many
organizations it served and the most jobs it gave one); the reconciler's queries and sweeps
(``reconcile_once``, ``recover_from_dead_workers``); the orphan sweep over
``--orphan-objects`` stored objects of the biggest organization. On the full database it
also times the SQL that migrations 0018 and 0021 replaced beside what replaced it.

Prints a table and one summary line; ``--out`` writes everything as JSON. The machine is
shared: run it niced, and the full size once.

    nice .venv/bin/python bench/scale.py --jobs 1000000 --out var/bench/scale-1m.json
    nice .venv/bin/python bench/scale.py --reuse --out var/bench/scale-10m.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _harness as h  # the bench directory is sys.path[0] when run as a script
import httpx

from hiddenmodel.processes import free_port, hiddenmodel_argv, wait_http

ORGS = 1000
SMALL_ORG_INDEX = 500
OPERATIONS = ("resize", "remove_background", "ghost_mannequin")
RESIZE = {"width": 64, "height": 64, "mode": "fit"}
DATABASES = {"empty": "hiddenmodel_scale_empty", "full": "hiddenmodel_scale_full"}
REDIS_URL = "redis://127.0.0.1:6379/11"
# What a full database remembers of its load, for --reuse (the superuser's table).
META = "bench_scale_meta"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# --- one database: its environment, its API, its sweeper -------------------------------------


def database_env(database: str) -> dict[str, str]:
    """The ``HM_DATABASE_*`` URLs of :func:`h.configure_env`, naming ``database``."""
    return {
        key: os.environ[key].rsplit("/", 1)[0] + f"/{database}"
        for key in ("HM_DATABASE_URL", "HM_DATABASE_OWNER_URL", "HM_DATABASE_OPS_URL")
    }


def use_database(database: str) -> None:
    """Point this process's settings and engines at ``database``."""
    from hiddenmodel.db import dispose_engines
    from hiddenmodel.settings import get_settings

    os.environ.update(database_env(database))
    get_settings.cache_clear()
    asyncio.run(dispose_engines())


@dataclasses.dataclass
class Side:
    """One database under measurement."""

    phase: str
    env: h.BenchEnv
    big: h.Tenant
    small: h.Tenant
    info: dict[str, Any]
    api: Any = None
    api_url: str = ""
    client: httpx.Client | None = None
    sweeper: Sweeper | None = None
    cpu: ServerCpu | None = None


class Sweeper:
    """A process of its own, on one database, that runs the dispatcher's, reconciler's and
    orphan sweep's functions when asked and answers with the time each took (so the
    parent's two databases never share settings, engines or a pool)."""

    def __init__(self, side_env: dict[str, str], big_org: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_sweeper_main, args=(child, side_env, big_org), daemon=True
        )
        self.process.start()
        child.close()
        self.call("ready")

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def call(self, op: str, *args: Any) -> tuple[float, dict[str, Any]]:
        self.conn.send((op, args))
        reply = self.conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        elapsed, extra = reply
        return float(elapsed), dict(extra)

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.conn.send(("stop", ()))
        self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)


def _sweeper_main(conn: Connection, side_env: dict[str, str], big_org: str) -> None:
    """The sweeper process: ``(op, args)`` in, ``(milliseconds, extra)`` out, until EOF."""
    os.environ.update(side_env)
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.orm import Session

    from hiddenmodel import storage
    from hiddenmodel.jobs import repository
    from hiddenmodel.jobs.orphans import sweep_orphans
    from hiddenmodel.settings import get_settings
    from workers import dispatcher

    settings = get_settings()
    # As the dispatcher and reconciler log in (the worker role runs the cross-tenant sweeps).
    claim_engine = create_engine(settings.database_worker_url, poolclass=pool.NullPool)
    claim_conn = claim_engine.connect()
    # Pooled: the backend stays, so its CPU time is counted.
    app_engine = create_engine(settings.database_worker_url, pool_size=1)

    def claim() -> dict[str, Any]:
        tx = claim_conn.begin()
        rows = claim_conn.execute(
            text("SELECT * FROM hm_claim_dispatch(:cap, :limit)"),
            {"cap": settings.dispatch_org_inflight_cap, "limit": settings.dispatch_batch_size},
        ).all()
        tx.rollback()
        per_org: dict[Any, int] = {}
        for r in rows:
            per_org[r[0]] = per_org.get(r[0], 0) + 1
        return {"jobs": len(rows), "orgs": len(per_org), "most": max(per_org.values(), default=0)}

    def candidates() -> dict[str, Any]:
        with Session(app_engine) as session:
            repository.reconcile_candidates_sync(
                session,
                settings.job_lease_seconds,
                settings.redispatch_grace_seconds,
                min(settings.cpu_hard_limit_seconds, settings.gpu_hard_limit_seconds),
            )
            repository.running_jobs_sync(session)
        return {}

    def put_objects(owners: list[str]) -> dict[str, Any]:
        for k, job_id in enumerate(owners):
            storage.put_object(
                f"orgs/{big_org}/jobs/{job_id}/extra-{k}.png",
                b"x",
                "image/png",
                org_id=uuid.UUID(big_org),
                job_id=uuid.UUID(job_id),
                kind="input",
            )
        return {}

    def sweep() -> dict[str, Any]:
        result = sweep_orphans(prefix=f"orgs/{big_org}/", grace_seconds=-60, budget_seconds=600)
        return {"listed": result.listed, "deleted": result.deleted}

    ops: dict[str, Callable[..., dict[str, Any]]] = {
        "ready": lambda: {},
        "claim": claim,
        "reconcile_queries": candidates,
        "reconcile_once": lambda: dict(dispatcher.reconcile_once()),
        "recover_from_dead_workers": lambda: dict(dispatcher.recover_from_dead_workers()),
        "put_objects": put_objects,
        "orphan_sweep": sweep,
    }
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                return
            if op == "stop":
                return
            try:
                t0 = time.perf_counter()
                extra = ops[op](*args)
                conn.send((1000 * (time.perf_counter() - t0), extra))
            except Exception as exc:  # the parent raises it
                conn.send(RuntimeError(f"{op}: {exc!r}"))
    finally:
        claim_conn.close()
        claim_engine.dispose()
        app_engine.dispose()


# --- CPU of the server side -----------------------------------------------------------------


class ServerCpu:
    """CPU seconds of one database's serving processes (its API, its sweeper) and of every
    backend connected to that database."""

    def __init__(self, env: h.BenchEnv, pids: list[int]) -> None:
        from sqlalchemy import create_engine, pool

        self.pids = pids
        # On the maintenance database: the sampler's own backend is in neither side's sum.
        self.engine = create_engine(h.ADMIN_URL, poolclass=pool.NullPool)
        self.conn = self.engine.connect()
        self.database = env.database

    def _backends(self) -> list[int]:
        from sqlalchemy import text

        rows = self.conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                "AND backend_type = 'client backend'"
            ),
            {"db": self.database},
        )
        self.conn.rollback()
        return [r[0] for r in rows]

    def sample(self) -> dict[int, float]:
        # Own processes under negative keys, backends under their pid.
        out = {-pid: h.cpu_seconds(pid) for pid in self.pids}
        for pid in self._backends():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out[pid] = h.cpu_seconds(pid)
        return out

    @staticmethod
    def used(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
        """(serving processes' seconds, database seconds) between two samples."""
        own = sum(v - before[pid] for pid, v in after.items() if pid < 0)
        db = sum(v - before.get(pid, 0.0) for pid, v in after.items() if pid > 0)
        return own, db

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


Call = Callable[[int], float]  # runs the i-th call, returns its latency in milliseconds


def measure(
    name: str,
    calls: dict[str, Call],
    n: int,
    cpus: dict[str, ServerCpu],
    *,
    warmup: int = 3,
) -> dict[str, dict[str, Any]]:
    """Run each side's call ``warmup`` times untimed, then ``n`` times interleaved (empty,
    full; then full, empty; …): latency percentiles in ms and server CPU per call, per side.
    The other side's processes idle meanwhile, so each side's CPU is its own calls'."""
    sides = list(calls)
    for i in range(warmup):
        for side in sides:
            calls[side](-1 - i)
    load_before = load1()
    before = {side: cpus[side].sample() for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(n):
        for side in sides if i % 2 == 0 else sides[::-1]:
            times[side].append(calls[side](i))
    after = {side: cpus[side].sample() for side in sides}
    load = [load_before, load1()]
    rows: dict[str, dict[str, Any]] = {}
    for side in sides:
        t = times[side]
        own, db = ServerCpu.used(before[side], after[side])
        rows[side] = {
            "n": n,
            "p50_ms": round(statistics.median(t), 2),
            "p99_ms": round(pct(t, 99), 2),
            "max_ms": round(max(t), 2),
            "proc_cpu_ms": round(1000 * own / n, 2),
            "db_cpu_ms": round(1000 * db / n, 2),
            "server_cpu_ms": round(1000 * (own + db) / n, 2),
            "load1": load,
        }
    log(f"  {name}: " + "; ".join(f"{side} {rows[side]}" for side in sides))
    return rows


# --- the organizations and the load ---------------------------------------------------------


def provision(env: h.BenchEnv) -> tuple[h.Tenant, h.Tenant]:
    """The biggest organization and a small one through the real services (keys that can
    read usage too), then 998 more, their members and keys in SQL, every limit lifted."""
    import asyncio

    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines

    big, small = h.provision_tenant("scale-big"), h.provision_tenant("scale-small")
    scopes = ["jobs:read", "jobs:write", "usage:read"]

    async def _keys() -> tuple[str, str]:
        a = await provisioning.create_api_key(str(big.org_id), "scale", scopes)
        b = await provisioning.create_api_key(str(small.org_id), "scale", scopes)
        await dispose_engines()
        return a, b

    big.api_key, small.api_key = asyncio.run(_keys())
    lifted = json.dumps(h.LIFTED_LIMITS)
    h.superuser_sql(
        env,
        "CREATE TABLE bench_orgs (idx integer PRIMARY KEY, id uuid NOT NULL, key_id uuid, "
        "users uuid[] NOT NULL DEFAULT '{}')",
        f"INSERT INTO bench_orgs (idx, id) VALUES (1, '{big.org_id}'), "
        f"({SMALL_ORG_INDEX}, '{small.org_id}')",
        f"INSERT INTO bench_orgs (idx, id) SELECT g, gen_random_uuid() "
        f"FROM generate_series(2, {ORGS}) g WHERE g <> {SMALL_ORG_INDEX}",
        "INSERT INTO organizations (id, slug, name) SELECT id, 'scale-' || idx, 'Scale ' || idx "
        "FROM bench_orgs WHERE idx NOT IN (1, " + str(SMALL_ORG_INDEX) + ")",
        # Members: 50 in the biggest organization, 3 in every other.
        "CREATE TABLE bench_users AS SELECT o.idx, gen_random_uuid() AS id, m "
        "FROM bench_orgs o, generate_series(1, CASE WHEN o.idx = 1 THEN 50 ELSE 3 END) m",
        "INSERT INTO users (id, email, hashed_password, is_active, is_superuser, is_verified) "
        "SELECT id, 'scale-' || idx || '-' || m || '@example.com', 'x', true, false, true "
        "FROM bench_users",
        "INSERT INTO memberships (id, organization_id, user_id, role) "
        "SELECT gen_random_uuid(), o.id, u.id, 'member' FROM bench_users u "
        "JOIN bench_orgs o USING (idx)",
        "UPDATE bench_orgs o SET users = (SELECT array_agg(u.id ORDER BY u.m) "
        "FROM bench_users u WHERE u.idx = o.idx)",
        "INSERT INTO api_keys (id, organization_id, name, prefix, key_hash, scopes) "
        "SELECT gen_random_uuid(), id, 'bulk', 'hmk_bulk', md5(id::text), "
        "ARRAY['jobs:read', 'jobs:write'] FROM bench_orgs",
        "UPDATE bench_orgs o SET key_id = k.id FROM api_keys k "
        "WHERE k.organization_id = o.id AND k.name = 'bulk'",
        "INSERT INTO org_billing (organization_id, plan_id, overrides) "
        f"SELECT o.id, p.id, '{lifted}'::jsonb FROM bench_orgs o, plans p "
        "WHERE p.code = 'pro' ON CONFLICT (organization_id) DO NOTHING",
    )
    return big, small


def _plain_indexes(env: h.BenchEnv, tables: tuple[str, ...]) -> list[tuple[str, str]]:
    """(name, definition) of the tables' indexes that back no constraint."""
    rows = h.superuser_rows(
        env,
        "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename = ANY(:t) "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
        t=list(tables),
    )
    return [(r[0], r[1]) for r in rows]


def running_jobs(jobs: int) -> int:
    return max(1, jobs // 5000)


def fill(env: h.BenchEnv, jobs: int, queued: int) -> dict[str, float]:
    """Load ``jobs`` jobs, their usage events and outbox rows; returns seconds per step."""
    from sqlalchemy import create_engine, pool, text

    running = running_jobs(jobs)
    steps: dict[str, float] = {}
    indexes = _plain_indexes(env, ("jobs", "usage_events"))
    engine = create_engine(
        env.superuser_db_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    # The share of the long tail falls with the cube of the organization's rank.
    pick = (
        f"CASE WHEN s.u < 0.4 THEN 1 ELSE least({ORGS}, "
        f"2 + floor(({ORGS} - 1) * power((s.u - 0.4) / 0.6, 3))::integer) END"
    )
    load_jobs = f"""
        INSERT INTO jobs (id, organization_id, api_key_id, user_id, operation,
                          operation_version, queue, params, status, stage, progress, inputs,
                          outputs, error_code, error_message, request_hash, cancel_requested,
                          attempts, dispatch_count, dispatched_at, heartbeat_at, started_at,
                          finished_at, compute_seconds, gpu_seconds, worker, created_at)
        SELECT t.id, o.id,
               CASE WHEN s.g % 2 = 0 THEN o.key_id END,
               CASE WHEN s.g % 2 = 1
                    THEN o.users[1 + (s.g / 2) % cardinality(o.users)] END,
               t.operation, '1.0', CASE WHEN t.operation = 'ghost_mannequin' THEN 'gpu'
                                        ELSE 'cpu' END,
               '{{"width": 512, "height": 512, "mode": "fit"}}'::jsonb, t.status,
               CASE WHEN t.status = 'running' THEN 'processing' END,
               CASE WHEN t.status = 'succeeded' THEN 1.0 ELSE 0.0 END,
               jsonb_build_object('image', jsonb_build_object(
                   'key', 'orgs/' || o.id || '/jobs/' || t.id || '/image.png',
                   'bytes', 180000, 'width', 1024, 'format', 'png', 'height', 1024,
                   'sha256', md5(t.id::text) || md5(o.id::text),
                   'content_type', 'image/png')),
               CASE WHEN t.status = 'succeeded' THEN jsonb_build_array(jsonb_build_object(
                   'key', 'orgs/' || o.id || '/jobs/' || t.id || '/output.png',
                   'name', 'output', 'bytes', 90000, 'width', 512, 'format', 'png',
                   'height', 512, 'content_type', 'image/png'))
                    ELSE '[]'::jsonb END,
               CASE WHEN t.status IN ('failed', 'canceled', 'expired') THEN t.status END,
               CASE WHEN t.status IN ('failed', 'canceled', 'expired')
                    THEN 'The job ended: ' || t.status END,
               md5(t.id::text), false,
               CASE WHEN t.status IN ('queued', 'expired') THEN 0 ELSE 1 END,
               CASE WHEN t.status IN ('queued', 'expired') THEN 0 ELSE 1 END,
               CASE WHEN t.status NOT IN ('queued', 'expired') THEN t.created_at END,
               CASE WHEN t.status NOT IN ('queued', 'expired')
                    THEN t.created_at + interval '3 seconds' END,
               CASE WHEN t.status NOT IN ('queued', 'expired')
                    THEN t.created_at + interval '1 second' * s.r END,
               CASE WHEN t.status NOT IN ('queued', 'running')
                    THEN t.created_at + interval '1 second' * (2 + 6 * s.r) END,
               CASE WHEN t.status IN ('succeeded', 'failed') THEN 0.2 + 5 * s.r END,
               CASE WHEN t.status = 'succeeded' AND t.operation = 'ghost_mannequin'
                    THEN round((1 + 4 * s.r)::numeric, 3)::double precision
                    WHEN t.status = 'succeeded' THEN 0.0 END,
               CASE WHEN t.status NOT IN ('queued', 'expired') THEN NULL END,
               t.created_at
        FROM (SELECT g, random() AS u, random() AS r, random() AS v, random() AS w
              FROM generate_series(1, {jobs}) g) s
        JOIN bench_orgs o ON o.idx = {pick}
        CROSS JOIN LATERAL (SELECT
            gen_random_uuid() AS id,
            CASE WHEN s.w < 0.6 THEN 'resize' WHEN s.w < 0.85 THEN 'remove_background'
                 ELSE 'ghost_mannequin' END AS operation,
            CASE WHEN s.g <= {queued} THEN 'queued'
                 WHEN s.g <= {queued + running} THEN 'running'
                 WHEN s.v < 0.93 THEN 'succeeded' WHEN s.v < 0.97 THEN 'failed'
                 WHEN s.v < 0.99 THEN 'canceled' ELSE 'expired' END AS status,
            CASE WHEN s.g <= {queued} THEN now() - interval '2 hours' * s.v
                 WHEN s.g <= {queued + running} THEN now() - interval '30 seconds' * s.v
                 ELSE now() - interval '1 hour' - interval '395 days' * power(s.v, 1.5)
            END AS created_at) t
    """
    statements = [
        ("drop plain indexes", [f'DROP INDEX "{name}"' for name, _ in indexes]),
        ("jobs", [load_jobs]),
        (
            "usage events",
            [
                """
                INSERT INTO usage_events (id, organization_id, job_id, user_id, api_key_id,
                                          operation, outcome, gpu_seconds, images, megapixels,
                                          created_at, stripe_status, stripe_attempts,
                                          stripe_next_attempt_at, stripe_sent_at)
                SELECT gen_random_uuid(), organization_id, id, user_id, api_key_id, operation,
                       'succeeded', gpu_seconds, 1, 0.262144, finished_at, 'sent', 1,
                       finished_at, finished_at
                FROM jobs WHERE status = 'succeeded'
                """
            ],
        ),
        (
            "outbox",
            [
                "INSERT INTO job_outbox (organization_id, job_id, queue, created_at) "
                "SELECT organization_id, id, queue, created_at FROM jobs WHERE status = 'queued'"
            ],
        ),
        ("indexes", [definition for _, definition in indexes]),
        (
            "counters and roll-ups",
            [
                "TRUNCATE job_counts, job_queue_minutes, usage_daily",
                *[
                    f"""
                    INSERT INTO job_counts (organization_id, subject_type, subject_id, queued,
                                            running)
                    SELECT organization_id, '{kind}', {column},
                           count(*) FILTER (WHERE status = 'queued'),
                           count(*) FILTER (WHERE status = 'running')
                    FROM jobs WHERE status IN ('queued', 'running') AND {column} IS NOT NULL
                    GROUP BY organization_id, {column}
                    """
                    for kind, column in (
                        ("org", "organization_id"),
                        ("member", "user_id"),
                        ("api_key", "api_key_id"),
                    )
                ],
                """
                INSERT INTO job_queue_minutes (organization_id, minute, queued)
                SELECT organization_id,
                       date_bin('1 minute', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
                       count(*)
                FROM jobs WHERE status = 'queued' GROUP BY 1, 2
                """,
                """
                INSERT INTO usage_daily (organization_id, day, operation, user_id, api_key_id,
                                         jobs, gpu_seconds, images, megapixels)
                SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, operation,
                       user_id, api_key_id, count(*), sum(gpu_seconds::numeric), sum(images),
                       sum(megapixels::numeric)
                FROM usage_events GROUP BY 1, 2, 3, 4, 5
                """,
            ],
        ),
        (
            "vacuum analyze",
            [
                f"VACUUM (ANALYZE) {t}"
                for t in (
                    "jobs",
                    "usage_events",
                    "job_outbox",
                    "job_counts",
                    "job_queue_minutes",
                    "usage_daily",
                )
            ],
        ),
        # The load's dirty pages written out now, not by a checkpoint during the measurements.
        ("checkpoint", ["CHECKPOINT"]),
    ]
    with engine.connect() as conn:
        conn.execute(text("SET maintenance_work_mem = '1GB'"))
        conn.execute(text("SET synchronous_commit = off"))
        # Neither triggers nor foreign-key checks: the counters are computed once below.
        conn.execute(text("SET session_replication_role = replica"))
        for step, sqls in statements:
            t0 = time.perf_counter()
            for sql in sqls:
                conn.execute(text(sql))
            steps[step] = round(time.perf_counter() - t0, 1)
            log(f"  fill: {step} in {steps[step]} s")
    engine.dispose()
    return steps


def database_size(env: h.BenchEnv) -> dict[str, Any]:
    rows = h.superuser_rows(
        env,
        "SELECT c.relname, pg_total_relation_size(c.oid), pg_relation_size(c.oid), "
        "coalesce(s.n_live_tup, 0) FROM pg_class c "
        "LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid "
        "WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace "
        "ORDER BY pg_total_relation_size(c.oid) DESC LIMIT 8",
    )
    total = h.superuser_rows(env, "SELECT pg_database_size(current_database())")[0][0]
    return {
        "database_bytes": total,
        "tables": {r[0]: {"total_bytes": r[1], "heap_bytes": r[2], "rows": r[3]} for r in rows},
    }


# --- the measurements -----------------------------------------------------------------------


def last_month(today: date) -> tuple[date, date]:
    first = today.replace(day=1)
    end = first - timedelta(days=1)
    return end.replace(day=1), end


def measure_all(sides: dict[str, Side], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every request kind and sweep, interleaved across the sides; results per side."""
    cpus = {name: side.cpu for name, side in sides.items() if side.cpu is not None}
    out: dict[str, dict[str, Any]] = {name: {} for name in sides}
    image = h.photo_png(96, 72, seed=1)
    n = args.requests

    def record(key: str, rows: dict[str, dict[str, Any]]) -> None:
        for name, row in rows.items():
            out[name][key] = row

    def each(make: Callable[[Side], Call]) -> dict[str, Call]:
        return {name: make(side) for name, side in sides.items()}

    def timed(fn: Callable[[], httpx.Response], what: str, ok: tuple[int, ...] = (200,)) -> float:
        t0 = time.perf_counter()
        r = fn()
        elapsed = 1000 * (time.perf_counter() - t0)
        if r.status_code not in ok:
            raise RuntimeError(f"{what} answered {r.status_code}: {r.text[:300]}")
        return elapsed

    def submit(tenant: str) -> Callable[[Side], Call]:
        def make(side: Side) -> Call:
            client, who = side.client, getattr(side, tenant)
            assert client is not None
            return lambda i: timed(
                lambda: client.post(
                    "/v1/jobs",
                    data={"operation": "resize", "params": json.dumps(RESIZE)},
                    files={"image": ("photo.png", image, "image/png")},
                    headers=who.headers,
                ),
                "submit",
                (200, 201, 202),
            )

        return make

    def get(path: Callable[[Side], str], tenant: str, **params: Any) -> Callable[[Side], Call]:
        def make(side: Side) -> Call:
            client, who, url = side.client, getattr(side, tenant), path(side)
            assert client is not None
            return lambda i: timed(
                lambda: client.get(url, params=params, headers=who.headers), f"GET {url}"
            )

        return make

    for tenant in ("big", "small"):
        record(f"submit_{tenant}", measure(f"submit ({tenant})", each(submit(tenant)), n, cpus))

    record(
        "list_first_page",
        measure("list, first page", each(get(lambda s: "/v1/jobs", "big")), n, cpus),
    )
    record(
        "list_filtered",
        measure(
            "list, filtered",
            each(get(lambda s: "/v1/jobs", "big", status="queued", operation="resize")),
            n,
            cpus,
        ),
    )

    # The cursor of the page 10,000 rows deep (fewer on an empty database: as deep as it goes).
    def deep_page(side: Side) -> Call:
        client = side.client
        assert client is not None
        cursor, depth = None, 0
        while depth < args.depth:
            params: dict[str, Any] = {"limit": 200, "status": "queued"}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/v1/jobs", params=params, headers=side.big.headers).json()
            depth += len(page["items"])
            if not page.get("next_cursor"):
                break
            cursor = page["next_cursor"]
        side.info["deep_page_depth"] = depth
        # Queued jobs, like the first page: the same rows (no outputs to sign) at any depth.
        deep = {"status": "queued", **({"cursor": cursor} if cursor else {})}
        return get(lambda s: "/v1/jobs", "big", **deep)(side)

    record("list_deep_page", measure("list, a deep page", each(deep_page), n, cpus))
    for name, side in sides.items():
        out[name]["list_deep_page"]["depth"] = side.info["deep_page_depth"]

    chosen: dict[str, dict[str, list[Any]]] = {}
    for name, side in sides.items():
        ids = h.superuser_rows(
            side.env,
            "(SELECT id, status FROM jobs WHERE organization_id = :o AND status = 'queued' "
            "ORDER BY random() LIMIT 50) UNION ALL (SELECT id, status FROM jobs TABLESAMPLE "
            "SYSTEM (1) WHERE organization_id = :o AND status = 'succeeded' LIMIT 50)",
            o=side.big.org_id,
        )
        if len(ids) < 2:
            ids = h.superuser_rows(
                side.env,
                "SELECT id, status FROM jobs WHERE organization_id = :o",
                o=side.big.org_id,
            )
        chosen[name] = {
            status: [r[0] for r in ids if r[1] == status] or [r[0] for r in ids]
            for status in ("queued", "succeeded")
        }
    for status in ("queued", "succeeded"):

        def get_job(side: Side, status: str = status) -> Call:
            client, jobs = side.client, chosen[side.phase][status]
            assert client is not None
            return lambda i: timed(
                lambda: client.get(f"/v1/jobs/{jobs[i % len(jobs)]}", headers=side.big.headers),
                "GET job",
            )

        record(f"get_{status}", measure(f"get a {status} job", each(get_job), n, cpus))

    start, end = last_month(datetime.now(UTC).date())
    month = start.strftime("%Y-%m")
    period = {"from": start.isoformat(), "to": end.isoformat()}
    for tenant in ("big", "small"):
        record(
            f"usage_report_{tenant}",
            measure(
                f"usage report by day, {month} ({tenant})",
                each(get(lambda s: "/v1/usage", tenant, group_by="day", **period)),
                n,
                cpus,
            ),
        )
        record(
            f"usage_csv_{tenant}",
            measure(
                f"usage CSV by member, {month} ({tenant})",
                each(get(lambda s: "/v1/usage.csv", tenant, group_by="member", **period)),
                n,
                cpus,
            ),
        )
        record(
            f"statement_{tenant}",
            measure(
                f"statement {month} ({tenant})",
                each(get(lambda s: f"/v1/usage/statements/{month}", tenant)),
                n,
                cpus,
            ),
        )

    # The sweeps, each in its side's sweeper process (it reports the time the call took).
    extras: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in sides}

    def sweep(op: str, *op_args: Any) -> Callable[[Side], Call]:
        def make(side: Side) -> Call:
            sweeper = side.sweeper
            assert sweeper is not None

            def go(i: int) -> float:
                elapsed, extra = sweeper.call(op, *op_args)
                extras[side.phase][op] = extra
                return elapsed

            return go

        return make

    record(
        "dispatch_claim",
        measure("dispatcher claim", each(sweep("claim")), args.sweeps, cpus, warmup=1),
    )
    for name in sides:
        out[name]["dispatch_claim"].update(extras[name]["claim"])

    # Running jobs get a fresh start and heartbeat, so the reconciler changes nothing (a
    # reused load's would be past their time limit).
    for side in sides.values():
        h.superuser_sql(
            side.env,
            "UPDATE jobs SET started_at = now(), heartbeat_at = now() WHERE status = 'running'",
        )
    for op in ("reconcile_queries", "reconcile_once", "recover_from_dead_workers"):
        record(op, measure(op, each(sweep(op)), args.sweeps, cpus, warmup=1))

    # The orphan sweep over objects of existing jobs (nothing is deleted).
    for side in sides.values():
        assert side.sweeper is not None
        owners = [
            str(r[0])
            for r in h.superuser_rows(
                side.env,
                "SELECT id FROM jobs WHERE organization_id = :o ORDER BY created_at DESC LIMIT :n",
                o=side.big.org_id,
                n=args.orphan_objects,
            )
        ]
        side.sweeper.call(
            "put_objects", [owners[k % len(owners)] for k in range(args.orphan_objects)]
        )
    record("orphan_sweep", measure("orphan sweep", each(sweep("orphan_sweep")), 3, cpus, warmup=1))
    for name in sides:
        out[name]["orphan_sweep"].update(extras[name]["orphan_sweep"])
    return out


# The SQL that migrations 0018 and 0021 replaced, beside what replaced it, on the same data:
# the superuser runs both (no RLS), each in a transaction that is rolled back.
V2_CLAIM = Path(__file__).resolve().parents[1] / "migrations/sql/hm_claim_dispatch/v2.sql"
# A queued job's position before 0021: the organization's counter less the queued jobs
# admitted since the job (from the newer end of ix_jobs_org_status_created).
POSITION_BEFORE_0021 = (
    "SELECT (SELECT c.queued FROM job_counts c WHERE c.organization_id = :org "
    "AND c.subject_type = 'org' AND c.subject_id = :org), "
    "(SELECT count(*) FROM jobs j WHERE j.organization_id = :org AND j.status = 'queued' "
    "AND j.created_at >= :at)"
)
BEFORE_AFTER = {
    "submit_queue_counts": (
        "SELECT count(*) FILTER (WHERE j.created_at < now()), count(*), "
        "count(*) FILTER (WHERE j.user_id = :user), count(*) FILTER (WHERE j.api_key_id = :key) "
        "FROM jobs j WHERE j.organization_id = :org AND j.status = 'queued'",
        "SELECT coalesce(max(c.queued) FILTER (WHERE c.subject_type = 'org'), 0), "
        "coalesce(max(c.queued) FILTER (WHERE c.subject_type = 'api_key'), 0) "
        "FROM job_counts c WHERE c.organization_id = :org AND ((c.subject_type = 'org' "
        "AND c.subject_id = :org) OR (c.subject_type = 'member' AND c.subject_id = :user) "
        "OR (c.subject_type = 'api_key' AND c.subject_id = :key))",
    ),
    "month_by_day": (
        "SELECT (created_at AT TIME ZONE 'UTC')::date, count(*), sum(gpu_seconds::numeric), "
        "sum(images), sum(megapixels::numeric) FROM usage_events WHERE organization_id = :org "
        "AND created_at >= :start AND created_at < :end GROUP BY 1 ORDER BY 1",
        "SELECT day, sum(jobs), sum(gpu_seconds), sum(images), sum(megapixels) FROM usage_daily "
        "WHERE organization_id = :org AND day >= :start AND day < :end GROUP BY 1 ORDER BY 1",
    ),
    "month_by_member": (
        "SELECT user_id, count(*), sum(gpu_seconds::numeric), sum(images), "
        "sum(megapixels::numeric) FROM usage_events WHERE organization_id = :org "
        "AND created_at >= :start AND created_at < :end GROUP BY 1",
        "SELECT user_id, sum(jobs), sum(gpu_seconds), sum(images), sum(megapixels) "
        "FROM usage_daily WHERE organization_id = :org AND day >= :start AND day < :end "
        "GROUP BY 1",
    ),
    "dispatcher_claim": (
        "SELECT * FROM pg_temp.hm_claim_dispatch(4, 200)",
        "SELECT * FROM public.hm_claim_dispatch(4, 200)",
    ),
}


def before_after(env: h.BenchEnv, big: h.Tenant, reps: int) -> dict[str, Any]:
    from sqlalchemy import create_engine, pool, text

    from hiddenmodel.jobs.repository import QUEUE_POSITIONS

    start, end = last_month(datetime.now(UTC).date())
    engine = create_engine(env.superuser_db_url, poolclass=pool.NullPool)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        key = conn.execute(
            text("SELECT id FROM api_keys WHERE organization_id = :o AND name = 'bulk'"),
            {"o": big.org_id},
        ).scalar()
        user = conn.execute(
            text("SELECT user_id FROM memberships WHERE organization_id = :o LIMIT 1"),
            {"o": big.org_id},
        ).scalar()
        params = {
            "org": big.org_id,
            "key": key,
            "user": user,
            "start": start,
            "end": end + timedelta(days=1),
        }
        pairs: list[tuple[str, str, str, dict[str, Any]]] = [
            (name, before, after, params) for name, (before, after) in BEFORE_AFTER.items()
        ]
        # A queued job's position at the front of the biggest organization's queue (the most
        # the old count read) and in the middle of it.
        queue = conn.execute(
            text(
                "SELECT id, created_at FROM jobs WHERE organization_id = :o "
                "AND status = 'queued' ORDER BY created_at"
            ),
            {"o": big.org_id},
        ).all()
        for where, row in (("front", queue[0]), ("middle", queue[len(queue) // 2])):
            one = {"org": big.org_id, "at": row[1], "ids": [row[0]], "created": [row[1]]}
            pairs.append(
                (f"queue_position_{where}", POSITION_BEFORE_0021, str(QUEUE_POSITIONS), one)
            )
        # Version 2 of the claim, as a temporary function beside the current one.
        conn.exec_driver_sql(
            V2_CLAIM.read_text().replace("public.hm_claim_dispatch(", "pg_temp.hm_claim_dispatch("),
            execution_options={"no_parameters": True},
        )
        conn.commit()
        for name, before, after, values in pairs:
            times: dict[str, list[float]] = {"before": [], "after": []}
            for i in range(reps + 1):  # interleaved; the first of each is a warm-up
                for label in ("before", "after") if i % 2 == 0 else ("after", "before"):
                    tx = conn.begin()
                    t0 = time.perf_counter()
                    conn.execute(text(before if label == "before" else after), values).all()
                    elapsed = 1000 * (time.perf_counter() - t0)
                    tx.rollback()
                    if i:
                        times[label].append(elapsed)
            medians = {
                f"{label}_p50_ms": round(statistics.median(t), 2) for label, t in times.items()
            }
            log(f"  before/after {name}: {medians}")
            out[name] = medians
    engine.dispose()
    return out


# --- the two databases ----------------------------------------------------------------------


def schema_head() -> str:
    """The migration head and a digest of every migration and SQL function file: a load made
    by other migrations (a revision re-chained, a function file edited) is not reused."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from hiddenmodel.migrate import REPO_ROOT

    head = ScriptDirectory.from_config(Config(str(REPO_ROOT / "alembic.ini"))).get_current_head()
    assert head is not None
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "migrations").rglob("*")):
        if path.suffix in (".py", ".sql"):
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return f"{head} {digest.hexdigest()[:16]}"


def reusable(env: h.BenchEnv, jobs: int, queued: int) -> dict[str, Any] | None:
    """The load an earlier run left in ``env``'s database, if it holds ``jobs`` jobs with
    ``queued`` queued and was migrated by the same migration files; the jobs earlier runs
    submitted (admitted after the load) are deleted first, with the triggers keeping the
    counters."""
    exists = h.superuser_rows(
        dataclasses.replace(env, database="postgres"),
        "SELECT 1 FROM pg_database WHERE datname = :d",
        d=env.database,
    )
    if not exists:
        log(f"--reuse: no database {env.database}")
        return None
    if not h.superuser_rows(env, f"SELECT to_regclass('{META}')")[0][0]:
        log(f"--reuse: {env.database} has no {META}")
        return None
    meta = h.superuser_rows(env, f"SELECT jobs, queued, big, small, loaded_at, head FROM {META}")
    version = h.superuser_rows(env, "SELECT version_num FROM alembic_version")
    if not meta or not version:
        return None
    loaded, head = meta[0], version[0][0]
    if (loaded[0], loaded[1]) != (jobs, queued):
        log(f"--reuse: {env.database} holds {loaded[0]} jobs, {loaded[1]} queued: not these")
        return None
    if loaded[5] != schema_head() or not schema_head().startswith(f"{head} "):
        log(f"--reuse: {env.database} was migrated as {loaded[5]}, the code is {schema_head()}")
        return None
    delete_submitted(env)
    count = h.superuser_rows(env, "SELECT count(*) FROM jobs")[0][0]
    live = h.superuser_rows(
        env, "SELECT sum(queued), sum(running) FROM job_counts WHERE subject_type = 'org'"
    )[0]
    if (count, live[0], live[1]) != (jobs, queued, running_jobs(jobs)):
        log(
            f"--reuse: {env.database} holds {count} jobs, {live[0]} queued and {live[1]} "
            f"running; its load had {jobs}, {queued} and {running_jobs(jobs)}"
        )
        return None
    return {"big": loaded[2], "small": loaded[3], "loaded_at": loaded[4]}


def reuse_keys(big_org: Any, small_org: Any) -> tuple[h.Tenant, h.Tenant]:
    """New API keys for the kept organizations (the old ones' secrets were not kept)."""
    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines

    scopes = ["jobs:read", "jobs:write", "usage:read"]

    async def _keys() -> tuple[str, str]:
        a = await provisioning.create_api_key(str(big_org), "scale", scopes)
        b = await provisioning.create_api_key(str(small_org), "scale", scopes)
        await dispose_engines()
        return a, b

    big_key, small_key = asyncio.run(_keys())
    return h.Tenant(org_id=big_org, api_key=big_key), h.Tenant(org_id=small_org, api_key=small_key)


def prepare(phase: str, env: h.BenchEnv, args: argparse.Namespace) -> Side:
    """The side's database: built (and, for ``full``, loaded or reused) and described."""
    jobs = args.jobs if phase == "full" else 0
    queued = (
        (min(args.queued, jobs // 2) if args.queued is not None else jobs // 100) if jobs else 0
    )
    info: dict[str, Any] = {"database": env.database, "jobs": jobs, "queued": queued}
    t0 = time.perf_counter()
    use_database(env.database)
    kept = reusable(env, jobs, queued) if args.reuse and jobs else None
    if kept is not None:
        big, small = reuse_keys(kept["big"], kept["small"])
        info["reused_load_of"] = kept["loaded_at"]
        log(f"{phase}: reusing the load of {kept['loaded_at']} in {env.database}")
    else:
        h.recreate_database(env)
        big, small = provision(env)
        if jobs:
            info["fill_seconds"] = fill(env, jobs, queued)
        h.superuser_sql(
            env,
            "DROP TABLE IF EXISTS bench_orgs, bench_users",
            f"CREATE TABLE {META} (jobs bigint, queued bigint, big uuid, small uuid, "
            "loaded_at timestamptz, head text)",
            f"INSERT INTO {META} VALUES ({jobs}, {queued}, '{big.org_id}', '{small.org_id}', "
            f"clock_timestamp(), '{schema_head()}')",
        )
    info["orgs"] = {"big": str(big.org_id), "small": str(small.org_id)}
    info["size"] = database_size(env)
    info["jobs_per_org"] = {
        name: h.superuser_rows(
            env, "SELECT count(*) FROM jobs WHERE organization_id = :o", o=tenant.org_id
        )[0][0]
        for name, tenant in (("big", big), ("small", small))
    }
    log(f"{phase}: {env.database} ready in {time.perf_counter() - t0:.0f} s: {info['size']}")
    return Side(phase=phase, env=env, big=big, small=small, info=info)


def start(side: Side) -> None:
    """The side's API and sweeper, on its own database."""
    port = free_port()
    side.api = h.spawn(
        f"api-{side.phase}",
        hiddenmodel_argv("api", "--port", str(port), "--workers", "1", log_level="warning"),
        env=database_env(side.env.database),
    )
    side.api_url = f"http://127.0.0.1:{port}"
    wait_http(f"{side.api_url}/healthz", child=side.api)
    side.client = httpx.Client(base_url=side.api_url, timeout=60)
    side.sweeper = Sweeper(database_env(side.env.database), str(side.big.org_id))
    side.cpu = ServerCpu(side.env, [side.api.pid, side.sweeper.pid])


def stop(side: Side) -> None:
    if side.cpu is not None:
        side.cpu.close()
    if side.sweeper is not None:
        side.sweeper.close()
    if side.client is not None:
        side.client.close()
    if side.api is not None:
        h.stop(side.api)
    # What this run submitted goes, so a later --reuse finds the load as it was.
    if side.info["jobs"]:
        delete_submitted(side.env)


def delete_submitted(env: Any) -> None:
    """Delete the jobs measured requests submitted (only the two benchmark organizations
    submit), so that a later ``--reuse`` finds the load as it was.

    The product never deletes jobs, and the foreign keys to ``jobs`` cascade by ``job_id``
    alone while every index leads with ``organization_id``: a plain DELETE scanned the 9 M
    usage events once per job (minutes). So the jobs are first canceled (the counter trigger
    takes them out of the queue counts, as a cancel does), their rows in the other tables
    deleted through the organization's indexes, and then the jobs themselves with triggers
    and foreign-key checks off, as the load writes them."""
    big, small, loaded_at = h.superuser_rows(env, f"SELECT big, small, loaded_at FROM {META}")[0]
    mine = "SELECT id FROM jobs WHERE organization_id = :o AND created_at > :t"
    for org in (big, small):
        h.superuser_rows(
            env,
            f"UPDATE jobs SET status = 'canceled' WHERE id IN ({mine}) "
            "AND status IN ('queued', 'running') RETURNING 1",
            o=org,
            t=loaded_at,
        )
        for table in ("job_outbox", "quota_reservations", "usage_events"):
            h.superuser_rows(
                env,
                f"DELETE FROM {table} WHERE organization_id = :o AND job_id IN ({mine}) "
                "RETURNING 1",
                o=org,
                t=loaded_at,
            )
        # Values of the benchmark's own meta row (a UUID and a timestamp), not input.
        h.superuser_sql(
            env,
            "SET LOCAL session_replication_role = replica",
            f"DELETE FROM jobs WHERE organization_id = '{org}' "
            f"AND created_at > '{loaded_at.isoformat()}'",
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--queued", type=int, default=None, help="default: 1%% of --jobs")
    parser.add_argument("--requests", type=int, default=200, help="timed calls per request")
    parser.add_argument("--sweeps", type=int, default=20, help="timed dispatcher/reconciler runs")
    parser.add_argument("--depth", type=int, default=10_000, help="rows before the deep page")
    parser.add_argument("--orphan-objects", type=int, default=1000)
    parser.add_argument(
        "--phases",
        default="empty,full",
        help="the databases to measure, side by side (one alone: no ratios)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the full database an earlier run loaded when it holds the same jobs and "
        "was migrated by the same migration files",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - set(DATABASES):
        parser.error(f"--phases: a comma-separated subset of {','.join(DATABASES)}")

    h.install_cleanup()
    env = h.configure_env(database=DATABASES[phases[0]], redis_url=REDIS_URL, bucket="hm-scale")
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": h.machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "phases": {},
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str))

    h.flush_redis(env)
    stack = h.Stack(env=env)
    stack.start_s3()
    sides: dict[str, Side] = {}
    try:
        for phase in phases:
            side_env = dataclasses.replace(env, database=DATABASES[phase])
            sides[phase] = prepare(phase, side_env, args)
            result["phases"][phase] = sides[phase].info
        if "full" in sides:
            result["phases"]["full"]["sql_before_after"] = before_after(
                sides["full"].env, sides["full"].big, args.sweeps
            )
        save()
        for side in sides.values():
            start(side)
        load_at_start = load1()
        results = measure_all(sides, args)
        for phase, rows in results.items():
            result["phases"][phase]["results"] = rows
        loads = [v for rows in results.values() for row in rows.values() for v in row["load1"]]
        result["load1_during"] = {
            "start": load_at_start,
            "min": min(loads),
            "max": max(loads),
            "mean": round(statistics.fmean(loads), 2),
        }
    finally:
        for side in sides.values():
            stop(side)
        if stack.s3 is not None:
            h.stop(stack.s3)
    save()

    if "empty" in sides and "full" in sides:
        empty, full = result["phases"]["empty"]["results"], result["phases"]["full"]["results"]
        ratios = {}
        print(
            f"{'measure':28} {'empty p50':>10} {'p99':>8} {'full p50':>10} {'p99':>8} "
            f"{'p50 x':>6} {'p99 x':>6} {'cpu e':>6} {'cpu f':>6} {'cpu x':>6} {'load':>10}"
        )
        for key in empty:
            e, f = empty[key], full[key]
            r = {
                "p50": round(f["p50_ms"] / e["p50_ms"], 2) if e["p50_ms"] else None,
                "p99": round(f["p99_ms"] / e["p99_ms"], 2) if e["p99_ms"] else None,
                "cpu": round(f["server_cpu_ms"] / e["server_cpu_ms"], 2)
                if e.get("server_cpu_ms")
                else None,
            }
            ratios[key] = r
            load = "-".join(f"{v:.1f}" for v in f["load1"])
            print(
                f"{key:28} {e['p50_ms']:10.2f} {e['p99_ms']:8.2f} {f['p50_ms']:10.2f} "
                f"{f['p99_ms']:8.2f} {r['p50'] or 0:6.2f} {r['p99'] or 0:6.2f} "
                f"{e['server_cpu_ms']:6.1f} {f['server_cpu_ms']:6.1f} {r['cpu'] or 0:6.2f} "
                f"{load:>10}"
            )
        result["ratios"] = ratios
        during = result["load1_during"]
        print(
            f"SUMMARY scale: jobs={args.jobs} "
            f"db={result['phases']['full']['size']['database_bytes'] / 2**30:.2f}GiB "
            f"submit_p50x={ratios['submit_big']['p50']} submit_cpux={ratios['submit_big']['cpu']}"
            f" list_p99x={ratios['list_first_page']['p99']}"
            f" list_p99={full['list_first_page']['p99_ms']}ms"
            f" deep_p99x={ratios['list_deep_page']['p99']}"
            f" get_p99x={ratios['get_queued']['p99']} get_cpux={ratios['get_queued']['cpu']}"
            f" report_big_p50={full['usage_report_big']['p50_ms']}ms"
            f" claim_p50x={ratios['dispatch_claim']['p50']}"
            f" load={during['min']}-{during['max']}"
        )
    result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
