"""The per-job overhead benchmark against the platform as a user starts it.

One job, the one a single-process image server is compared on: a 1024x1024 photographic RGB
PNG of about 2 MB resized to fit 512x512, submitted without ``Prefer: wait``, the job polled
every 20 ms, the output downloaded through the URL the job gives. Run

* sequentially (one client, ``--sequential`` jobs) for the end-to-end median, and
* with ``--clients`` concurrent clients (``--concurrent`` jobs in all) for jobs per second,

each after a few untimed warm-up jobs, with a per-job breakdown (submit, queue wait, run,
completion seen, download) and the CPU time of every process of the platform per job:
``hiddenmodel up``'s children (each with its descendants) and, when ``up`` uses the machine's
PostgreSQL, that server's backends for the platform's database.

By default it starts ``hiddenmodel up`` itself, with its defaults, in a fresh data folder, on a
free port, and stops it with Ctrl-C as a user would. ``--base`` and ``--key`` measure a
platform that is already running instead (then only client-side figures and the PostgreSQL
backends, unless ``--pids name=pid,...`` names the processes to meter).

``--operation remove_background`` and ``--operation ghost_mannequin`` give the same figures for
the other operations (ghost_mannequin with ``up``'s tiny model on CPU: the GPU worker path,
batching window included).

    python bench/peer_job.py
    python bench/peer_job.py --operation ghost_mannequin --sequential 20 --concurrent 40

Before and after the platform's runs it times a yardstick of the machine's speed in this process
on one thread: the same image through Pillow's PNG decode, a Lanczos resize and a PNG encode at
zlib level 1 (``ref``, the mean of the two medians). It is not a model of the peer; the speed of
a shared machine drifts by 2x within an hour, and runs taken at different times are compared by
their ratio to ``ref`` as well as by their raw figures.

It prints one ``SUMMARY peer_job:`` line; ``--out`` writes everything as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _harness as h
import httpx
import jobs_e2e

from hiddenmodel.processes import free_port

PARAMS: dict[str, dict[str, Any]] = {
    "resize": {"width": 512, "height": 512, "mode": "fit"},
    "remove_background": {},
    "ghost_mannequin": {},
}
KEY_LINE = re.compile(r"^\s*API key:\s+(\S+)\s*$")
PROCESS_LINE = re.compile(r"^\s+(\S+)\s+pid (\d+)\s")
START_TIMEOUT_S = 180


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the platform -----------------------------------------------------------------------------


class Up:
    """``hiddenmodel up`` as a user runs it, read as it prints."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.key: str | None = None
        self.ready = threading.Event()
        env = {**os.environ, "HM_DATA_DIR": str(data_dir)}
        executable = Path(sys.executable).with_name("hiddenmodel")
        self.process = subprocess.Popen(
            [str(executable), "up", "--port", str(self.port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.key is None and (match := KEY_LINE.search(line)):
                self.key = match.group(1)
                self.ready.set()
        self.ready.set()

    def wait(self) -> str:
        self.ready.wait(START_TIMEOUT_S)
        if self.key is None:
            raise RuntimeError("up printed no API key:\n" + "\n".join(self.lines[-40:]))
        return self.key

    def processes(self) -> dict[str, int]:
        found = (PROCESS_LINE.match(line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- CPU per process --------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its living descendants."""
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += h.cpu_seconds(p)
        except (OSError, IndexError):
            continue
        todo += _children(p)
    return total


def _backends(database: str, exclude: set[int]) -> dict[int, float]:
    """PostgreSQL backends serving ``database`` (process title ``postgres: role db ...``)."""
    found: dict[int, float] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parts = title.split()
        # "postgres: [cluster: ]role database client state", e.g. Debian's "15/main:".
        if parts and parts[0] == "postgres:" and len(parts) > 2 and parts[1].endswith(":"):
            parts = [parts[0], *parts[2:]]
        if len(parts) >= 3 and parts[0] == "postgres:" and parts[2] == database:
            pid = int(proc.name)
            if pid not in exclude:
                try:
                    found[pid] = h.cpu_seconds(pid)
                except (OSError, IndexError):
                    continue
    return found


class CpuMeter:
    """CPU seconds per named process tree, plus PostgreSQL backends outside those trees."""

    def __init__(self, pids: dict[str, int], database: str | None) -> None:
        self.pids = pids
        self.database = database
        self.start = self._sample()

    def _sample(self) -> dict[str, Any]:
        trees = {name: _tree_cpu(pid) for name, pid in self.pids.items()}
        inside: set[int] = set()
        for pid in self.pids.values():
            todo = [pid]
            while todo:
                p = todo.pop()
                if p not in inside:
                    inside.add(p)
                    todo += _children(p)
        backends = _backends(self.database, inside) if self.database else {}
        return {"trees": trees, "backends": backends, "wall": time.perf_counter()}

    def per_job(self, jobs: int) -> dict[str, float]:
        end = self._sample()
        used = {name: end["trees"][name] - self.start["trees"].get(name, 0.0) for name in self.pids}
        if self.database:
            used["postgres"] = sum(
                cpu - self.start["backends"].get(pid, 0.0) for pid, cpu in end["backends"].items()
            )
        out = {f"{name}_cpu_ms": round(1000 * s / max(1, jobs), 2) for name, s in used.items()}
        out["total_cpu_ms"] = round(1000 * sum(used.values()) / max(1, jobs), 2)
        out["cpu_util"] = round(sum(used.values()) / (end["wall"] - self.start["wall"]), 3)
        return out


# --- jobs -------------------------------------------------------------------------------------


# The breakdown's names, from jobs_e2e.run_job's: queue wait is created → started on the
# server's clock, completion seen is finished → the poll that saw it.
BREAKDOWN = {
    "submit_ms": "submit_ms",
    "queue_wait_ms": "created_to_started_ms",
    "run_ms": "started_to_finished_ms",
    "completion_seen_ms": "finished_to_seen_ms",
    "download_ms": "download_ms",
    "total_ms": "total_ms",
    "polls": "polls",
}


def median_of(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        name: round(statistics.median(r[k] for r in rows if k in r), 2)
        for name, k in BREAKDOWN.items()
        if any(k in r for r in rows)
    }


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return round(values[0], 2) if values else float("nan")
    return round(statistics.quantiles(values, n=20, method="inclusive")[-1], 2)


def run_clients(
    base: str,
    headers: dict[str, str],
    image: bytes,
    operation: str,
    jobs: int,
    clients: int,
    poll_s: float,
) -> tuple[list[dict[str, Any]], float, list[str]]:
    """``clients`` threads share ``jobs`` jobs; returns the rows, elapsed seconds and errors."""
    lock = threading.Lock()
    remaining = [jobs]
    rows: list[dict[str, Any]] = []
    errors: list[str] = []
    start = threading.Barrier(clients + 1)

    def loop() -> None:
        with httpx.Client(base_url=base, timeout=120) as client:
            start.wait()
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                try:
                    row = jobs_e2e.run_job(
                        client,
                        headers,
                        image,
                        wait=False,
                        poll_s=poll_s,
                        operation=operation,
                        params=PARAMS[operation],
                    )
                except Exception as exc:  # counted and reported, the run goes on
                    with lock:
                        errors.append(repr(exc))
                    continue
                with lock:
                    rows.append(row)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return rows, time.perf_counter() - t0, errors


def lift_request_limits(base: str, key: str, env: dict[str, str]) -> dict[str, Any]:
    """What an operator does for a client that polls hard: the key's organization keeps its
    plan, with its request-rate limits raised far above what this run sends (the peer has
    none; a free plan's 120 requests a minute per key would make every figure a 429 count)
    and no monthly quota. In-flight and queue caps and every other rule stay as ``up`` set
    them."""
    me = httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    me.raise_for_status()
    org = me.json()["organization"]
    email, password = f"bench-operator-{os.getpid()}@example.com", f"Bench-{os.urandom(8).hex()}"
    hiddenmodel = str(Path(sys.executable).with_name("hiddenmodel"))
    subprocess.run(
        [hiddenmodel, "create-user", "--email", email, "--password", password, "--superuser"],
        env=env,
        check=True,
        capture_output=True,
    )
    login = httpx.post(
        f"{base}/v1/auth/login", data={"username": email, "password": password}, timeout=30
    )
    login.raise_for_status()
    operator = {"Authorization": f"Bearer {login.json()['access_token']}"}
    current = httpx.get(f"{base}/v1/admin/orgs/{org['id']}", headers=operator, timeout=30)
    current.raise_for_status()
    body = current.json()
    # An override replaces the plan's value even when null (no limit). The monthly quotas and
    # storage go too: up's database outlives each run, and a free plan's 200 images a month
    # would end the benchmark. The in-flight and queue caps stay as the plan sets them.
    overrides = {
        "requests_per_minute": 600_000,
        "org_requests_per_minute": 600_000,
        "monthly_images": None,
        "monthly_gpu_seconds": None,
        "storage_bytes": None,
    }
    r = httpx.put(
        f"{base}/v1/admin/orgs/{org['id']}/plan",
        json={"plan": body["plan"], "overrides": overrides},
        headers=operator,
        timeout=30,
    )
    r.raise_for_status()
    return {"organization": org["slug"], "plan": body["plan"], "overrides": overrides}


def reference_ms(image: bytes, runs: int = 15) -> float:
    """The yardstick's median wall time in milliseconds (see the module doc), the same
    whatever operation the run measures."""
    from PIL import Image

    size = (PARAMS["resize"]["width"], PARAMS["resize"]["height"])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        with Image.open(io.BytesIO(image)) as img:
            img.load()
            out = img.resize(size, Image.Resampling.LANCZOS)
        out.save(io.BytesIO(), format="PNG", compress_level=1)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 1)


def measure(
    base: str,
    key: str,
    pids: dict[str, int],
    database: str | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    image = h.photo_png(1024, 1024, seed=1)
    poll_s = args.poll_ms / 1000
    result: dict[str, Any] = {"input_bytes": len(image), "operation": args.operation}
    before = reference_ms(image)
    log(f"warm-up: {args.warmup} jobs")
    run_clients(base, headers, image, args.operation, args.warmup, 1, poll_s)

    log(f"sequential: {args.sequential} jobs")
    meter = CpuMeter(pids, database)
    rows, elapsed, errors = run_clients(
        base, headers, image, args.operation, args.sequential, 1, poll_s
    )
    result["sequential"] = {
        "jobs": len(rows),
        "errors": errors[:5],
        "error_count": len(errors),
        "median_ms": median_of(rows),
        "p95_total_ms": p95([r["total_ms"] for r in rows]),
        "cpu_per_job": meter.per_job(len(rows)),
    }

    log(f"{args.clients} clients: {args.concurrent} jobs")
    meter = CpuMeter(pids, database)
    rows, elapsed, errors = run_clients(
        base, headers, image, args.operation, args.concurrent, args.clients, poll_s
    )
    result["concurrent"] = {
        "clients": args.clients,
        "jobs": len(rows),
        "errors": errors[:5],
        "error_count": len(errors),
        "elapsed_s": round(elapsed, 2),
        "jobs_per_s": round(len(rows) / elapsed, 2) if elapsed else 0.0,
        "median_ms": median_of(rows),
        "cpu_per_job": meter.per_job(len(rows)),
    }
    after = reference_ms(image)
    result["reference_ms"] = {"before": before, "after": after, "mean": (before + after) / 2}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operation", choices=sorted(PARAMS), default="resize")
    parser.add_argument("--sequential", type=int, default=60)
    parser.add_argument("--concurrent", type=int, default=240)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--poll-ms", type=float, default=20.0)
    parser.add_argument("--base", help="a running platform's URL (default: start up)")
    parser.add_argument("--key", help="an API key of the running platform, with --base")
    parser.add_argument("--pids", default="", help="with --base: name=pid,... to meter")
    parser.add_argument("--database", default="hiddenmodel", help="PostgreSQL database name")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    up: Up | None = None
    data_dir = None
    try:
        if args.base:
            if not args.key:
                parser.error("--base needs --key")
            base, key = args.base.rstrip("/"), args.key
            pids = {
                name: int(pid) for name, pid in (p.split("=", 1) for p in args.pids.split(",") if p)
            }
        else:
            data_dir = tempfile.TemporaryDirectory(prefix="hm-peer-")
            log("starting hiddenmodel up")
            up = Up(Path(data_dir.name))
            key = up.wait()
            base = up.base
            pids = up.processes()
            log(f"up is ready: {base}, processes {pids}")
        env = {**os.environ, "HM_DATA_DIR": data_dir.name} if data_dir else dict(os.environ)
        lifted = lift_request_limits(base, key, env)
        log(f"request limits lifted: {lifted}")
        embedded = any("embedded (pgserver)" in line for line in (up.lines if up else []))
        result = measure(base, key, pids, None if embedded else args.database, args)
    finally:
        if up is not None:
            up.stop()
        if data_dir is not None:
            data_dir.cleanup()
    result["machine"] = h.machine()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    seq, conc = result["sequential"], result["concurrent"]
    print(
        f"SUMMARY peer_job: operation={args.operation} "
        f"seq_median={seq['median_ms']['total_ms']:.0f}ms "
        f"seq_p95={seq['p95_total_ms']:.0f}ms "
        f"conc{conc['clients']}={conc['jobs_per_s']:.1f}jobs/s "
        f"conc_median={conc['median_ms'].get('total_ms', float('nan')):.0f}ms "
        f"cpu_seq={seq['cpu_per_job']['total_cpu_ms']:.0f}ms/job "
        f"cpu_conc={conc['cpu_per_job']['total_cpu_ms']:.0f}ms/job "
        f"ref={result['reference_ms']['mean']:.0f}ms "
        f"errors={seq['error_count'] + conc['error_count']}"
    )
    print(json.dumps({"sequential": seq, "concurrent": conc}, indent=2), file=sys.stderr)
    return 0 if seq["error_count"] + conc["error_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
