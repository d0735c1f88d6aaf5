"""``up``'s course: the servers, the schema, the bucket and the demo data, then the platform's
processes, the proofs that it works and the banner; then it waits until Ctrl-C, SIGTERM or a
child's exit, and stops everything it started, newest first."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from hiddenmodel.processes import Children, ProcessError
from hiddenmodel.settings import get_settings
from hiddenmodel.up.banner import banner
from hiddenmodel.up.claim import claim_services
from hiddenmodel.up.demo import DEMO_IMAGE_FILE, GHOST_PHOTO_FILE, demo_image, seed_demo
from hiddenmodel.up.model import ModelPlan, plan_model
from hiddenmodel.up.proof import prove_ghost, prove_jobs, prove_ready
from hiddenmodel.up.servers import (
    DATABASE_ENV,
    EMBEDDED_ENV,
    S3_ENV,
    embedded_forced,
    ensure_bucket,
    use_database,
    use_redis,
    use_s3,
)
from hiddenmodel.up.stack import platform_processes, wait_for_workers
from hiddenmodel.up.supervisor import Signals, Stop, UpError, check_port_free, data_dir_lock


def _probe_host(host: str) -> str:
    """Where to reach a server listening on ``host`` from this machine."""
    if host in {"", "0.0.0.0", "::"}:  # noqa: S104 - compared, not bound
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _bring_up(
    children: Children,
    claims: ExitStack,
    data_dir: Path,
    host: str,
    port: int,
    model: ModelPlan,
) -> str:
    """Servers, schema, bucket, demo data, then the platform; returns the banner. The claim
    on the database and Redis goes on ``claims``, held until the children have stopped."""
    embedded = embedded_forced()
    if embedded:
        overridden = [v for v in (*DATABASE_ENV, "HM_REDIS_URL", S3_ENV) if v in os.environ]
        if overridden:
            print(f"{EMBEDDED_ENV}=1: ignoring {', '.join(overridden)}")
    print(use_database(children, data_dir, embedded), flush=True)
    print(use_redis(children, data_dir, embedded), flush=True)
    print(use_s3(children, data_dir, embedded), flush=True)

    base = f"http://{_probe_host(host)}:{port}"
    os.environ.setdefault("HM_PUBLIC_BASE_URL", base)
    get_settings.cache_clear()
    # Before anything is migrated or seeded: another up on the same database or Redis
    # database stops here.
    settings = get_settings()
    claim = claims.enter_context(
        claim_services(
            settings.database_owner_url, settings.redis_url, f"pid {os.getpid()} at {base}"
        )
    )

    import asyncio

    from hiddenmodel.migrate import migrate

    migrate()
    print("database migrated", flush=True)
    claim.claim_database()  # when migrate has just created the database
    print(ensure_bucket(), flush=True)
    key = asyncio.run(seed_demo())
    model.finish(children)

    for child in platform_processes(host, port, data_dir / "log", model):
        children.start(child)
    print("waiting for the workers, the dispatcher and the API", flush=True)
    wait_for_workers(children)
    photo_path = data_dir / GHOST_PHOTO_FILE
    (data_dir / DEMO_IMAGE_FILE).write_bytes(demo_image())
    # trust_env=False: a proxy from the environment must not intercept loopback calls.
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
        ready, me = prove_ready(client, key, children)
        job_lines = prove_jobs(client, key, children)
        if model.path is not None:
            job_lines += prove_ghost(client, key, children, photo_path, model)
    return banner(base, key, ready, me, job_lines, children, model, photo_path)


def run(host: str = "127.0.0.1", port: int = 8000) -> int:
    """``hiddenmodel up``: 0 when stopped by a signal, 1 on a failure it reports, 2 in
    production."""
    settings = get_settings()
    # Their per-step INFO lines would bury the banner; up reports those steps itself.
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if settings.is_production:
        print(
            "error: `up` is for development; run migrate, api, worker and dispatcher instead",
            file=sys.stderr,
        )
        return 2
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Absolute, so every child resolves the same directory whatever its working directory.
    os.environ["HM_DATA_DIR"] = str(data_dir)
    # Children writing to log files would otherwise buffer print() output (Celery's banner)
    # and flush it at exit, after their log lines: a failure's tail would show the wrong end.
    os.environ["PYTHONUNBUFFERED"] = "1"
    children = Children()
    signals = Signals()
    with signals.installed():
        try:
            # The lock outlives the children, so a new run never meets a server still stopping.
            with data_dir_lock(data_dir):
                check_port_free(host, port)
                # Before any server starts: a model the GPU worker would refuse stops up at
                # once, and the tiny model, when needed, is made while the servers start.
                model = plan_model(data_dir)
                with ExitStack() as claims:
                    try:
                        print(_bring_up(children, claims, data_dir, host, port, model), flush=True)
                        while (exited := children.first_exited()) is None:
                            time.sleep(0.5)
                        raise UpError(exited.failure())
                    finally:
                        signals.ignore_further()
                        model.abandon()
                        children.stop_all()
        except Stop:
            print("stopped", flush=True)
            return 0
        except (UpError, ProcessError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
