"""Child processes a launcher owns: started with an environment and a log file, waited on
until they are ready, stopped with their stop signal and killed when they do not stop.

``hiddenmodel up`` (:mod:`hiddenmodel.up`), the test suite's services (``tests/services.py``)
and the benchmarks' stack (``bench/_harness.py``) all supervise their processes through this
module, so a fix to how a child is started or stopped reaches all three.

Every child runs in a session, and so a process group, of its own: a Ctrl-C on the terminal
reaches the launcher alone, which stops its children in order, and a kill takes the child's
whole group, so nothing it started outlives it.

Standard library only at import: the benchmarks import this before the ``HM_*`` settings
exist, and nothing here reads them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

STOP_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 30.0
POLL_S = 0.1
# What a Celery worker logs once it consumes (``up``, the tests and the benchmarks wait for it).
WORKER_READY = "ready."
PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    """A child that cannot start, exited, or was not ready in time."""


class ChildExited(ProcessError):
    """A child exited while it was meant to run; the message quotes the end of its log."""


class NotReady(ProcessError, TimeoutError):
    """A child did not become ready before its deadline."""


@dataclass(frozen=True)
class ServiceUser:
    """An unprivileged system user a child runs as (``up`` runs PostgreSQL so, as root)."""

    name: str
    uid: int
    gid: int


@dataclass(eq=False)
class Child:
    """A long-running process owned by the process that starts it."""

    name: str
    argv: list[str]
    # What stops it cleanly: PostgreSQL takes SIGINT for a fast shutdown.
    stop_signal: signal.Signals = signal.SIGTERM
    # Where its output goes; None shares the launcher's terminal.
    log_path: Path | None = None
    # Runs follow each other in one log by default; False starts the file afresh.
    append_log: bool = True
    user: ServiceUser | None = None
    cwd: Path | None = None
    # Set in its environment on top of the launcher's own (or alone, without inherit_env).
    env: dict[str, str] = field(default_factory=dict)
    inherit_env: bool = True
    # Linux: the kernel sends it the stop signal when the launcher dies, even by SIGKILL.
    die_with_parent: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    # Where this run's output starts in its log file.
    log_offset: int = field(default=0, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> None:
        if self.exit_code() is not None:
            raise ChildExited(self.failure())

    def output(self) -> str:
        """What this run of the process has logged so far ("" when it logs to the terminal)."""
        if self.log_path is None:
            return ""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        """The end of this run's log, worded to follow a sentence about the child."""
        if self.log_path is None:
            return ""
        tail = self.output().strip().splitlines()[-lines:]
        if not tail:
            return f"; {self.log_path} is empty"
        return f"; the end of {self.log_path}:\n  " + "\n  ".join(tail)

    def failure(self) -> str:
        return f"{self.name} exited with code {self.exit_code()}{self.log_tail()}"

    def start(self) -> None:
        """Start the process in a session of its own, its output in its log (or on the
        launcher's terminal), its stdin empty."""
        log: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab" if self.append_log else "wb")
            self.log_offset = log.tell()
        user = self.user
        env: dict[str, str] | None = None
        if self.env or not self.inherit_env:
            env = {**(os.environ if self.inherit_env else {}), **self.env}
        try:
            self.process = subprocess.Popen(  # noqa: S603 - argv built by the caller, no shell
                self.argv,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                start_new_session=True,
                preexec_fn=(
                    functools.partial(_set_parent_death_signal, self.stop_signal)
                    if self.die_with_parent and sys.platform == "linux"
                    else None
                ),
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
        except OSError as exc:
            raise ProcessError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        finally:
            # The child holds its own descriptor of the log.
            if log is not None:
                log.close()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Send the stop signal and wait; kill its process group if it does not stop in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in {timeout:.0f} s: killing it", flush=True)
            self.kill()

    def kill(self) -> None:
        """SIGKILL to its whole process group, as a crash would; waits for the child."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            # The group may already be gone but for the child itself (a zombie, not yet reaped).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _set_parent_death_signal(sig: int) -> None:
    """Runs in the child before exec: the kernel signals it when its parent dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


class Children:
    """Processes started together and stopped together, newest first."""

    def __init__(self) -> None:
        self._started: list[Child] = []

    def start(self, child: Child) -> Child:
        child.start()
        self._started.append(child)
        return child

    @property
    def started(self) -> tuple[Child, ...]:
        return tuple(self._started)

    def first_exited(self) -> Child | None:
        return next((c for c in self._started if c.exit_code() is not None), None)

    def ensure_running(self) -> None:
        """Raise with its log when any child has exited: none of them is meant to."""
        if (exited := self.first_exited()) is not None:
            raise ChildExited(exited.failure())

    def stop(self, child: Child) -> None:
        """Stop one child ahead of the others."""
        child.stop()
        if child in self._started:
            self._started.remove(child)

    def stop_all(self) -> None:
        while self._started:
            self._started.pop().stop()


def hiddenmodel_argv(*args: str, log_level: str | None = None) -> list[str]:
    """The ``hiddenmodel`` command under this interpreter, as production runs it."""
    level = [] if log_level is None else ["--log-level", log_level]
    return [sys.executable, "-m", "hiddenmodel.cli", *level, *args]


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def wait_until(
    ready: Callable[[], bool],
    what: str,
    *,
    timeout: float = READY_TIMEOUT_S,
    watch: Callable[[], None] | None = None,
    interval: float = POLL_S,
) -> None:
    """Poll ``ready`` until it holds; ``watch`` raises when what is awaited can no longer
    come (a child exited), so a failure is reported at once rather than at the deadline."""
    deadline = time.monotonic() + timeout
    while not ready():
        if watch is not None:
            watch()
        if time.monotonic() > deadline:
            raise NotReady(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(interval)


def wait_port(
    port: int,
    *,
    host: str = "127.0.0.1",
    timeout: float = READY_TIMEOUT_S,
    child: Child | None = None,
) -> None:
    """Until something listens on ``host:port``; ``child`` is the process meant to."""
    wait_until(
        functools.partial(port_open, host, port),
        f"{child.name if child else 'the server'} on {host}:{port}",
        timeout=timeout,
        watch=None if child is None else child.ensure_running,
        interval=0.05,
    )


def wait_http(url: str, *, timeout: float = 60.0, child: Child | None = None) -> None:
    """Until ``url`` answers with anything but a server error."""
    import httpx

    def answers() -> bool:
        try:
            return httpx.get(url, timeout=2, trust_env=False).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(
        answers,
        url,
        timeout=timeout,
        watch=None if child is None else child.ensure_running,
    )


def wait_for_output(
    child: Child,
    text: str,
    what: str,
    *,
    timeout: float = READY_TIMEOUT_S,
    watch: Callable[[], None] | None = None,
) -> None:
    """Until this run of ``child`` has logged ``text``; by default a failure is the child's
    own exit, ``watch`` widens it (``up`` stops when any of its children exits)."""
    try:
        wait_until(
            lambda: text in child.output(),
            what,
            timeout=timeout,
            watch=child.ensure_running if watch is None else watch,
        )
    except NotReady as exc:
        raise NotReady(f"{exc}{child.log_tail()}") from None
