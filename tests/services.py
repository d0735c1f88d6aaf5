"""Real service processes for tests: moto's S3 server, Celery workers, the dispatcher.

Started, awaited and stopped through :mod:`hiddenmodel.processes`, as ``hiddenmodel up`` and
the benchmarks start theirs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from hiddenmodel.processes import WORKER_READY, Child, hiddenmodel_argv, wait_for_output, wait_port

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / "var" / "test-logs"

__all__ = ["LOG_DIR", "REPO", "Cluster", "Process", "hiddenmodel", "wait_port"]


class Process(Child):
    """A child process, started at once, with its output in var/test-logs/<name>.log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        inherit_env: bool = True,
    ) -> None:
        super().__init__(
            name=name,
            argv=argv,
            log_path=LOG_DIR / f"{name}.log",
            cwd=REPO,
            env=dict(env or {}),
            inherit_env=inherit_env,
        )
        # The Celery queues a worker consumes (empty for other processes).
        self.queues: set[str] = set()
        self.start()

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        assert self.process is not None
        return self.process

    def log(self) -> str:
        """What this run of the process has logged so far."""
        return self.output()


def hiddenmodel(name: str, *args: str, env: dict[str, str] | None = None) -> Process:
    return Process(name, hiddenmodel_argv(*args, log_level="info"), env)


class Cluster:
    """The dispatcher and a set of workers that tests can stop, kill and restart."""

    def __init__(self) -> None:
        self.dispatcher: Process | None = None
        self.workers: list[Process] = []
        self._count = 0

    def start_dispatcher(self) -> None:
        if self.dispatcher is None or not self.dispatcher.alive():
            self.dispatcher = hiddenmodel("dispatcher", "dispatcher")

    def start_worker(
        self,
        queues: str = "cpu,webhooks,maintenance",
        *args: str,
        env: dict[str, str] | None = None,
    ) -> Process:
        self._count += 1
        worker = hiddenmodel(
            f"worker-{self._count}",
            "worker",
            "--queues",
            queues,
            "--hostname",
            f"test-worker-{self._count}@%h",
            *args,
            env=env,
        )
        worker.queues = set(queues.split(","))
        self.workers.append(worker)
        self._wait_ready(worker)
        return worker

    @staticmethod
    def _wait_ready(worker: Child, timeout: float = 120.0) -> None:
        wait_for_output(worker, WORKER_READY, f"worker {worker.name}", timeout=timeout)

    def stop_workers(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def ensure_worker(self) -> None:
        self.workers = [w for w in self.workers if w.alive()]
        if not any("cpu" in w.queues for w in self.workers):
            self.start_worker()

    def stop(self) -> None:
        self.stop_workers()
        if self.dispatcher is not None:
            self.dispatcher.stop()
