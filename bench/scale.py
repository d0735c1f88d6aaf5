"""What the platform's everyday requests and sweeps cost on a full database, as a ratio to the
same requests on an empty one, measured in the same run.

Two phases, each on a database ``hiddenmodel_scale`` built afresh by the real migrations, with
1,000 organizations (two of them provisioned through the real services, with API keys the
benchmark uses: the biggest organization and a small one from the long tail), their members,
one API key each and every plan limit lifted:

* ``empty``: no jobs at all;
* ``full``: ``--jobs`` jobs (10 M by default) and a usage event for each that succeeded,
  bulk-loaded in SQL as the superuser (no RLS, no triggers: the job counters and usage roll-ups
  are then computed once, exactly as migration 0018 fills them), the jobs' plain indexes built
  after the load, then ``VACUUM ANALYZE``. The biggest organization has 40 % of the jobs, the
  others a long tail (organization k of 999 gets a share falling with the cube of k);
  ``--queued`` of them (1 % by default) are queued, with their outbox rows, 0.02 % running;
  the rest finished over 13 months (more of them recent).

Then, through the API under uvicorn (one worker, on loopback) and the dispatcher's and
reconciler's own functions, it measures p50/p99 latency and the server CPU per request (the
API process plus the database backends serving it, read from /proc) of:

submit (``POST /v1/jobs``, a small PNG, big and small organization); ``GET /v1/jobs`` first
page, a page filtered by status and operation, a page of queued jobs 10,000 rows deep by
cursor;
``GET /v1/jobs/{id}`` (queued and finished jobs); the usage report by day and its CSV for last
month, and last month's statement (big and small organization); one dispatcher claim
(``hm_claim_dispatch``, rolled back so every repetition sees the same queue; how many
organizations it served and the most jobs it gave one); the reconciler's two sweeps
(``reconcile_once``, ``recover_from_dead_workers``); the orphan sweep over ``--orphan-objects``
stored objects of the biggest organization.

Prints a table and one summary line; ``--out`` writes everything as JSON. The machine is
shared: run it niced, and the full size once.

    nice .venv/bin/python bench/scale.py --jobs 1000000 --out var/bench/scale-1m.json
    nice .venv/bin/python bench/scale.py --out var/bench/scale-10m.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _harness as h  # the bench directory is sys.path[0] when run as a script
import httpx

ORGS = 1000
SMALL_ORG_INDEX = 500
OPERATIONS = ("resize", "remove_background", "ghost_mannequin")
RESIZE = {"width": 64, "height": 64, "mode": "fit"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- CPU of the server side -----------------------------------------------------------------


class ServerCpu:
    """CPU seconds of the API process and of every backend connected to the database."""

    def __init__(self, env: h.BenchEnv, api_pid: int) -> None:
        from sqlalchemy import create_engine, pool

        self.api_pid = api_pid
        self.engine = create_engine(env.superuser_db_url, poolclass=pool.NullPool)
        self.conn = self.engine.connect()
        self.database = env.database

    def _backends(self) -> list[int]:
        from sqlalchemy import text

        rows = self.conn.execute(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
            ),
            {"db": self.database},
        )
        self.conn.rollback()
        return [r[0] for r in rows]

    def sample(self) -> dict[int, float]:
        out = {-1: h.cpu_seconds(self.api_pid)}
        for pid in self._backends():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                out[pid] = h.cpu_seconds(pid)
        return out

    @staticmethod
    def used(before: dict[int, float], after: dict[int, float]) -> tuple[float, float]:
        """(API seconds, database seconds) between two samples."""
        api = after[-1] - before[-1]
        db = sum(v - before.get(pid, 0.0) for pid, v in after.items() if pid != -1)
        return api, db

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()


def measure(
    name: str,
    fn: Callable[[int], None],
    n: int,
    cpu: ServerCpu | None,
    *,
    warmup: int = 3,
) -> dict[str, Any]:
    """Run ``fn(i)`` ``warmup`` times untimed, then ``n`` times: latency percentiles in ms and
    server CPU per call."""
    for i in range(warmup):
        fn(-1 - i)
    before = cpu.sample() if cpu else {}
    times: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        times.append(1000 * (time.perf_counter() - t0))
    row: dict[str, Any] = {
        "n": n,
        "p50_ms": round(statistics.median(times), 2),
        "p99_ms": round(pct(times, 99), 2),
        "max_ms": round(max(times), 2),
    }
    if cpu:
        api, db = ServerCpu.used(before, cpu.sample())
        row["api_cpu_ms"] = round(1000 * api / n, 2)
        row["db_cpu_ms"] = round(1000 * db / n, 2)
        row["server_cpu_ms"] = round(1000 * (api + db) / n, 2)
    log(f"  {name}: {row}")
    return row


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


def fill(env: h.BenchEnv, jobs: int, queued: int) -> dict[str, float]:
    """Load ``jobs`` jobs, their usage events and outbox rows; returns seconds per step."""
    from sqlalchemy import create_engine, pool, text

    running = max(1, jobs // 5000)
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
                "TRUNCATE job_counts, usage_daily",
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
                for t in ("jobs", "usage_events", "job_outbox", "job_counts", "usage_daily")
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


def measure_phase(
    stack: h.Stack, big: h.Tenant, small: h.Tenant, args: argparse.Namespace
) -> dict[str, Any]:
    from sqlalchemy import create_engine, pool, text
    from sqlalchemy.orm import Session

    from hiddenmodel import storage
    from hiddenmodel.jobs import repository
    from hiddenmodel.jobs.orphans import sweep_orphans
    from hiddenmodel.settings import get_settings

    assert stack.api is not None
    env = stack.env
    settings = get_settings()
    cpu = ServerCpu(env, stack.api.pid)
    out: dict[str, Any] = {}
    client = httpx.Client(base_url=stack.api_url, timeout=60)
    image = h.photo_png(96, 72, seed=1)
    n = args.requests

    def submit(tenant: h.Tenant) -> Callable[[int], None]:
        def go(i: int) -> None:
            r = client.post(
                "/v1/jobs",
                data={"operation": "resize", "params": json.dumps(RESIZE)},
                files={"image": ("photo.png", image, "image/png")},
                headers=tenant.headers,
            )
            if r.status_code not in (200, 201, 202):
                raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")

        return go

    def get(path: str, tenant: h.Tenant, **params: Any) -> Callable[[int], None]:
        def go(i: int) -> None:
            r = client.get(path, params=params, headers=tenant.headers)
            if r.status_code != 200:
                raise RuntimeError(f"GET {path} answered {r.status_code}: {r.text[:300]}")

        return go

    for name, tenant in (("big", big), ("small", small)):
        out[f"submit_{name}"] = measure(f"submit ({name})", submit(tenant), n, cpu)

    out["list_first_page"] = measure("list, first page", get("/v1/jobs", big), n, cpu)
    out["list_filtered"] = measure(
        "list, filtered",
        get("/v1/jobs", big, status="queued", operation="resize"),
        n,
        cpu,
    )
    # The cursor of the page 10,000 rows deep (fewer on an empty database: as deep as it goes).
    cursor = None
    depth = 0
    while depth < args.depth:
        params: dict[str, Any] = {"limit": 200, "status": "queued"}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params, headers=big.headers).json()
        depth += len(page["items"])
        if not page.get("next_cursor"):
            break
        cursor = page["next_cursor"]
    # Queued jobs, like the first page: the same rows (no outputs to sign) at any depth.
    deep: dict[str, Any] = {"status": "queued", **({"cursor": cursor} if cursor else {})}
    out["list_deep_page"] = measure(
        f"list, page {depth} rows deep", get("/v1/jobs", big, **deep), n, cpu
    )
    out["list_deep_page"]["depth"] = depth

    ids = h.superuser_rows(
        env,
        "(SELECT id, status FROM jobs WHERE organization_id = :o AND status = 'queued' "
        "ORDER BY random() LIMIT 50) UNION ALL (SELECT id, status FROM jobs TABLESAMPLE "
        "SYSTEM (1) WHERE organization_id = :o AND status = 'succeeded' LIMIT 50)",
        o=big.org_id,
    )
    if len(ids) < 2:
        ids = h.superuser_rows(
            env, "SELECT id, status FROM jobs WHERE organization_id = :o", o=big.org_id
        )
    for status in ("queued", "succeeded"):
        chosen = [r[0] for r in ids if r[1] == status] or [r[0] for r in ids]

        def get_job(i: int, chosen: list[Any] = chosen) -> None:
            job_id = chosen[i % len(chosen)]
            r = client.get(f"/v1/jobs/{job_id}", headers=big.headers)
            if r.status_code != 200:
                raise RuntimeError(f"GET job answered {r.status_code}")

        out[f"get_{status}"] = measure(f"get a {status} job", get_job, n, cpu)

    start, end = last_month(datetime.now(UTC).date())
    month = start.strftime("%Y-%m")
    period = {"from": start.isoformat(), "to": end.isoformat()}
    for name, tenant in (("big", big), ("small", small)):
        out[f"usage_report_{name}"] = measure(
            f"usage report by day, {month} ({name})",
            get("/v1/usage", tenant, group_by="day", **period),
            n,
            cpu,
        )
        out[f"usage_csv_{name}"] = measure(
            f"usage CSV by member, {month} ({name})",
            get("/v1/usage.csv", tenant, group_by="member", **period),
            n,
            cpu,
        )
        out[f"statement_{name}"] = measure(
            f"statement {month} ({name})",
            get(f"/v1/usage/statements/{month}", tenant),
            n,
            cpu,
        )
    client.close()

    # The dispatcher's claim, rolled back: every repetition sees the same queue. As the worker
    # role, the only one that may run the cross-tenant sweeps (migration 0016).
    engine = create_engine(settings.database_worker_url, poolclass=pool.NullPool)
    conn = engine.connect()
    served: dict[str, Any] = {}

    def claim(i: int) -> None:
        tx = conn.begin()
        rows = conn.execute(
            text("SELECT * FROM hm_claim_dispatch(:cap, :limit)"),
            {"cap": settings.dispatch_org_inflight_cap, "limit": settings.dispatch_batch_size},
        ).all()
        tx.rollback()
        per_org: dict[Any, int] = {}
        for r in rows:
            per_org[r[0]] = per_org.get(r[0], 0) + 1
        served.update(jobs=len(rows), orgs=len(per_org), most=max(per_org.values(), default=0))

    out["dispatch_claim"] = measure("dispatcher claim", claim, args.sweeps, cpu, warmup=1)
    out["dispatch_claim"].update(served)
    conn.close()
    engine.dispose()

    # The reconciler's sweeps. Running jobs have a fresh heartbeat, so nothing is changed.
    from workers import dispatcher

    h.superuser_sql(env, "UPDATE jobs SET heartbeat_at = now() WHERE status = 'running'")
    # Pooled: the backend stays, so its CPU time is counted. The worker role, as above.
    app_engine = create_engine(settings.database_worker_url, pool_size=1)

    def candidates(i: int) -> None:
        with Session(app_engine) as session:
            repository.reconcile_candidates_sync(
                session,
                settings.job_lease_seconds,
                settings.redispatch_grace_seconds,
                min(settings.cpu_hard_limit_seconds, settings.gpu_hard_limit_seconds),
            )
            repository.running_jobs_sync(session)

    out["reconcile_queries"] = measure("reconciler queries", candidates, args.sweeps, cpu)
    out["reconcile_once"] = measure(
        "reconcile_once", lambda i: dispatcher.reconcile_once(), args.sweeps, cpu
    )
    out["recover_from_dead_workers"] = measure(
        "recover_from_dead_workers",
        lambda i: dispatcher.recover_from_dead_workers(),
        args.sweeps,
        cpu,
    )
    app_engine.dispose()

    # The orphan sweep over objects of existing jobs (nothing is deleted).
    owners = [
        r[0]
        for r in h.superuser_rows(
            env,
            "SELECT id FROM jobs WHERE organization_id = :o ORDER BY created_at DESC LIMIT :n",
            o=big.org_id,
            n=args.orphan_objects,
        )
    ]
    for k in range(args.orphan_objects):
        job_id = owners[k % len(owners)]
        storage.put_object(
            f"orgs/{big.org_id}/jobs/{job_id}/extra-{k}.png",
            b"x",
            "image/png",
            org_id=big.org_id,
            job_id=job_id,
            kind="input",
        )
    listed: dict[str, Any] = {}

    def sweep(i: int) -> None:
        result = sweep_orphans(prefix=f"orgs/{big.org_id}/", grace_seconds=-60, budget_seconds=600)
        listed.update(listed=result.listed, deleted=result.deleted)

    out["orphan_sweep"] = measure("orphan sweep", sweep, 3, cpu, warmup=1)
    out["orphan_sweep"].update(listed)
    cpu.close()
    return out


# The SQL that migration 0018 replaced, beside what replaced it, on the same data: the
# superuser runs both (no RLS), each in a transaction that is rolled back.
V2_CLAIM = Path(__file__).resolve().parents[1] / "migrations/sql/hm_claim_dispatch/v2.sql"
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
        # Version 2 of the claim, as a temporary function beside version 3.
        conn.exec_driver_sql(
            V2_CLAIM.read_text().replace("public.hm_claim_dispatch(", "pg_temp.hm_claim_dispatch("),
            execution_options={"no_parameters": True},
        )
        conn.commit()
        for name, pair in BEFORE_AFTER.items():
            row: dict[str, Any] = {}
            for label, sql in zip(("before", "after"), pair, strict=True):
                times: list[float] = []
                for i in range(reps + 1):
                    tx = conn.begin()
                    t0 = time.perf_counter()
                    conn.execute(text(sql), params).all()
                    elapsed = 1000 * (time.perf_counter() - t0)
                    tx.rollback()
                    if i:  # the first is a warm-up
                        times.append(elapsed)
                row[f"{label}_p50_ms"] = round(statistics.median(times), 2)
            log(f"  before/after {name}: {row}")
            out[name] = row
    engine.dispose()
    return out


def run_phase(env: h.BenchEnv, jobs: int, args: argparse.Namespace) -> dict[str, Any]:
    phase: dict[str, Any] = {"jobs": jobs}
    t0 = time.perf_counter()
    h.recreate_database(env)
    h.flush_redis(env)
    stack = h.Stack(env=env)
    stack.start_s3()
    big, small = provision(env)
    phase["orgs"] = {"big": str(big.org_id), "small": str(small.org_id)}
    if jobs:
        queued = min(args.queued, jobs // 2) if args.queued is not None else jobs // 100
        phase["queued"] = queued
        phase["fill_seconds"] = fill(env, jobs, queued)
    h.superuser_sql(env, "DROP TABLE IF EXISTS bench_orgs, bench_users")
    phase["size"] = database_size(env)
    phase["jobs_per_org"] = {
        name: h.superuser_rows(
            env, "SELECT count(*) FROM jobs WHERE organization_id = :o", o=tenant.org_id
        )[0][0]
        for name, tenant in (("big", big), ("small", small))
    }
    log(f"phase with {jobs} jobs ready in {time.perf_counter() - t0:.0f} s: {phase['size']}")
    phase["sql_before_after"] = before_after(env, big, args.sweeps)
    stack.start_api()
    try:
        phase["results"] = measure_phase(stack, big, small, args)
    finally:
        if stack.api is not None:
            h.stop(stack.api)
        if stack.s3 is not None:
            h.stop(stack.s3)
    return phase


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000_000)
    parser.add_argument("--queued", type=int, default=None, help="default: 1%% of --jobs")
    parser.add_argument("--requests", type=int, default=200, help="timed calls per request")
    parser.add_argument("--sweeps", type=int, default=20, help="timed dispatcher/reconciler runs")
    parser.add_argument("--depth", type=int, default=10_000, help="rows before the deep page")
    parser.add_argument("--orphan-objects", type=int, default=1000)
    parser.add_argument("--phases", default="empty,full")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    h.install_cleanup()
    env = h.configure_env(
        database="hiddenmodel_scale", redis_url="redis://127.0.0.1:6379/11", bucket="hm-scale"
    )
    result: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": h.machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "phases": {},
    }
    for phase in args.phases.split(","):
        jobs = 0 if phase == "empty" else args.jobs
        log(f"phase {phase}: {jobs} jobs")
        result["phases"][phase] = run_phase(env, jobs, args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str))

    phases = result["phases"]
    if "empty" in phases and "full" in phases:
        empty, full = phases["empty"]["results"], phases["full"]["results"]
        ratios = {}
        print(
            f"{'measure':32} {'empty p50':>10} {'p99':>8} {'full p50':>10} {'p99':>8} "
            f"{'p50 x':>6} {'p99 x':>6} {'cpu x':>6}"
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
            print(
                f"{key:32} {e['p50_ms']:10.2f} {e['p99_ms']:8.2f} {f['p50_ms']:10.2f} "
                f"{f['p99_ms']:8.2f} {r['p50'] or 0:6.2f} {r['p99'] or 0:6.2f} {r['cpu'] or 0:6.2f}"
            )
        result["ratios"] = ratios
        print(
            f"SUMMARY scale: jobs={args.jobs} "
            f"db={phases['full']['size']['database_bytes'] / 2**30:.2f}GiB "
            f"submit_p50x={ratios['submit_big']['p50']}"
            f" list_p99x={ratios['list_first_page']['p99']}"
            f" deep_p99x={ratios['list_deep_page']['p99']} get_p99x={ratios['get_queued']['p99']}"
            f" report_big_p50={full['usage_report_big']['p50_ms']}ms"
            f" claim_p50x={ratios['dispatch_claim']['p50']}"
        )
    result["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
