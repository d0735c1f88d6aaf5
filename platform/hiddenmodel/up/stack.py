"""The platform's own processes under ``up``: a CPU worker, a GPU worker (the model
operations), the dispatcher and the API, each the same ``hiddenmodel`` command production runs,
with the environment ``up`` resolved."""

from __future__ import annotations

import os
from pathlib import Path

from hiddenmodel.processes import WORKER_READY, Child, Children, hiddenmodel_argv, wait_for_output
from hiddenmodel.settings import get_settings
from hiddenmodel.up.model import MODEL_LOAD_TIMEOUT_S, ModelPlan, nvidia_gpu_visible
from hiddenmodel.up.supervisor import START_TIMEOUT_S

# The CPU worker: operations without a model, webhook deliveries and maintenance. GPU time is
# not spent on those, so the model operations have a worker of their own.
WORKER_QUEUES = "cpu,webhooks,maintenance"
# Its jobs run in pool processes, one per core up to this many. Threads in one process were
# tried first (Pillow's decode, resize and encode release the GIL), but the rest of a job
# (Celery, SQL, S3 requests) holds it: on two cores, with eight clients, two processes ran
# 9 % more jobs a second for 8 % less CPU a job (docs/BENCHMARKS.md).
CPU_WORKER_MAX_PROCESSES = 4
# Each pool process may hold a second message, so the next short job is handed over as the
# last one ends instead of after an ack and a fetch from Redis: with eight clients on two
# cores, 5-11 % more jobs a second for 3-8 % less CPU a job (docs/BENCHMARKS.md). What one
# worker can hold stays bounded by the dispatcher's in-flight cap per organization, and a
# held message has its receipt, so a worker that dies gives it back as it gives back the
# one it runs. The GPU worker keeps one: its jobs are long.
CPU_WORKER_PREFETCH = 2


def cpu_worker_processes() -> int:
    # The cores this process may run on (Linux); elsewhere, the machine's.
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(cores, CPU_WORKER_MAX_PROCESSES))


# The GPU worker runs jobs in threads, so concurrent jobs meet in the batcher over its one
# resident model; fewer threads than the batch size would cap the batches.
GPU_WORKER_QUEUES = "gpu"
GPU_WORKER_CONCURRENCY = 4


def platform_processes(host: str, port: int, log_dir: Path, model: ModelPlan) -> list[Child]:
    """The platform's own long-running processes, in start order.

    Each is a separate ``hiddenmodel`` command that reads the ``HM_*`` environment ``up`` has
    resolved, exactly as it would run in production. Stopped newest first: the API stops
    taking jobs, then the dispatcher stops sending them, then the workers finish the jobs in
    hand while the servers they write to are still up. The API keeps the terminal, so requests
    and development mail show there; the others log to files.
    """
    workers = [
        Child(
            name="worker",
            argv=hiddenmodel_argv(
                "worker",
                "--queues",
                WORKER_QUEUES,
                "--pool",
                "prefork",
                "--concurrency",
                str(cpu_worker_processes()),
                "--prefetch-multiplier",
                str(CPU_WORKER_PREFETCH),
            ),
            log_path=log_dir / "worker.log",
            die_with_parent=True,
        )
    ]
    if model.path is not None:
        gpu_env: dict[str, str] = {}
        if not nvidia_gpu_visible() and "OMP_NUM_THREADS" not in os.environ:
            # On the CPU, torch's thread pool would compete for the cores with the API, the
            # other worker and the servers; with few cores that made runs many times slower.
            gpu_env["OMP_NUM_THREADS"] = "1"
        concurrency = max(GPU_WORKER_CONCURRENCY, get_settings().gpu_batch_max_size)
        workers.append(
            Child(
                name="worker-gpu",
                argv=hiddenmodel_argv(
                    "worker",
                    "--queues",
                    GPU_WORKER_QUEUES,
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(concurrency),
                    "--hostname",
                    "gpu@%h",
                ),
                log_path=log_dir / "worker-gpu.log",
                env=gpu_env,
                die_with_parent=True,
            )
        )
    return [
        *workers,
        Child(
            name="dispatcher",
            argv=hiddenmodel_argv("dispatcher"),
            log_path=log_dir / "dispatcher.log",
            die_with_parent=True,
        ),
        Child(
            name="api",
            argv=hiddenmodel_argv("api", "--host", host, "--port", str(port)),
            die_with_parent=True,
        ),
    ]


def wait_for_workers(children: Children) -> None:
    """Until each worker consumes; any child exiting meanwhile fails ``up`` at once."""
    waits = {
        "worker": ("the Celery worker", START_TIMEOUT_S),
        # It loads the model before it consumes: a real checkpoint takes a while.
        "worker-gpu": ("the GPU worker (loading the model)", MODEL_LOAD_TIMEOUT_S),
    }
    for child in children.started:
        if child.name in waits:
            what, timeout = waits[child.name]
            wait_for_output(
                child, WORKER_READY, what, timeout=timeout, watch=children.ensure_running
            )
