"""Shared startup for benchmarks that need the whole platform on loopback.

``Stack`` brings up, as child processes of the benchmark: moto's S3 server, the API under
uvicorn (one worker), the dispatcher and Celery workers, against a database and a Redis
database number of its own, and provisions one organization with an API key. Every child
runs in its own process group and is stopped (SIGTERM, then SIGKILL to its group) when the
stack stops, on normal exit, on Ctrl-C and on SIGTERM, through :mod:`hiddenmodel.processes`.

The ``HM_*`` environment must be set before any project module reads its settings, so
project modules are imported inside the functions here, after :func:`configure_env`; only
:mod:`hiddenmodel.processes`, which reads no settings, is imported at the top.
"""

from __future__ import annotations

import asyncio
import atexit
import io
import json
import os
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from hiddenmodel.processes import (
    WORKER_READY,
    Child,
    Children,
    free_port,
    hiddenmodel_argv,
    wait_for_output,
    wait_http,
    wait_port,
)

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / "var" / "bench-logs"
PG_HOSTPORT = os.environ.get("BENCH_PG_HOSTPORT", "127.0.0.1:5432")
ADMIN_URL = os.environ.get(
    "BENCH_ADMIN_URL", f"postgresql+psycopg://postgres@{PG_HOSTPORT}/postgres"
)


# Every child started through spawn(), stopped newest first.
_RUNNING = Children()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Stop every child started through :func:`spawn` at exit, Ctrl-C or SIGTERM."""
    atexit.register(_RUNNING.stop_all)
    # Explicit: a shell that starts the benchmark in the background ignores SIGINT for it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)


def spawn(name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
    """A child in its own process group, output in var/bench-logs/<name>.log (overwritten)."""
    return _RUNNING.start(
        Child(
            name=name,
            argv=argv,
            env=dict(env or {}),
            log_path=LOG_DIR / f"{name}.log",
            append_log=False,
            cwd=REPO,
        )
    )


def stop(proc: Child) -> None:
    _RUNNING.stop(proc)


def hiddenmodel(name: str, *args: str, log_level: str = "info") -> Child:
    return spawn(name, hiddenmodel_argv(*args, log_level=log_level))


# --- environment ---------------------------------------------------------------------------


@dataclass
class BenchEnv:
    database: str
    redis_url: str
    s3_port: int
    bucket: str

    @property
    def superuser_db_url(self) -> str:
        return ADMIN_URL.rsplit("/", 1)[0] + f"/{self.database}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def configure_env(
    database: str = "hiddenmodel_bench",
    redis_url: str = "redis://127.0.0.1:6379/10",
    bucket: str = "hm-bench",
    extra: dict[str, str] | None = None,
) -> BenchEnv:
    """Set ``HM_*`` for this process and its children. Role passwords are the ones the test
    suite uses: the roles are shared by every database of the cluster, and bootstrap resets
    their passwords to what the URLs say."""
    env = BenchEnv(database=database, redis_url=redis_url, s3_port=free_port(), bucket=bucket)
    os.environ.update(
        {
            "HM_ENVIRONMENT": "bench",
            "HM_DATABASE_URL": f"postgresql+psycopg://hm_app:hm_app@{PG_HOSTPORT}/{database}",
            "HM_DATABASE_OWNER_URL": (
                f"postgresql+psycopg://hm_owner:hm_owner@{PG_HOSTPORT}/{database}"
            ),
            "HM_DATABASE_OPS_URL": f"postgresql+psycopg://hm_ops:hm_ops@{PG_HOSTPORT}/{database}",
            "HM_DATABASE_ADMIN_URL": ADMIN_URL,
            "HM_REDIS_URL": redis_url,
            "HM_SECRET_KEY": "bench-secret-key-0123456789abcdef0123456789abcdef",
            "HM_PASSWORD_HASH_TIME_COST": "1",
            "HM_PASSWORD_HASH_MEMORY_KIB": "64",
            "HM_DATA_DIR": str(REPO / "var" / "bench"),
            "HM_S3_ENDPOINT_URL": env.s3_endpoint,
            "HM_S3_BUCKET": bucket,
            "OMP_NUM_THREADS": "1",
            **(extra or {}),
        }
    )
    return env


def recreate_database(env: BenchEnv) -> None:
    """Drop the benchmark database and build it again with the real migrations."""
    from sqlalchemy import create_engine, pool, text

    from hiddenmodel.migrate import migrate
    from hiddenmodel.settings import get_settings

    admin = create_engine(ADMIN_URL, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{env.database}" WITH (FORCE)'))
    admin.dispose()
    get_settings.cache_clear()
    migrate()


def superuser_sql(env: BenchEnv, *statements: str) -> None:
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(env.superuser_db_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        for sql in statements:
            conn.execute(text(sql))
    engine.dispose()


def superuser_rows(env: BenchEnv, sql: str, **params: Any) -> list[Any]:
    from sqlalchemy import create_engine, pool, text

    engine = create_engine(env.superuser_db_url, poolclass=pool.NullPool)
    with engine.begin() as conn:
        rows = list(conn.execute(text(sql), params))
    engine.dispose()
    return rows


def flush_redis(env: BenchEnv) -> None:
    import redis

    client = redis.Redis.from_url(env.redis_url)
    client.flushdb()
    client.close()


@dataclass
class Tenant:
    org_id: uuid.UUID
    api_key: str
    plan: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


INT32_MAX = 2**31 - 1
# Every plan limit at its ceiling: the quota and rate-limit checks still run on each request,
# as they do for a paying customer, but none refuses a benchmark's thousands of jobs.
LIFTED_LIMITS: dict[str, float] = {
    "monthly_gpu_seconds": 1e12,
    "monthly_images": INT32_MAX,
    "max_running_jobs": INT32_MAX,
    "max_queued_jobs": INT32_MAX,
    "storage_bytes": 2**62,
    "requests_per_minute": INT32_MAX,
    "org_requests_per_minute": INT32_MAX,
}


async def _lift_limits(org_id: uuid.UUID, user_id: uuid.UUID, email: str) -> str:
    """Put the organization on the ``pro`` plan with every limit at its ceiling, through the
    operator service (audited like any operator change)."""
    try:
        from hiddenmodel.admin.auth import Operator
        from hiddenmodel.admin.schemas import OrgPlanSet
        from hiddenmodel.admin.service import set_org_plan
    except ImportError:  # a checkout without plans and quotas
        return "no plans"
    from hiddenmodel.db import ops_session

    body = OrgPlanSet(plan="pro", overrides=dict(LIFTED_LIMITS))
    async with ops_session(actor=email, purpose="benchmark: lift plan limits") as session:
        await set_org_plan(session, Operator(user_id=user_id, email=email), org_id, body)
    return "pro, limits at their ceiling"


def provision_tenant(slug: str = "bench") -> Tenant:
    """One user (an operator), one organization it owns on a plan whose limits never refuse,
    one API key with jobs:read and jobs:write."""
    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines

    async def _go() -> Tenant:
        email = f"{slug}-{uuid.uuid4().hex[:8]}@example.com"
        user_id = await provisioning.create_user(email, "Bench-password-42", superuser=True)
        org_id = await provisioning.create_org(f"{slug}-{uuid.uuid4().hex[:8]}", slug, email)
        plan = await _lift_limits(org_id, user_id, email)
        token = await provisioning.create_api_key(str(org_id), "bench", ["jobs:read", "jobs:write"])
        await dispose_engines()
        return Tenant(org_id=org_id, api_key=token, plan=plan)

    return asyncio.run(_go())


# --- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    env: BenchEnv
    api_port: int = 0
    s3: Child | None = None
    api: Child | None = None
    dispatcher: Child | None = None
    workers: list[Child] = field(default_factory=list)
    tenant: Tenant | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_s3(self) -> None:
        from hiddenmodel import storage

        self.s3 = spawn(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.env.s3_port)],
        )
        wait_port(self.env.s3_port, child=self.s3)
        storage.s3_client.cache_clear()
        storage.ensure_bucket()

    def start_api(self, log_level: str = "warning") -> None:
        self.api_port = free_port()
        self.api = hiddenmodel(
            "api", "api", "--port", str(self.api_port), "--workers", "1", log_level=log_level
        )
        wait_http(f"{self.api_url}/healthz", child=self.api)

    def start_dispatcher(self) -> None:
        self.dispatcher = hiddenmodel("dispatcher", "dispatcher")

    def start_worker(self, queues: str = "cpu") -> Child:
        n = len(self.workers) + 1
        worker = hiddenmodel(
            f"worker-{n}", "worker", "--queues", queues, "--hostname", f"bench-{n}@%h"
        )
        self.workers.append(worker)
        wait_for_output(worker, WORKER_READY, f"worker {worker.name}", timeout=60)
        return worker

    def stop_workers_and_dispatcher(self) -> None:
        for worker in self.workers:
            stop(worker)
        self.workers = []
        if self.dispatcher is not None:
            stop(self.dispatcher)
            self.dispatcher = None


def start_stack(
    env: BenchEnv,
    *,
    workers: int = 1,
    queues: str = "cpu",
    log: Callable[[str], None] = print,
) -> Stack:
    """Database, Redis, S3, tenant, API, dispatcher and workers, in that order."""
    stack = Stack(env=env)
    t0 = time.perf_counter()
    recreate_database(env)
    flush_redis(env)
    log(f"database {env.database} migrated, redis {env.redis_url} flushed")
    stack.start_s3()
    stack.tenant = provision_tenant()
    log(f"organization {stack.tenant.org_id}: {stack.tenant.plan}")
    stack.start_api()
    stack.start_dispatcher()
    for _ in range(workers):
        stack.start_worker(queues)
    log(f"stack up in {time.perf_counter() - t0:.1f}s: api {stack.api_url}, s3 {env.s3_endpoint}")
    return stack


# --- inputs ---------------------------------------------------------------------------------


def photo_png(width: int, height: int, seed: int = 0) -> bytes:
    """A deterministic image that compresses like a photograph: lit gradients, a vignette,
    soft-edged shaded shapes, low-frequency texture and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = x / width, y / height
    base = np.stack(
        [150 + 70 * u - 30 * v, 130 + 40 * v + 20 * u, 165 - 45 * u * v], axis=-1
    ).astype(np.float32)
    r2 = (u - 0.45) ** 2 + (v - 0.4) ** 2
    base *= (1.0 - 0.55 * r2)[..., None]
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(14):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.04, 0.22) * width, rng.uniform(0.04, 0.22) * height
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:
            pts = [
                (cx + rx * np.cos(a), cy + ry * np.sin(a))
                for a in np.sort(rng.uniform(0, 2 * np.pi, 6))
            ]
            draw.polygon(pts, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2.0))
    pixels = np.asarray(image, dtype=np.float32)
    shade = 1.0 + 0.12 * np.sin(u * 9.0 + np.sin(v * 5.0) * 2.0) * np.cos(v * 7.0 - u * 3.0)
    pixels = pixels * shade[..., None] + rng.normal(0.0, 3.0, pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": sys.version.split()[0],
        "loadavg_start": os.getloadavg(),
    }


GHOST_EVAL = Path(__file__).resolve().parents[2] / "shared" / "ghost-eval"


def ghost_eval_photos() -> dict[str, bytes]:
    """The photos of ``../shared/ghost-eval`` (not the retouchers' results), by name; none
    when the folder is not there."""
    if not GHOST_EVAL.is_dir():
        return {}
    return {
        path.stem: path.read_bytes()
        for path in sorted(GHOST_EVAL.glob("*.png"))
        if ".retouched" not in path.name
    }


def alternated(
    rounds: int, before: Callable[[], tuple[float, Any]], after: Callable[[], tuple[float, Any]]
) -> tuple[float, float, Any, Any]:
    """Each way ``rounds`` times, in turn: the medians of the milliseconds each returns (to
    0.01), and each way's last result."""
    times: tuple[list[float], list[float]] = ([], [])
    results: list[Any] = [None, None]
    for _ in range(rounds):
        for i, way in enumerate((before, after)):
            ms, results[i] = way()
            times[i].append(ms)
    return (
        round(statistics.median(times[0]), 2),
        round(statistics.median(times[1]), 2),
        results[0],
        results[1],
    )


def report_alternated(
    bench: str, rows: dict[str, dict[str, Any]], keys: tuple[str, str, str], args: Any
) -> int:
    """The end of a benchmark that alternated two ways over some inputs (``keys``: the
    columns of the two medians, then of whether both ways gave the same result): each
    input's row on stderr, everything as JSON to ``args.out`` when given, and one
    ``SUMMARY`` line with the first input's two medians, the median ratio of the second to
    the first over all inputs and whether every input gave the same result. Exit status 1
    where one did not."""
    before, after, same = keys
    rounds, out = args.rounds, args.out
    ratios = [r[after] / r[before] for r in rows.values()]
    first = next(iter(rows.values()))
    if out:
        out.write_text(
            json.dumps({"rounds": rounds, "inputs": rows, "machine": machine()}, indent=2)
        )
    all_same = all(r[same] for r in rows.values())
    print(
        f"SUMMARY {bench}: benchmark_input {before.removesuffix('_ms')}={first[before]:.1f}ms "
        f"{after.removesuffix('_ms')}={first[after]:.1f}ms "
        f"ratio={first[after] / first[before]:.2f} inputs={len(rows)} "
        f"median_ratio={statistics.median(ratios):.2f} all_{same}={all_same}"
    )
    return 0 if all_same else 1
