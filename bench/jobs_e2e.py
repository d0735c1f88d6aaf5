"""End-to-end cost of a CPU job, and what the submit endpoint costs beside a bare endpoint.

Starts its own services on loopback (see ``_harness``): a database ``hiddenmodel_bench`` built
by the real migrations, Redis database 10 (flushed), moto's S3 server, the API under uvicorn
with one worker, one dispatcher and one Celery worker on the ``cpu`` queue. The benchmark's
organization is on the ``pro`` plan with every limit at its ceiling, so quota and rate-limit
checks run on every request but refuse nothing. Then it measures:

(a) latency of one ``resize`` job, a 1024x1024 photographic PNG to fit 512x512: submit →
    succeeded → output downloaded from its presigned URL, 50 jobs one after another. Main
    number: ``Prefer: wait=30`` (one request, no polling); also by polling
    ``GET /v1/jobs/{id}`` every ``--poll-ms``. Median and p95, with a per-job breakdown from
    the job's own timestamps (created, started, finished).
(b) 100 such jobs from 8 concurrent clients (threads, ``Prefer: wait``): jobs/s from the
    first submit to the last download.
(c) ``POST /v1/jobs`` throughput at 32 connections with a small PNG, and in the same run a
    bare FastAPI endpoint (one uvicorn worker) doing the same storage work: an INSERT into a
    scratch table, a Redis LPUSH and an S3 put_object of the uploaded bytes. The dispatcher
    and worker are stopped first, so both servers have the same two cores to themselves.
    Load from ``wrk`` (one thread, Lua multipart body) when installed, otherwise an asyncio
    httpx client. Rounds alternate submit/bare; the ratio is median submit / median bare.

Besides wall-clock numbers it reports the CPU time each process (API, worker, dispatcher, moto,
bare server) spends per job or request, read from /proc: on a small shared machine these
move far less from run to run than latencies and rates do.

Prints one summary line at the end; ``--out`` writes everything as JSON.

    .venv/bin/python bench/jobs_e2e.py --out var/bench/jobs_e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _harness as h  # the bench directory is sys.path[0] when run as a script
import httpx
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse

TERMINAL = {"succeeded", "failed", "canceled", "expired"}
RESIZE = {"width": 512, "height": 512, "mode": "fit"}
BOUNDARY = "benchboundary7MA4YWxkTrZu0gW"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation between closest ranks (q in 0..100)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2) if values else float("nan"),
        "p95": round(pct(values, 95), 2),
        "min": round(min(values), 2) if values else float("nan"),
        "max": round(max(values), 2) if values else float("nan"),
    }


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


# --- (a) and (b): jobs end to end -----------------------------------------------------------


def run_job(
    client: httpx.Client,
    headers: dict[str, str],
    image: bytes,
    *,
    wait: bool,
    poll_s: float = 0.01,
    operation: str = "resize",
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One job from submit to downloaded output; times in ms, plus the job's timestamps."""
    form = {"operation": operation, "params": json.dumps(RESIZE if params is None else params)}
    files = {"image": ("photo.png", image, "image/png")}
    extra = {"Prefer": "wait=30"} if wait else {}
    wall0 = time.time()
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", data=form, files=files, headers={**headers, **extra})
    t_submit = time.perf_counter()
    if r.status_code not in (200, 202):
        raise RuntimeError(f"submit answered {r.status_code}: {r.text[:500]}")
    job = r.json()
    polls = 0
    while job["status"] not in TERMINAL:
        if wait:
            raise RuntimeError(f"Prefer: wait returned a live job: {job['status']}")
        time.sleep(poll_s)
        polls += 1
        r = client.get(f"/v1/jobs/{job['id']}", headers=headers)
        r.raise_for_status()
        job = r.json()
    t_done = time.perf_counter()
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['status']}: {job.get('error')}")
    output = next(o for o in job["outputs"] if o["name"] == "output")
    out = client.get(output["url"])
    out.raise_for_status()
    t_dl = time.perf_counter()
    body = out.content
    if not body.startswith(b"\x89PNG") or len(body) != output["bytes"]:
        raise RuntimeError("the downloaded output is not the job's PNG")
    timings = job["timings"]
    created, started, finished = (
        _ts(timings["created_at"]),
        _ts(timings["started_at"]),
        _ts(timings["finished_at"]),
    )
    ms = 1000.0
    row: dict[str, Any] = {
        "id": job["id"],
        "total_ms": (t_dl - t0) * ms,
        "submit_ms": (t_submit - t0) * ms,
        "to_succeeded_ms": (t_done - t0) * ms,
        "download_ms": (t_dl - t_done) * ms,
        "polls": polls,
        "output_bytes": len(body),
        "compute_s": timings.get("compute_seconds"),
    }
    if created and started and finished:
        row["t0_to_created_ms"] = (created - wall0) * ms
        row["created_to_started_ms"] = (started - created) * ms
        row["started_to_finished_ms"] = (finished - started) * ms
        row["finished_to_seen_ms"] = (wall0 + (t_done - t0) - finished) * ms
    return row


def add_db_stamps(env: h.BenchEnv, rows: list[dict[str, Any]]) -> None:
    """Split created → started at ``dispatched_at`` (when the dispatcher claimed the job), which
    the API does not expose: read as the superuser."""
    found = h.superuser_rows(
        env,
        "SELECT id::text, extract(epoch FROM created_at), extract(epoch FROM dispatched_at), "
        "extract(epoch FROM started_at) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=[r["id"] for r in rows],
    )
    stamps = {row[0]: row[1:] for row in found}
    for r in rows:
        created, dispatched, started = stamps.get(r["id"], (None, None, None))
        if created and dispatched and started:
            r["created_to_dispatched_ms"] = (float(dispatched) - float(created)) * 1000
            r["dispatched_to_started_ms"] = (float(started) - float(dispatched)) * 1000


class CpuMeter:
    """CPU time the stack's processes spend over a phase, per job: robust to a busy machine,
    where wall-clock numbers swing with whatever else runs."""

    def __init__(self, stack: h.Stack) -> None:
        procs = {"api": stack.api, "dispatcher": stack.dispatcher, "moto": stack.s3}
        procs.update({f"worker{i + 1}": w for i, w in enumerate(stack.workers)})
        self.pids = {name: p.pid for name, p in procs.items() if p is not None}
        self.start = {name: h.cpu_seconds(pid) for name, pid in self.pids.items()}
        self.wall0 = time.perf_counter()

    def per_job(self, jobs: int) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            used = h.cpu_seconds(pid) - self.start[name]
            out[f"{name}_cpu_ms_per_job"] = round(1000 * used / max(1, jobs), 2)
            out[f"{name}_cpu_util"] = round(used / wall, 3)
        return out


def sequential(
    stack: h.Stack, image: bytes, n: int, *, wait: bool, poll_s: float
) -> list[dict[str, Any]]:
    assert stack.tenant is not None
    rows = []
    with httpx.Client(base_url=stack.api_url, timeout=60) as client:
        for _ in range(n):
            rows.append(run_job(client, stack.tenant.headers, image, wait=wait, poll_s=poll_s))
    return rows


def concurrent(stack: h.Stack, image: bytes, n: int, clients: int) -> dict[str, Any]:
    """``clients`` threads take jobs from a shared count until ``n`` are done."""
    assert stack.tenant is not None
    headers = stack.tenant.headers
    lock = threading.Lock()
    remaining = [n]
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    ends: list[float] = []
    start = threading.Barrier(clients + 1)

    def client_loop() -> None:
        with httpx.Client(base_url=stack.api_url, timeout=120) as client:
            start.wait()
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                try:
                    row = run_job(client, headers, image, wait=True)
                except Exception as exc:
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    rows.append(row)
                    ends.append(time.perf_counter())

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = (max(ends) if ends else time.perf_counter()) - t0
    lat = [r["total_ms"] for r in rows]
    return {
        "jobs": n,
        "clients": clients,
        "succeeded": len(rows),
        "errors": errors[:5],
        "error_count": len(errors),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(len(rows) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": summary(lat),
        "breakdown_median_ms": breakdown(rows),
    }


def breakdown(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = [
        "submit_ms",
        "t0_to_created_ms",
        "created_to_started_ms",
        "created_to_dispatched_ms",
        "dispatched_to_started_ms",
        "started_to_finished_ms",
        "finished_to_seen_ms",
        "download_ms",
        "total_ms",
    ]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = round(statistics.median(values), 2)
    computes = [r["compute_s"] * 1000 for r in rows if r.get("compute_s")]
    if computes:
        out["worker_compute_ms"] = round(statistics.median(computes), 2)
    return out


# --- (c): submit throughput against a bare endpoint -----------------------------------------


BARE_TABLE = "bench_bare_jobs"


def make_bare_app() -> Any:
    """The same storage work as a submit, and nothing else: multipart parse, one INSERT (own
    transaction), one Redis LPUSH, one S3 put_object of the uploaded bytes (in a thread)."""
    import boto3
    import redis.asyncio as aioredis
    from botocore.config import Config
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from starlette.concurrency import run_in_threadpool

    engine = create_async_engine(os.environ["BENCH_BARE_DB_URL"], pool_size=10, max_overflow=10)
    rds = aioredis.Redis.from_url(os.environ["BENCH_BARE_REDIS_URL"])
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["BENCH_BARE_S3_URL"],
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # moto accepts any credentials
        config=Config(max_pool_connections=32, signature_version="s3v4"),
    )
    bucket = os.environ["BENCH_BARE_BUCKET"]
    app = FastAPI()
    insert = text(
        f"INSERT INTO {BARE_TABLE} (id, operation, params, bytes) "
        "VALUES (:id, :operation, CAST(:params AS jsonb), :bytes)"
    )

    @app.post("/bare")
    async def bare(
        image: UploadFile = File(...),
        operation: str = Form(...),
        params: str = Form("{}"),
    ) -> JSONResponse:
        data = await image.read()
        job_id = uuid.uuid4()
        key = f"bare/{job_id}/image.png"
        await run_in_threadpool(
            s3.put_object, Bucket=bucket, Key=key, Body=data, ContentType="image/png"
        )
        async with engine.begin() as conn:
            await conn.execute(
                insert,
                {"id": job_id, "operation": operation, "params": params, "bytes": len(data)},
            )
        await rds.lpush("bench:bare", str(job_id))
        return JSONResponse({"id": str(job_id), "status": "queued"}, status_code=202)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve_bare(port: int) -> None:
    import uvicorn

    uvicorn.run(make_bare_app(), host="127.0.0.1", port=port, workers=1, log_level="warning")


def start_bare(env: h.BenchEnv) -> tuple[h.Child, int]:
    import boto3

    h.superuser_sql(
        env,
        f"DROP TABLE IF EXISTS {BARE_TABLE}",
        f"CREATE TABLE {BARE_TABLE} (id uuid PRIMARY KEY, operation varchar(64) NOT NULL, "
        "params jsonb NOT NULL, bytes integer NOT NULL, "
        "created_at timestamptz NOT NULL DEFAULT now())",
    )
    bucket = "hm-bench-bare"
    boto3.client(
        "s3",
        endpoint_url=env.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    ).create_bucket(Bucket=bucket)
    port = h.free_port()
    proc = h.spawn(
        "bare",
        [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)],
        env={
            "BENCH_BARE_DB_URL": env.superuser_db_url,
            "BENCH_BARE_REDIS_URL": env.redis_url,
            "BENCH_BARE_S3_URL": env.s3_endpoint,
            "BENCH_BARE_BUCKET": bucket,
        },
    )
    h.wait_http(f"http://127.0.0.1:{port}/healthz", child=proc)
    return proc, port


def multipart_body(image: bytes) -> bytes:
    parts = [
        (b'Content-Disposition: form-data; name="operation"\r\n\r\n', b"resize"),
        (
            b'Content-Disposition: form-data; name="params"\r\n\r\n',
            json.dumps({"width": 32, "height": 32, "mode": "fit"}).encode(),
        ),
        (
            b'Content-Disposition: form-data; name="image"; filename="small.png"\r\n'
            b"Content-Type: image/png\r\n\r\n",
            image,
        ),
    ]
    out = b""
    for head, payload in parts:
        out += b"--" + BOUNDARY.encode() + b"\r\n" + head + payload + b"\r\n"
    return out + b"--" + BOUNDARY.encode() + b"--\r\n"


WRK_SCRIPT = """
local f = assert(io.open("%(body)s", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%(boundary)s"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "status_errors": %%d, ' ..
    '"socket_errors": %%d, "timeouts": %%d, "p50_us": %%d, "p90_us": %%d, ' ..
    '"p99_us": %%d, "max_us": %%d, "mean_us": %%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class LoadGen:
    """32 connections of POSTs of one multipart body, for a duration."""

    def __init__(self, kind: str, body: bytes, workdir: Path) -> None:
        self.kind = kind
        self.body = body
        self.workdir = workdir
        self.body_path = workdir / "body.bin"
        self.body_path.write_bytes(body)

    def run(
        self,
        url: str,
        headers: dict[str, str],
        connections: int,
        duration: float,
        cpu_pids: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One load run; ``cpu_pids`` name processes whose CPU time per request is reported."""
        before = {name: h.cpu_seconds(pid) for name, pid in (cpu_pids or {}).items()}
        if self.kind == "wrk":
            res = self._wrk(url, headers, connections, duration)
        else:
            res = asyncio.run(self._httpx(url, headers, connections, duration))
        for name, pid in (cpu_pids or {}).items():
            used = h.cpu_seconds(pid) - before[name]
            res[f"{name}_cpu_ms_per_req"] = round(1000 * used / max(1, res["requests"]), 3)
            res[f"{name}_cpu_util"] = round(used / res["seconds"], 3)
        return res

    def _wrk(
        self, url: str, headers: dict[str, str], connections: int, duration: float
    ) -> dict[str, Any]:
        auth = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
        script = self.workdir / f"post-{uuid.uuid4().hex[:6]}.lua"
        script.write_text(WRK_SCRIPT % {"body": self.body_path, "boundary": BOUNDARY, "auth": auth})
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
        raw = json.loads(line[len("WRKJSON ") :])
        seconds = raw["duration_us"] / 1e6
        ok = raw["requests"] - raw["status_errors"]
        return {
            "loadgen": "wrk -t1",
            "requests": raw["requests"],
            "non_2xx": raw["status_errors"],
            "socket_errors": raw["socket_errors"],
            "timeouts": raw["timeouts"],
            "seconds": round(seconds, 3),
            "req_per_s": round(ok / seconds, 1),
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
        }

    async def _httpx(
        self, url: str, headers: dict[str, str], connections: int, duration: float
    ) -> dict[str, Any]:
        hdrs = {**headers, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        latencies: list[float] = []
        failures = 0
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            deadline = time.perf_counter() + duration

            async def worker() -> None:
                nonlocal failures
                while time.perf_counter() < deadline:
                    t = time.perf_counter()
                    r = await client.post(url, content=self.body, headers=hdrs)
                    if r.status_code >= 300:
                        failures += 1
                    else:
                        latencies.append((time.perf_counter() - t) * 1000)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            seconds = time.perf_counter() - t0
        return {
            "loadgen": "httpx asyncio",
            "requests": len(latencies) + failures,
            "non_2xx": failures,
            "seconds": round(seconds, 3),
            "req_per_s": round(len(latencies) / seconds, 1),
            "p50_ms": round(pct(latencies, 50), 2),
            "p90_ms": round(pct(latencies, 90), 2),
            "p99_ms": round(pct(latencies, 99), 2),
            "max_ms": round(max(latencies), 2) if latencies else float("nan"),
        }


def throughput(
    stack: h.Stack, args: argparse.Namespace, small: bytes, workdir: Path
) -> dict[str, Any]:
    assert stack.tenant is not None
    log("(c) stopping the dispatcher and worker; starting the bare endpoint")
    stack.stop_workers_and_dispatcher()
    bare_proc, bare_port = start_bare(stack.env)
    kind = args.loadgen
    if kind == "auto":
        kind = "wrk" if shutil.which("wrk") else "httpx"
    gen = LoadGen(kind, multipart_body(small), workdir)
    assert stack.api is not None and stack.s3 is not None
    targets = {
        "submit": (f"{stack.api_url}/v1/jobs", stack.tenant.headers, stack.api.pid),
        "bare": (f"http://127.0.0.1:{bare_port}/bare", {}, bare_proc.pid),
    }
    for name, (url, headers, _) in targets.items():
        warm = gen.run(url, headers, args.connections, args.warmup_s)
        if warm["non_2xx"] or warm.get("socket_errors"):
            raise RuntimeError(f"{name} warm-up had errors: {warm}")
        log(f"(c) warm-up {name}: {warm['req_per_s']} req/s")
    rounds: dict[str, list[dict[str, Any]]] = {"submit": [], "bare": []}
    for i in range(args.rounds):
        order = ("submit", "bare") if i % 2 == 0 else ("bare", "submit")
        for name in order:
            url, headers, pid = targets[name]
            pids = {"server": pid, "moto": stack.s3.pid}
            res = gen.run(url, headers, args.connections, args.duration_s, pids)
            rounds[name].append(res)
            log(
                f"(c) round {i + 1} {name}: {res['req_per_s']} req/s, p99 {res['p99_ms']:.1f} ms,"
                f" {res['requests']} requests, {res['non_2xx']} non-2xx,"
                f" server CPU {res['server_cpu_ms_per_req']:.2f} ms/req"
                f" ({100 * res['server_cpu_util']:.0f}% of a core)"
            )
    h.stop(bare_proc)
    jobs_queued = h.superuser_rows(stack.env, "SELECT count(*) FROM jobs")[0][0]
    bare_rows = h.superuser_rows(stack.env, f"SELECT count(*) FROM {BARE_TABLE}")[0][0]

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rounds[name]), 2)

    submit_rps, bare_rps = med("submit", "req_per_s"), med("bare", "req_per_s")
    submit_cpu, bare_cpu = (
        med("submit", "server_cpu_ms_per_req"),
        med("bare", "server_cpu_ms_per_req"),
    )
    pair_ratios = [
        round(s["req_per_s"] / b["req_per_s"], 3)
        for s, b in zip(rounds["submit"], rounds["bare"], strict=True)
    ]
    return {
        "loadgen": kind,
        "connections": args.connections,
        "duration_s": args.duration_s,
        "small_png_bytes": len(small),
        "rounds": rounds,
        "submit_req_per_s": submit_rps,
        "submit_p99_ms": med("submit", "p99_ms"),
        "bare_req_per_s": bare_rps,
        "bare_p99_ms": med("bare", "p99_ms"),
        "ratio": round(submit_rps / bare_rps, 3) if bare_rps else float("nan"),
        "submit_server_cpu_ms_per_req": submit_cpu,
        "bare_server_cpu_ms_per_req": bare_cpu,
        "cpu_ratio": round(bare_cpu / submit_cpu, 3) if submit_cpu else float("nan"),
        "round_ratios": pair_ratios,
        "rows_after": {"jobs": jobs_queued, "bare": bare_rows},
    }


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="(a) sequential jobs per mode")
    parser.add_argument("--warmup-jobs", type=int, default=5)
    parser.add_argument("--poll-ms", type=float, default=10.0, help="(a) polling interval")
    parser.add_argument("--no-poll", action="store_true", help="(a) skip the polling mode")
    parser.add_argument("--conc-jobs", type=int, default=100, help="(b) jobs")
    parser.add_argument("--clients", type=int, default=8, help="(b) concurrent clients")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="Celery worker processes for the cpu queue (default: one per core)",
    )
    parser.add_argument("--connections", type=int, default=32, help="(c) connections")
    parser.add_argument("--duration-s", type=float, default=8.0, help="(c) seconds per round")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="(c) warm-up per endpoint")
    parser.add_argument("--rounds", type=int, default=2, help="(c) rounds per endpoint")
    parser.add_argument("--loadgen", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument("--skip", default="", help="comma list of phases to skip: a,b,c")
    parser.add_argument("--database", default="hiddenmodel_bench")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10")
    parser.add_argument("--out", type=Path, help="write the details as JSON here")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    h.install_cleanup()
    env = h.configure_env(database=args.database, redis_url=args.redis_url)
    result: dict[str, Any] = {
        "benchmark": "jobs_e2e",
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": h.machine(),
        "args": {k: str(v) for k, v in vars(args).items() if k != "serve_bare"},
    }
    big = h.photo_png(1024, 1024, seed=1)
    small = h.photo_png(64, 64, seed=2)
    result["inputs"] = {"photo_png_bytes": len(big), "small_png_bytes": len(small)}
    log(f"inputs: 1024x1024 PNG {len(big)} bytes, 64x64 PNG {len(small)} bytes")

    stack = h.start_stack(env, workers=args.workers, log=log)
    try:
        if "a" not in skip:
            log(f"(a) {args.warmup_jobs} warm-up jobs")
            sequential(stack, big, args.warmup_jobs, wait=True, poll_s=0)
            sequential(stack, big, 2, wait=False, poll_s=args.poll_ms / 1000)
            log(f"(a) {args.jobs} sequential jobs, Prefer: wait=30")
            meter = CpuMeter(stack)
            rows = sequential(stack, big, args.jobs, wait=True, poll_s=0)
            cpu = meter.per_job(len(rows))
            add_db_stamps(env, rows)
            result["a_wait"] = {
                "latency_ms": summary([r["total_ms"] for r in rows]),
                "breakdown_median_ms": breakdown(rows),
                "cpu": cpu,
                "jobs": rows,
            }
            log(f"(a) wait: {result['a_wait']['latency_ms']}")
            log(f"(a) wait: CPU per job {cpu}")
            if not args.no_poll:
                log(f"(a) {args.jobs} sequential jobs, polling every {args.poll_ms:g} ms")
                meter = CpuMeter(stack)
                rows = sequential(stack, big, args.jobs, wait=False, poll_s=args.poll_ms / 1000)
                cpu = meter.per_job(len(rows))
                add_db_stamps(env, rows)
                result["a_poll"] = {
                    "poll_ms": args.poll_ms,
                    "cpu": cpu,
                    "latency_ms": summary([r["total_ms"] for r in rows]),
                    "breakdown_median_ms": breakdown(rows),
                    "jobs": rows,
                }
                log(f"(a) poll: {result['a_poll']['latency_ms']}")
        if "b" not in skip:
            log(f"(b) {args.conc_jobs} jobs from {args.clients} clients")
            meter = CpuMeter(stack)
            result["b_concurrent"] = concurrent(stack, big, args.conc_jobs, args.clients)
            result["b_concurrent"]["cpu"] = meter.per_job(result["b_concurrent"]["succeeded"])
            log(f"(b) {result['b_concurrent']['jobs_per_s']} jobs/s")
            log(f"(b) CPU per job {result['b_concurrent']['cpu']}")
        if "c" not in skip:
            with tempfile.TemporaryDirectory(prefix="jobs_e2e-") as tmp:
                result["c_throughput"] = throughput(stack, args, small, Path(tmp))
    finally:
        stack_procs = [stack.api, stack.dispatcher, *stack.workers, stack.s3]
        for proc in stack_procs:
            if proc is not None:
                h.stop(proc)
        h.flush_redis(env)
    result["machine"]["loadavg_end"] = os.getloadavg()

    parts = []
    if "a_wait" in result:
        lat = result["a_wait"]["latency_ms"]
        parts.append(f"median={lat['median']:.0f}ms p95={lat['p95']:.0f}ms")
    if "a_poll" in result:
        lat = result["a_poll"]["latency_ms"]
        parts.append(f"poll_median={lat['median']:.0f}ms poll_p95={lat['p95']:.0f}ms")
    if "a_wait" in result:
        cpu = result["a_wait"]["cpu"]
        parts.append(
            f"worker_cpu={cpu.get('worker1_cpu_ms_per_job', float('nan')):.0f}ms/job "
            f"api_cpu={cpu['api_cpu_ms_per_job']:.0f}ms/job"
        )
    if "b_concurrent" in result:
        parts.append(f"conc{args.clients}={result['b_concurrent']['jobs_per_s']:.1f}jobs/s")
    if "c_throughput" in result:
        c = result["c_throughput"]
        parts.append(
            f"submit={c['submit_req_per_s']:.0f}req/s submit_p99={c['submit_p99_ms']:.0f}ms "
            f"bare={c['bare_req_per_s']:.0f}req/s bare_p99={c['bare_p99_ms']:.0f}ms "
            f"ratio={c['ratio']:.2f} submit_cpu={c['submit_server_cpu_ms_per_req']:.1f}ms/req "
            f"bare_cpu={c['bare_server_cpu_ms_per_req']:.1f}ms/req"
        )
    line = "jobs_e2e: " + " ".join(parts)
    result["summary"] = line
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("jobs_e2e: interrupted", file=sys.stderr)
        sys.exit(130)
