"""Real service processes for tests: moto's S3 server, Celery workers, the dispatcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG_DIR = REPO / "var" / "test-logs"


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


class Process:
    """A child process with its output in var/test-logs/<name>.log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        *,
        inherit_env: bool = True,
    ) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.queues: set[str] = set()
        self.log_path = LOG_DIR / f"{name}.log"
        self._log = self.log_path.open("ab")
        # The file keeps earlier runs' output; this process's begins here.
        self._log_start = self._log.tell()
        self.popen = subprocess.Popen(
            argv,
            cwd=REPO,
            env={**(os.environ if inherit_env else {}), **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.alive():
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()

    def log(self) -> str:
        """This process's output (not that of earlier processes with the same name)."""
        with self.log_path.open("rb") as f:
            f.seek(self._log_start)
            return f.read().decode(errors="replace")


def hiddenmodel(name: str, *args: str, env: dict[str, str] | None = None) -> Process:
    return Process(
        name, [sys.executable, "-m", "hiddenmodel.cli", "--log-level", "info", *args], env
    )


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
    def _wait_ready(worker: Process, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in worker.log():
                return
            if not worker.alive():
                raise RuntimeError(f"worker exited:\n{worker.log()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready:\n{worker.log()[-3000:]}")

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
