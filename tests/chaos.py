"""A private platform to break, and the operator's worst day played against it.

:class:`Stack` starts, as child processes of the caller: a PostgreSQL cluster of its own
(``initdb`` into a temporary folder, so it can be restarted with ``pg_ctl restart -m
immediate`` without touching the machine's server), a Redis of its own on a free port
(so ``FLUSHALL`` flushes nothing else), moto's S3, the API, the dispatcher and two workers.

:func:`run` submits jobs as fast as the API takes them while workers are killed with SIGKILL,
Redis is flushed once and PostgreSQL restarted once, and measures, for every job a killed
worker was running or had received, the time from the kill to that job running again.

Used by ``tests/test_chaos.py`` (the assertions) and ``bench/recovery.py`` (the numbers in
docs/BENCHMARKS.md). Nothing here reads the caller's ``HM_*`` settings: every child gets an
environment built here.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import redis
from PIL import Image

from hiddenmodel.processes import free_port
from tests.services import LOG_DIR, REPO, Process, wait_port

TERMINAL = ("succeeded", "failed", "canceled", "expired")
PASSWORD = "Correct-horse-42"
BUCKET = "hm-chaos"
DATABASE = "hm_chaos"


def postgres_bin() -> Path:
    """The newest server binaries under /usr/lib/postgresql (or ``HM_CHAOS_PG_BIN``)."""
    configured = os.environ.get("HM_CHAOS_PG_BIN")
    if configured:
        return Path(configured)
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise FileNotFoundError("no initdb under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """A throwaway cluster on loopback; as root, it runs as the ``postgres`` user."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.bin = postgres_bin()
        self.as_root = os.geteuid() == 0

    def _run(self, *argv: str, timeout: float = 120) -> None:
        command = list(argv)
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed:\n{result.stdout}{result.stderr}")

    @property
    def options(self) -> str:
        # No fsync: an immediate restart kills the processes, not the machine, so what was
        # written stays in the page cache. Commits stay synchronous: one acknowledged must
        # survive the restart, as in production.
        return (
            f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200"
        )

    def start(self) -> None:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-instructions",
        )
        self._ctl("start")

    def _ctl(self, action: str, *extra: str) -> None:
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "postgres.log"),
            "-o",
            self.options,
            "-w",
            "-t",
            "60",
            *extra,
            action,
        )

    def restart_immediately(self) -> None:
        """What a crash and an automatic restart look like to every client."""
        self._ctl("restart", "-m", "immediate")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._ctl("stop", "-m", "immediate")

    def url(self, user: str, database: str) -> str:
        auth = user if user == "postgres" else f"{user}:{user}"
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = DATABASE) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            dbname=database,
            autocommit=True,
            connect_timeout=3,
        )


@dataclass
class Org:
    id: str
    headers: dict[str, str]


class Stack:
    """The private platform. ``settings`` are extra ``HM_*`` values for every child."""

    def __init__(self, settings: dict[str, str] | None = None, workers: int = 2) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="hm-chaos-"))
        self.pg = PrivatePostgres(self.root)
        self.redis_port = free_port()
        self.s3_port = free_port()
        self.api_port = free_port()
        self.worker_count = workers
        self.extra = settings or {}
        self.processes: list[Process] = []
        self.workers: list[Process] = []
        self.dispatcher: Process | None = None
        self._started = 0
        self.orgs: list[Org] = []

    # --- lifecycle -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HM_")}
        env.update(
            {
                "HM_ENVIRONMENT": "test",
                "HM_DATABASE_URL": self.pg.url("hm_app", DATABASE),
                "HM_DATABASE_OWNER_URL": self.pg.url("hm_owner", DATABASE),
                "HM_DATABASE_OPS_URL": self.pg.url("hm_ops", DATABASE),
                "HM_DATABASE_ADMIN_URL": self.pg.url("postgres", "postgres"),
                "HM_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
                "HM_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
                "HM_S3_BUCKET": BUCKET,
                "HM_SECRET_KEY": "chaos-secret-key-0123456789abcdef0123456789abcdef",
                "HM_PASSWORD_HASH_TIME_COST": "1",
                "HM_PASSWORD_HASH_MEMORY_KIB": "64",
                "HM_DATA_DIR": str(self.root / "var"),
                "OMP_NUM_THREADS": "1",
                # Leases as in production: only worker liveness brings a job back in seconds.
                "HM_REDISPATCH_GRACE_SECONDS": "3",
                "HM_RECONCILE_INTERVAL_SECONDS": "1",
                "HM_DISPATCH_POLL_SECONDS": "0.2",
                **self.extra,
            }
        )
        return env

    def _process(self, name: str, *args: str) -> Process:
        (LOG_DIR / f"{name}.log").unlink(missing_ok=True)  # "ready." of an earlier run
        process = Process(
            name,
            [sys.executable, "-m", "hiddenmodel.cli", "--log-level", "info", *args],
            self.env(),
            inherit_env=False,
        )
        self.processes.append(process)
        return process

    def start(self) -> None:
        try:
            self.pg.start()
            self.processes.append(
                Process(
                    "chaos-redis",
                    [
                        "redis-server",
                        "--port",
                        str(self.redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ],
                )
            )
            self.processes.append(
                Process(
                    "chaos-s3",
                    [
                        sys.executable,
                        "-m",
                        "moto.server",
                        "-H",
                        "127.0.0.1",
                        "-p",
                        str(self.s3_port),
                    ],
                )
            )
            wait_port(self.redis_port)
            wait_port(self.s3_port)
            self.s3().create_bucket(Bucket=BUCKET)
            subprocess.run(
                [sys.executable, "-m", "hiddenmodel.cli", "migrate"],
                env=self.env(),
                cwd=REPO,
                check=True,
                capture_output=True,
                timeout=300,
            )
            with self.pg.connect() as conn:
                # Limits are not what this is about: the default plan's are lifted.
                conn.execute(
                    "UPDATE plans SET monthly_gpu_seconds = NULL, monthly_images = NULL, "
                    "max_running_jobs = NULL, max_queued_jobs = NULL, storage_bytes = NULL, "
                    "requests_per_minute = NULL, org_requests_per_minute = NULL WHERE is_default"
                )
            api = self._process("chaos-api", "api", "--port", str(self.api_port))
            self.dispatcher = self._process("chaos-dispatcher", "dispatcher")
            for _ in range(self.worker_count):
                self.start_worker()
            wait_port(self.api_port, timeout=60)
            assert api.alive(), api.log()[-3000:]
            deadline = time.monotonic() + 90
            while not all(self.ready(w) for w in self.workers):
                if time.monotonic() > deadline:
                    raise TimeoutError("workers not ready")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.alive():
                process.kill()
        try:
            self.pg.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def start_worker(self) -> Process:
        """A new worker; does not wait for it (see :meth:`ready`)."""
        self._started += 1
        worker = self._process(
            f"chaos-worker-{self._started}",
            "worker",
            "--queues",
            "cpu,webhooks,maintenance",
            "--hostname",
            f"chaos-worker-{self._started}@%h",
        )
        self.workers.append(worker)
        return worker

    @staticmethod
    def ready(worker: Process) -> bool:
        return worker.alive() and "ready." in worker.log()

    # --- clients ---------------------------------------------------------------------------

    def s3(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{self.s3_port}",
            aws_access_key_id="hiddenmodel",
            aws_secret_access_key="hiddenmodel",
            region_name="us-east-1",
        )

    def redis(self) -> redis.Redis:
        return redis.Redis(port=self.redis_port, socket_timeout=5)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def provision(self, count: int) -> list[Org]:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            for _ in range(count):
                email = f"chaos{uuid.uuid4().hex[:10]}@example.com"
                r = client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
                assert r.status_code == 201, r.text
                r = client.post("/v1/auth/login", data={"username": email, "password": PASSWORD})
                token = r.json()["access_token"]
                owner = {"Authorization": f"Bearer {token}"}
                slug = f"org{uuid.uuid4().hex[:10]}"
                r = client.post("/v1/orgs", json={"slug": slug, "name": slug}, headers=owner)
                assert r.status_code == 201, r.text
                org_id = r.json()["id"]
                r = client.post(
                    f"/v1/orgs/{org_id}/api-keys",
                    json={"name": "chaos", "scopes": ["jobs:read", "jobs:write"]},
                    headers=owner,
                )
                assert r.status_code == 201, r.text
                self.orgs.append(Org(org_id, {"Authorization": f"Bearer {r.json()['key']}"}))
        return self.orgs


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Victim:
    """A job a killed worker was running, or had received without claiming it yet."""

    job_id: str
    attempts: int
    killed_at: float
    worker: str
    recovered_after: float | None = None
    ended_without_retry: str | None = None


@dataclass
class Result:
    jobs: list[str] = field(default_factory=list)
    submit_answers: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    victims: list[Victim] = field(default_factory=list)
    kills: int = 0
    flushed_at: float | None = None
    restarted_at: float | None = None
    last_fault: float = 0.0
    all_final_at: float | None = None
    started: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    # Jobs not final when the wait ended: (id, status, attempts, dispatch_count, dispatched).
    stuck: list[tuple[Any, ...]] = field(default_factory=list)

    @property
    def recoveries(self) -> list[float]:
        return sorted(v.recovered_after for v in self.victims if v.recovered_after is not None)

    def percentile(self, q: float) -> float:
        """Nearest rank."""
        values = self.recoveries
        if not values:
            return float("nan")
        return values[max(0, math.ceil(q / 100 * len(values)) - 1)]

    def summary(self) -> dict[str, Any]:
        values = self.recoveries
        return {
            "jobs": len(self.jobs),
            "statuses": dict(self.statuses),
            "submit_answers": {str(k): v for k, v in sorted(self.submit_answers.items())},
            "kills": self.kills,
            "victims": len(self.victims),
            "recovered": len(values),
            "ended_without_retry": Counter(
                v.ended_without_retry for v in self.victims if v.ended_without_retry
            ),
            "recovery_p50_s": round(self.percentile(50), 2) if values else None,
            "recovery_p99_s": round(self.percentile(99), 2) if values else None,
            "recovery_max_s": round(values[-1], 2) if values else None,
            "final_after_last_fault_s": (
                round(self.all_final_at - self.last_fault, 2) if self.all_final_at else None
            ),
            "duration_s": round((self.all_final_at or time.time()) - self.started, 2),
            "stuck": [list(map(str, row)) for row in self.stuck],
        }


def small_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (seed % 256, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


async def _submit(
    client: httpx.AsyncClient, org: Org, n: int, result: Result, deadline: float
) -> None:
    """One job, retried with its Idempotency-Key while the platform answers 503."""
    key = f"chaos-{uuid.uuid4()}"
    form = {"operation": "resize", "params": json.dumps({"width": 48})}
    while True:
        try:
            r = await client.post(
                "/v1/jobs",
                data=form,
                files={"image": ("p.png", small_png(n), "image/png")},
                headers={**org.headers, "Idempotency-Key": key},
            )
        except httpx.TransportError as exc:
            result.server_errors.append(f"transport: {exc!r}")
            await asyncio.sleep(0.2)
            continue
        result.submit_answers[r.status_code] += 1
        if r.status_code in (200, 201, 202):
            result.jobs.append(r.json()["id"])
            return
        if r.status_code >= 500 and r.status_code != 503:
            result.server_errors.append(f"{r.status_code}: {r.text[:300]}")
        if r.status_code == 503:
            assert "retry-after" in r.headers, r.headers
        if time.monotonic() > deadline:
            raise AssertionError(f"job {n} never admitted: {r.status_code} {r.text[:300]}")
        # Sooner than Retry-After: the test has no time to lose, and retries are safe.
        await asyncio.sleep(0.2)


def _victims_of(stack: Stack, worker: Process, killed_at: float) -> list[Victim]:
    """What the killed worker held: its running jobs and the messages it had received."""
    node = worker.name + "@"
    held: dict[str, str] = {}
    try:
        client = stack.redis()
        keys = list(client.scan_iter(match="hm:receipt:*", count=1000))
        for key, raw in zip(keys, client.mget(keys) if keys else [], strict=True):
            if raw and json.loads(raw)["worker"].startswith(node):
                task = key.decode().removeprefix("hm:receipt:")
                held[task.rsplit(".", 1)[0]] = json.loads(raw)["worker"]
        with stack.pg.connect() as conn:
            rows = conn.execute(
                "SELECT id::text, status, attempts, worker FROM jobs "
                "WHERE (status = 'running' AND worker LIKE %s) OR id::text = ANY(%s)",
                (node + "%", list(held)),
            ).fetchall()
    except (psycopg.Error, redis.RedisError, OSError):
        return []  # the database is restarting: this kill is not measured
    victims = []
    for job_id, status, attempts, holder in rows:
        if status in ("running", "queued"):
            victims.append(Victim(job_id, attempts, killed_at, holder or held.get(job_id, "")))
    return victims


def _holding_a_job(stack: Stack, workers: list[Process]) -> Process | None:
    """The worker running a job now, so that each kill takes a job down with it."""
    try:
        with stack.pg.connect() as conn:
            rows = conn.execute("SELECT worker FROM jobs WHERE status = 'running'").fetchall()
    except (psycopg.Error, OSError):
        return None
    nodes = {str(r[0]).split("@", 1)[0] for r in rows if r[0]}
    return next((w for w in workers if w.name in nodes), None)


def _follow(stack: Stack, victims: list[Victim]) -> None:
    pending = {
        v.job_id: v for v in victims if v.recovered_after is None and not v.ended_without_retry
    }
    if not pending:
        return
    try:
        with stack.pg.connect() as conn:
            rows = conn.execute(
                "SELECT id::text, attempts, status, extract(epoch FROM started_at) FROM jobs "
                "WHERE id::text = ANY(%s)",
                (list(pending),),
            ).fetchall()
    except (psycopg.Error, OSError):
        return
    for job_id, attempts, status, started in rows:
        for victim in [v for v in victims if v.job_id == job_id and v.recovered_after is None]:
            if victim.ended_without_retry:
                continue
            if attempts > victim.attempts and started is not None:
                victim.recovered_after = float(started) - victim.killed_at
            elif status in TERMINAL:
                victim.ended_without_retry = status


def _final(stack: Stack, jobs: list[str]) -> Counter[str] | None:
    try:
        with stack.pg.connect() as conn:
            rows = conn.execute(
                "SELECT status, count(*) FROM jobs WHERE id::text = ANY(%s) GROUP BY status",
                (jobs,),
            ).fetchall()
    except (psycopg.Error, OSError):
        return None
    return Counter({status: n for status, n in rows})


async def run(
    stack: Stack,
    *,
    jobs: int = 200,
    kill_every: float = 1.0,
    faults_for: float = 30.0,
    settle_s: float = 30.0,
    concurrency: int = 8,
    min_recoveries: int = 3,
    faults_at_most: float = 90.0,
) -> Result:
    """Submit ``jobs`` across the stack's organizations as fast as the API takes them while a
    worker is killed every ``kill_every`` seconds (whenever the other one is up, so work goes
    on); Redis is flushed once a third of the jobs are in and PostgreSQL restarted once two
    thirds are. Faults go on for at least ``faults_for`` seconds and until every job is in;
    then wait at most ``settle_s`` after the last fault for every job to be final.

    A kill is measured only when the job it took down is seen running again, and a job can
    end between the choice of the worker and the kill; on a quick machine a run's kills can
    then measure fewer recoveries than the test needs. So the kills also go on until
    ``min_recoveries`` are measured, while jobs are left to kill workers under, for at most
    ``faults_at_most`` seconds in all."""
    result = Result(started=time.time())
    orgs = stack.orgs or stack.provision(2)
    submit_deadline = time.monotonic() + 120
    semaphore = asyncio.Semaphore(concurrency)

    async def one(n: int, client: httpx.AsyncClient) -> None:
        async with semaphore:
            await _submit(client, orgs[n % len(orgs)], n, result, submit_deadline)

    async def faults() -> None:
        loop = asyncio.get_running_loop()
        began = time.monotonic()
        next_kill = began + kill_every
        flushed = restarted = False
        jobs_left_checked = began

        def go_on() -> bool:
            nonlocal jobs_left_checked
            if (
                time.monotonic() - began < faults_for
                or len(result.jobs) < jobs
                or not (flushed and restarted)
            ):
                return True
            if len(result.recoveries) >= min_recoveries:
                return False
            if time.monotonic() - began > faults_at_most:
                return False
            if time.monotonic() - jobs_left_checked < 1.0:
                return True
            jobs_left_checked = time.monotonic()
            counts = _final(stack, result.jobs)
            return counts is None or sum(counts[s] for s in TERMINAL) < len(result.jobs)

        while go_on():
            now = time.monotonic()
            if not flushed and len(result.jobs) >= jobs / 3:
                stack.redis().flushall()
                result.flushed_at = result.last_fault = time.time()
                flushed = True
            if not restarted and len(result.jobs) >= 2 * jobs / 3:
                await loop.run_in_executor(None, stack.pg.restart_immediately)
                result.restarted_at = result.last_fault = time.time()
                restarted = True
            if now >= next_kill:
                next_kill = now + kill_every
                live = [w for w in stack.workers if w.alive()]
                victim = None
                if len(live) >= 2 and all(stack.ready(w) for w in live):
                    victim = await loop.run_in_executor(None, _holding_a_job, stack, live)
                if victim is None:
                    next_kill = now + 0.2  # look again soon
                else:
                    victim.kill()
                    killed_at = time.time()
                    result.kills += 1
                    result.last_fault = killed_at
                    stack.workers.remove(victim)
                    stack.start_worker()
                    result.victims += await loop.run_in_executor(
                        None, _victims_of, stack, victim, killed_at
                    )
            await loop.run_in_executor(None, _follow, stack, result.victims)
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
        fault_task = asyncio.create_task(faults())
        await asyncio.gather(*(one(n, client) for n in range(jobs)))
        await fault_task
    deadline = result.last_fault + settle_s
    while time.time() < deadline:
        _follow(stack, result.victims)
        counts = _final(stack, result.jobs)
        if counts is not None and sum(counts[s] for s in TERMINAL) == len(result.jobs):
            result.all_final_at = time.time()
            result.statuses = counts
            break
        await asyncio.sleep(0.2)
    else:
        result.statuses = _final(stack, result.jobs) or Counter()
        with stack.pg.connect() as conn:
            result.stuck = conn.execute(
                "SELECT id, status, attempts, dispatch_count, dispatched_at, worker FROM jobs "
                "WHERE status IN ('queued', 'running')"
            ).fetchall()
    for _ in range(50):  # victims still pending once all are final: a last look
        _follow(stack, result.victims)
        if all(v.recovered_after is not None or v.ended_without_retry for v in result.victims):
            break
        await asyncio.sleep(0.1)
    return result


def stop_signal_safe(stack: Stack) -> None:
    """Stop the stack on SIGTERM too (benchmarks run as scripts)."""

    def handler(signum: int, frame: Any) -> None:
        stack.stop()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
