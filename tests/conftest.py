"""Test services: a real PostgreSQL database built by the real migrations, real Redis.

The environment is set before any project module reads its settings.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

TEST_DB = os.environ.get("HM_TEST_DATABASE", "hiddenmodel_test")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


S3_PORT = _free_port()
PG = os.environ.get("HM_TEST_PG_HOSTPORT", "127.0.0.1:5432")
os.environ.update(
    {
        "HM_ENVIRONMENT": "test",
        "HM_DATABASE_URL": f"postgresql+psycopg://hm_app:hm_app@{PG}/{TEST_DB}",
        "HM_DATABASE_OWNER_URL": f"postgresql+psycopg://hm_owner:hm_owner@{PG}/{TEST_DB}",
        "HM_DATABASE_OPS_URL": f"postgresql+psycopg://hm_ops:hm_ops@{PG}/{TEST_DB}",
        "HM_DATABASE_ADMIN_URL": os.environ.get(
            "HM_TEST_ADMIN_URL", f"postgresql+psycopg://postgres@{PG}/postgres"
        ),
        "HM_REDIS_URL": os.environ.get("HM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
        "HM_SECRET_KEY": "test-secret-key-0123456789abcdef0123456789abcdef",
        "HM_PASSWORD_HASH_TIME_COST": "1",
        "HM_PASSWORD_HASH_MEMORY_KIB": "64",
        "HM_DATA_DIR": os.environ.get("HM_TEST_DATA_DIR", "var/test"),
        "OMP_NUM_THREADS": "1",
        "HM_S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
        "HM_S3_BUCKET": "hm-test",
        # Short leases and intervals so recovery paths run within a test's patience.
        "HM_JOB_LEASE_SECONDS": "2",
        "HM_REDISPATCH_GRACE_SECONDS": "1",
        "HM_RECONCILE_INTERVAL_SECONDS": "0.5",
        "HM_DISPATCH_POLL_SECONDS": "0.2",
        "HM_PROGRESS_DB_INTERVAL_SECONDS": "0.2",
        "HM_WEBHOOK_ALLOW_PRIVATE_URLS": "true",
        "HM_WEBHOOK_BACKOFF_BASE_SECONDS": "0.2",
        "HM_WEBHOOK_BACKOFF_CAP_SECONDS": "1",
        "HM_WEBHOOK_MAX_ATTEMPTS": "3",
        "HM_WEBHOOK_TIMEOUT_SECONDS": "1",
        # Every test client shares one address and many share accounts' patterns: limits and
        # guessing control far above what the suite does. Their own tests set low limits.
        "HM_USER_REQUESTS_PER_MINUTE": "100000",
        "HM_ADDRESS_REQUESTS_PER_MINUTE": "100000",
        "HM_AUTH_ADDRESS_FREE_ATTEMPTS": "100000",
        "HM_AUTH_ADDRESS_LOCK_AFTER": "100000",
        "HM_AUTH_FREE_ATTEMPTS": "100",
        "HM_AUTH_LOCK_AFTER": "1000",
    }
)

import httpx  # noqa: E402
import pytest  # noqa: E402
from sqlalchemy import create_engine, pool, text  # noqa: E402

from hiddenmodel.db import dispose_engines  # noqa: E402
from hiddenmodel.migrate import migrate  # noqa: E402
from hiddenmodel.settings import get_settings  # noqa: E402

# Fixtures that live in modules of their own.
pytest_plugins = ["tests.stripe_fixtures", "tests.browser"]

PASSWORD = "Correct-horse-42"


def _recreate_database() -> None:
    admin = create_engine(
        os.environ["HM_DATABASE_ADMIN_URL"], poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{TEST_DB}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session", autouse=True)
def database() -> None:
    get_settings.cache_clear()
    _recreate_database()
    migrate()
    # Most tests are not about quotas: lift the default plan's limits. Quota and rate-limit
    # tests set their own per organization.
    db_rows(
        "UPDATE plans SET monthly_gpu_seconds = NULL, monthly_images = NULL, "
        "max_running_jobs = NULL, max_queued_jobs = NULL, storage_bytes = NULL, "
        "requests_per_minute = NULL, org_requests_per_minute = NULL WHERE is_default"
    )


@pytest.fixture(scope="session")
async def app() -> AsyncIterator[Any]:
    from hiddenmodel.api.app import create_app

    application = create_app()
    yield application
    await dispose_engines()


@pytest.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@dataclass
class Account:
    id: str
    email: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


async def register(client: httpx.AsyncClient, email: str | None = None) -> Account:
    email = email or f"{unique('user')}@example.com"
    r = await client.post("/v1/auth/register", json={"email": email, "password": PASSWORD})
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    r = await client.post("/v1/auth/login", data={"username": email, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return Account(id=user_id, email=email, token=r.json()["access_token"])


@dataclass
class Org:
    id: str
    slug: str
    owner: Account


async def make_org(client: httpx.AsyncClient, owner: Account | None = None) -> Org:
    owner = owner or await register(client)
    slug = unique("org")
    r = await client.post(
        "/v1/orgs", json={"slug": slug, "name": slug.title()}, headers=owner.headers
    )
    assert r.status_code == 201, r.text
    return Org(id=r.json()["id"], slug=slug, owner=owner)


async def make_key(
    client: httpx.AsyncClient, org: Org, scopes: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    r = await client.post(
        f"/v1/orgs/{org.id}/api-keys",
        json={"name": "test key", "scopes": scopes or ["jobs:read", "jobs:write"], **extra},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(response: httpx.Response, status: int, kind: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status
    if kind is not None:
        assert body["type"].endswith("/" + kind), body


def superuser_url() -> str:
    """The test database as the superuser: for assertions and time travel only, never the app."""
    return os.environ["HM_DATABASE_ADMIN_URL"].rsplit("/", 1)[0] + f"/{TEST_DB}"


def db_rows(sql: str, **params: Any) -> list[Any]:
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        result = conn.execute(text(sql), params)
        rows = list(result) if result.returns_rows else []
    engine.dispose()
    return rows


def db_scalar(sql: str, **params: Any) -> Any:
    rows = db_rows(sql, **params)
    return rows[0][0] if rows else None


@pytest.fixture(scope="session")
def s3() -> Iterator[None]:
    """moto's S3 server on loopback, with the test bucket."""
    from hiddenmodel import storage
    from tests.services import Process, wait_port

    server = Process(
        "moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)]
    )
    try:
        wait_port(S3_PORT)
        storage.s3_client.cache_clear()
        storage.ensure_bucket()
        yield
    finally:
        server.stop()


@pytest.fixture(scope="session")
def cluster(s3: None) -> Iterator[Any]:
    """The dispatcher and one worker, as separate processes."""
    from tests.services import Cluster

    running = Cluster()
    running.start_dispatcher()
    running.start_worker()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def no_dispatch(cluster: Any) -> Iterator[Any]:
    """No dispatcher and no worker while the test runs, so queued jobs stay queued (tests
    that use ``services`` afterwards get them back).

    What the test left queued or running (no worker holds it: the test ran it in its own
    process, or never) is canceled and taken out of the outbox when it ends. Otherwise the
    next test's dispatcher hands it to that test's worker, which then runs a job the test
    does not know of before its own (and a test that holds a lock the job's end needs, such
    as test_graceful_shutdown's, waits out its deadline)."""
    cluster.stop()
    began = db_scalar("SELECT now()")
    yield cluster
    db_rows(
        "WITH left_behind AS ("
        " UPDATE jobs SET status = 'canceled', finished_at = now(), stage = NULL"
        " WHERE created_at >= :began AND status IN ('queued', 'running') RETURNING id)"
        " DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM left_behind)",
        began=began,
    )


@pytest.fixture
def services(cluster: Any) -> Any:
    """A running cluster, restored to one live worker for every test that uses it."""
    cluster.start_dispatcher()
    cluster.ensure_worker()
    return cluster


@pytest.fixture(scope="module")
def receiver() -> Iterator[Any]:
    """A webhook receiver on loopback (tests/webhook_receiver.py), one per test module."""
    from tests.webhook_receiver import running_receiver

    with running_receiver() as state:
        yield state
