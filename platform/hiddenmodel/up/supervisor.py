"""How ``up`` itself runs: one per data directory, stopped once by Ctrl-C or SIGTERM, and
failing with an :class:`UpError` that it reports before it stops everything.

The processes it starts are :class:`hiddenmodel.processes.Child` in one
:class:`hiddenmodel.processes.Children` list; this module holds what is particular to ``up``
around them.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from hiddenmodel import processes
from hiddenmodel.processes import Children

START_TIMEOUT_S = 60.0


class UpError(RuntimeError):
    """Something ``up`` cannot work around: it is reported, then everything stops."""


class Stop(BaseException):
    """Raised by the signal handler; a BaseException so no ``except Exception`` swallows it."""


class Signals:
    """SIGINT and SIGTERM stop ``up`` once; repeats are ignored so the shutdown completes."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise Stop(signum)

    def ignore_further(self) -> None:
        """From here on (the shutdown) a signal must not interrupt stopping the children."""
        if self.received is None:
            self.received = 0

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One ``up`` per data directory: two would fight over the embedded servers' files."""
    with (data_dir / "up.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpError(
                f"another `hiddenmodel up` is using {data_dir}; stop it or set HM_DATA_DIR"
            ) from None
        yield


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # The same option uvicorn binds with, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UpError(f"cannot listen on {host}:{port} ({exc.strerror}); use --port") from None


def wait_until(
    ready: Callable[[], bool], children: Children, what: str, timeout: float = START_TIMEOUT_S
) -> None:
    """Until ``ready`` holds; any of ``up``'s children exiting meanwhile fails at once."""
    processes.wait_until(ready, what, timeout=timeout, watch=children.ensure_running)
