"""A running ``hiddenmodel up`` for the tests: started on a free port, read as it prints,
stopped with Ctrl-C (SIGINT) and checked to leave nothing behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, pool, text

from hiddenmodel.processes import free_port
from tests.conftest import TEST_DB

# Its own database: up migrates and seeds it, and nothing else may depend on its contents.
UP_DB = f"{TEST_DB}_up"
# up starts PostgreSQL, Redis, S3, two workers, the dispatcher and the API, then runs its demo
# jobs: about 15 s on a quiet two-core machine, over 60 s at a load average above 10.
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
JOB_TIMEOUT_S = 30
KEY_LINE = re.compile(r"^\s*API key:\s+(\S+)\s*$")
# The banner's process table: "  worker      pid 1234     log /…/worker.log".
PROCESS_LINE = re.compile(r"^\s+(\S+)\s+pid (\d+)\s")


def drop_database(name: str) -> None:
    admin = create_engine(
        os.environ["HM_DATABASE_ADMIN_URL"], poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Up:
    """A running ``hiddenmodel up`` whose output is collected as it comes."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.key: str | None = None
        self._key_seen = threading.Event()
        executable = Path(sys.executable).with_name("hiddenmodel")
        assert executable.exists(), f"the hiddenmodel command is not installed: {executable}"
        self.process = subprocess.Popen(
            [str(executable), "up", "--port", str(self.port)],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        # Drained all along: a full pipe would block up and its children.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            if self.key is None and (match := KEY_LINE.search(line)):
                self.key = match.group(1)
                self._key_seen.set()
        self._key_seen.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def processes(self) -> dict[str, int]:
        """The processes up says it runs, by name."""
        found = (PROCESS_LINE.match(line) for line in self.lines)
        return {m.group(1): int(m.group(2)) for m in found if m}

    def wait_for_key(self) -> str:
        self._key_seen.wait(START_TIMEOUT_S)
        assert self.key is not None, f"up printed no API key:\n{self.output}"
        return self.key

    def interrupt(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"up did not stop within {STOP_TIMEOUT_S} s:\n{self.output}")
        # Its last lines are read once the pipe closes.
        self._reader.join(5)
        return code


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def stopped_cleanly(up: Up) -> None:
    processes = up.processes()
    assert up.interrupt() == 0, up.output
    assert "stopped" in up.lines[-1], up.output
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", up.port)) != 0, "the API outlived up"
    outlived = {name: pid for name, pid in processes.items() if alive(pid)}
    assert not outlived, f"outlived up: {outlived}\n{up.output}"
