"""``GET /v1/jobs/{id}`` with an API key in one statement (``hm_job_for_key_request``), and
the usual path, in the key's organization scope, for every case that statement does not
cover: both answer alike, and a refusal is the refusal it always was."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, inspect, pool, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, undefer

from hiddenmodel import db
from hiddenmodel.jobs import router
from hiddenmodel.jobs.models import Job
from hiddenmodel.models import from_json
from hiddenmodel.redis import sync_redis
from hiddenmodel.security import keyed_hashes
from hiddenmodel.settings import get_settings
from tenants.models import ApiKey, Organization
from tests.conftest import (
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    superuser_url,
)
from tests.factories import keyed_org, set_overrides, submit, wait_job

pytestmark = pytest.mark.usefixtures("services")

Counter = dict[str, int]


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """How many reads went each way."""
    counts = {"one_statement": 0, "usual": 0}
    one_statement, usual = router.read_with_api_key, router.key_org_scope

    async def counted_read(*args: Any, **kwargs: Any) -> Any:
        read = await one_statement(*args, **kwargs)
        counts["one_statement"] += read is not None
        return read

    @asynccontextmanager
    async def counted_scope(request: Any) -> Any:
        counts["usual"] += 1
        async with usual(request) as scope:
            yield scope

    monkeypatch.setattr(router, "read_with_api_key", counted_read)
    monkeypatch.setattr(router, "key_org_scope", counted_scope)
    return counts


async def _usual_way(monkeypatch: pytest.MonkeyPatch, request: Callable[[], Awaitable[Any]]) -> Any:
    async def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    with monkeypatch.context() as patched:
        patched.setattr(router, "read_with_api_key", nothing)
        return await request()


def _without_signatures(body: dict[str, Any]) -> dict[str, Any]:
    """Presigned URLs differ on every read (their expiry and signature)."""
    for output in body["outputs"]:
        output.pop("url")
        output.pop("url_expires_at")
    return body


async def _used(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    """A first request records the key's use (the usual way); later ones need not."""
    assert (await client.get("/v1/me", headers=headers)).status_code == 200


async def test_a_poll_is_one_statement_and_reads_as_the_usual_way(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, paths: Counter, services: Any
) -> None:
    _, headers = await keyed_org(client)
    await _used(client, headers)
    done = (await submit(client, headers, params={"width": 32})).json()
    failed = (await submit(client, headers, params={"width": 1000})).json()  # a 31x enlargement
    for job in (
        await wait_job(client, headers, done["id"]),
        await wait_job(client, headers, failed["id"]),
    ):
        assert job["status"] in ("succeeded", "failed")
    services.stop_workers()
    try:
        queued = [(await submit(client, headers)).json() for _ in range(3)]
        canceled = (await submit(client, headers)).json()
        r = await client.post(f"/v1/jobs/{canceled['id']}/cancel", headers=headers)
        assert r.status_code == 200, r.text
        ids = [done["id"], failed["id"], canceled["id"], *(j["id"] for j in queued)]
        paths.update(one_statement=0, usual=0)
        for job_id in ids:

            async def read(job_id: str = job_id) -> dict[str, Any]:
                r = await client.get(f"/v1/jobs/{job_id}", headers=headers)
                assert r.status_code == 200, r.text
                return _without_signatures(r.json())

            fast = await read()
            assert fast == await _usual_way(monkeypatch, read)
        assert paths == {"one_statement": len(ids), "usual": len(ids)}
    finally:
        services.start_worker()
    # What the comparison covered: outputs, an error, a cancel, and positions in a queue.
    first = (await client.get(f"/v1/jobs/{done['id']}", headers=headers)).json()
    assert first["outputs"] and first["outputs"][0]["url"]
    assert httpx.get(first["outputs"][0]["url"]).status_code == 200
    assert (await client.get(f"/v1/jobs/{failed['id']}", headers=headers)).json()["error"]


async def test_a_queued_jobs_position_is_read_in_the_same_statement(
    client: httpx.AsyncClient, paths: Counter, services: Any
) -> None:
    _, headers = await keyed_org(client)
    await _used(client, headers)
    services.stop_workers()
    try:
        jobs = [(await submit(client, headers)).json() for _ in range(3)]
        paths.update(one_statement=0, usual=0)
        positions = [
            (await client.get(f"/v1/jobs/{j['id']}", headers=headers)).json()["queue_position"]
            for j in jobs
        ]
        assert positions == [0, 1, 2] and paths == {"one_statement": 3, "usual": 0}
    finally:
        services.start_worker()
    finished = await wait_job(client, headers, jobs[0]["id"])
    assert finished["queue_position"] is None


async def test_another_organizations_job_is_not_found(
    client: httpx.AsyncClient, paths: Counter
) -> None:
    _, theirs = await keyed_org(client)
    job = (await submit(client, theirs)).json()
    _, mine = await keyed_org(client)
    await _used(client, mine)
    paths.update(one_statement=0, usual=0)
    assert_problem(await client.get(f"/v1/jobs/{job['id']}", headers=mine), 404, "job-not-found")
    assert_problem(await client.get(f"/v1/jobs/{uuid.uuid4()}", headers=mine), 404, "job-not-found")
    assert paths == {"one_statement": 2, "usual": 0}


async def test_the_function_reads_only_in_the_keys_organization(
    client: httpx.AsyncClient,
) -> None:
    """As the app's role: a key binds its own organization, row-level security hides the
    rest, and a key named with another organization reads nothing at all."""
    org_b, theirs = await keyed_org(client)
    job = (await submit(client, theirs)).json()
    org_a = await make_org(client)
    mine = (await make_key(client, org_a, ["jobs:read"]))["key"]
    engine = create_engine(get_settings().database_url, poolclass=pool.NullPool)
    call = text("SELECT * FROM hm_job_for_key_request(:org, :hash, :job)")
    try:
        with engine.connect() as conn:
            args = {"org": org_a.id, "hash": keyed_hashes(mine)[0], "job": job["id"]}
            own = conn.execute(call, args).all()
            assert len(own) == 1 and own[0].api_key["organization_id"] == org_a.id
            assert "key_hash" not in own[0].api_key and own[0].job is None
            assert own[0].organization["id"] == org_a.id
            other = conn.execute(call, {**args, "org": org_b.id}).all()
            assert other == []
            theirs_hash = keyed_hashes(theirs["Authorization"].split()[1])[0]
            seen = conn.execute(call, {**args, "org": org_b.id, "hash": theirs_hash}).one()
            assert seen.job["id"] == job["id"] and seen.job["organization_id"] == org_b.id
            conn.rollback()
    finally:
        engine.dispose()


async def test_every_other_case_goes_the_usual_way_and_answers_as_before(
    client: httpx.AsyncClient, paths: Counter
) -> None:
    org = await make_org(client)
    writer = await make_key(client, org, ["jobs:read", "jobs:write"])
    job = (await submit(client, bearer(writer["key"]))).json()
    path = f"/v1/jobs/{job['id']}"

    async def refused(headers: dict[str, str], status: int, kind: str) -> None:
        paths.update(one_statement=0, usual=0)
        assert_problem(await client.get(path, headers=headers), status, kind)
        assert paths["one_statement"] == 0 and paths["usual"] == 1, paths

    # A key without jobs:read, used before so its use need not be recorded.
    usage_only = await make_key(client, org, ["usage:read"])
    await _used(client, bearer(usage_only["key"]))
    await refused(bearer(usage_only["key"]), 403, "missing-scope")
    # An unknown key of a real organization, and a malformed one.
    other = await make_key(client, org, ["jobs:read"])
    await _used(client, bearer(other["key"]))  # revoked below: refused as revoked, not as unused
    await refused(bearer(other["key"][:-6] + "AAAAAA"), 401, "invalid-api-key")
    await refused(bearer("hmk_nonsense"), 401, "invalid-api-key")
    await refused({"Authorization": "Basic abc"}, 401, None)  # type: ignore[arg-type]
    # A signed-in person, not a key.
    await refused(org.owner.headers, 403, "api-key-required")
    # Revoked, expired, suspended.
    reader = await make_key(client, org, ["jobs:read"])
    await _used(client, bearer(reader["key"]))
    db_rows(
        "UPDATE api_keys SET expires_at = :t WHERE id = :k",
        t=datetime.now(UTC) - timedelta(seconds=1),
        k=reader["id"],
    )
    await refused(bearer(reader["key"]), 401, "api-key-expired")
    r = await client.delete(f"/v1/orgs/{org.id}/api-keys/{other['id']}", headers=org.owner.headers)
    assert r.status_code in (200, 204), r.text
    await refused(bearer(other["key"]), 401, "api-key-revoked")
    db_rows("UPDATE organizations SET suspended_at = now() WHERE id = :o", o=org.id)
    try:
        await refused(bearer(writer["key"]), 403, "organization-suspended")
    finally:
        db_rows("UPDATE organizations SET suspended_at = NULL WHERE id = :o", o=org.id)


async def test_a_keys_use_is_still_recorded(client: httpx.AsyncClient, paths: Counter) -> None:
    _, headers = await keyed_org(client)
    job = (await submit(client, headers)).json()
    key_id = db_scalar("SELECT api_key_id FROM jobs WHERE id = :j", j=job["id"])
    resolution = get_settings().api_key_last_used_resolution_seconds
    stale = datetime.now(UTC) - timedelta(seconds=resolution + 5)
    db_rows("UPDATE api_keys SET last_used_at = :t WHERE id = :k", t=stale, k=key_id)
    paths.update(one_statement=0, usual=0)
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).status_code == 200
    assert paths == {"one_statement": 0, "usual": 1}
    used = db_scalar("SELECT last_used_at FROM api_keys WHERE id = :k", k=key_id)
    assert used > stale + timedelta(seconds=4)
    assert (await client.get(f"/v1/jobs/{job['id']}", headers=headers)).status_code == 200
    assert paths == {"one_statement": 1, "usual": 1}


async def test_polls_count_against_the_keys_rate_limit(
    client: httpx.AsyncClient, paths: Counter
) -> None:
    org, writer = await keyed_org(client)
    job = (await submit(client, writer)).json()
    reader = await make_key(client, org, ["jobs:read"])
    headers = bearer(reader["key"])
    await _used(client, headers)
    set_overrides(org, requests_per_minute=3)
    sync_redis().delete(f"hm:rl:key:{reader['id']}")  # a fresh minute for the key
    paths.update(one_statement=0, usual=0)
    try:
        answers = [await client.get(f"/v1/jobs/{job['id']}", headers=headers) for _ in range(4)]
        assert [a.status_code for a in answers[:3]] == [200, 200, 200]
        assert "RateLimit" in answers[0].headers
        assert_problem(answers[3], 429, "rate-limited")
        assert paths == {"one_statement": 3, "usual": 0}
    finally:
        set_overrides(org)


async def test_a_malformed_id_is_refused_only_after_the_credentials(
    client: httpx.AsyncClient,
) -> None:
    _, headers = await keyed_org(client)
    assert_problem(await client.get("/v1/jobs/not-a-uuid"), 401)
    assert_problem(await client.get("/v1/jobs/not-a-uuid", headers=bearer("hmk_nonsense")), 401)
    r = await client.get("/v1/jobs/not-a-uuid", headers=headers)
    assert r.status_code == 422, r.text


async def test_a_failed_connection_falls_back_and_is_not_pooled(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, headers = await keyed_org(client)
    job = (await submit(client, headers)).json()
    await _used(client, headers)
    row = await db.fetch_one_statement("SELECT pg_backend_pid()", ())
    assert row is not None
    pid = row[0]
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    engine.dispose()
    failures, invalidated = 0, False
    size = db.async_engine().pool.size() + 1  # type: ignore[attr-defined]
    for _ in range(size):
        try:
            row = await db.fetch_one_statement("SELECT pg_backend_pid()", ())
        except DBAPIError as exc:
            failures += 1
            invalidated = exc.connection_invalidated
            continue
        assert row is not None and row[0] != pid
    assert failures == 1 and invalidated  # the dropped connection, once; then it is gone

    # A poll that meets a failure answers the usual way.
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise DBAPIError(
            "SELECT", None, psycopg.OperationalError("server closed"), connection_invalidated=True
        )

    monkeypatch.setattr(db, "fetch_one_statement", broken)
    from tenants import auth

    monkeypatch.setattr(auth, "fetch_one_statement", broken)
    r = await client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert r.status_code == 200 and r.json()["id"] == job["id"]


async def test_pooled_connections_go_back_in_transactions(client: httpx.AsyncClient) -> None:
    """After one-statement reads, a session's statements still share one transaction, and a
    statement that fails leaves its connection as it found it."""
    for _ in range(3):
        await db.fetch_one_statement("SELECT 1", ())
    with pytest.raises(DBAPIError, match="division by zero"):
        await db.fetch_one_statement("SELECT 1 / 0", ())
    engine = db.async_engine()
    idle = engine.pool.checkedin()  # type: ignore[attr-defined]
    held = [await engine.connect() for _ in range(max(1, idle))]
    try:
        for conn in held:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None and driver.autocommit is False
            first = (await conn.execute(text("SELECT txid_current()"))).scalar()
            assert (await conn.execute(text("SELECT txid_current()"))).scalar() == first
            await conn.rollback()
    finally:
        for conn in held:
            await conn.close()


async def test_no_organization_stays_bound_to_a_pooled_connection(
    client: httpx.AsyncClient, paths: Counter
) -> None:
    """The key binds its organization for its own statement only: once one-statement polls
    are answered, no pooled connection still carries ``app.org_id`` (the next request on
    it, of another organization or of none, would read as that one)."""
    _, headers = await keyed_org(client)
    await _used(client, headers)
    job = (await submit(client, headers)).json()
    paths.update(one_statement=0, usual=0)
    for _ in range(4):
        r = await client.get(f"/v1/jobs/{job['id']}", headers=headers)
        assert r.status_code == 200
    assert paths == {"one_statement": 4, "usual": 0}
    engine = db.async_engine()
    idle = engine.pool.checkedin()  # type: ignore[attr-defined]
    assert idle >= 1
    held = [await engine.connect() for _ in range(idle)]
    try:
        for conn in held:
            setting = text("SELECT current_setting('app.org_id', true)")
            bound = (await conn.execute(setting)).scalar()
            assert bound in (None, ""), f"a pooled connection is still bound to {bound}"
            await conn.rollback()
    finally:
        for conn in held:
            await conn.close()


async def test_a_cancelled_statement_leaves_the_pool_whole(client: httpx.AsyncClient) -> None:
    """A poll whose client went away mid-statement: its connection, in an unknown state, is
    not pooled again (nor kept out of the pool), and the next statements run as usual."""
    engine = db.async_engine()
    await db.fetch_one_statement("SELECT 1", ())
    task = asyncio.create_task(db.fetch_one_statement("SELECT pg_sleep(30)", ()))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    for _ in range(engine.pool.size() + 1):  # type: ignore[attr-defined]
        assert await db.fetch_one_statement("SELECT 1", ()) == (1,)


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_rows_sent_as_json_become_the_objects_the_orm_loads(
    client: httpx.AsyncClient,
) -> None:
    """``from_json`` (the one-statement reads) gives every column the value and type that
    loading the row through the ORM gives, as a detached object with no change to flush."""
    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    try:
        with Session(engine) as session:
            for model, table, row_id in (
                (Job, "jobs", job_id),
                (Organization, "organizations", org.id),
                (
                    ApiKey,
                    "api_keys",
                    db_scalar("SELECT id FROM api_keys WHERE organization_id = :o", o=org.id),
                ),
            ):
                data = session.execute(
                    text(f"SELECT to_jsonb(t) FROM {table} t WHERE id = :id"),
                    {"id": row_id},
                ).scalar_one()
                loaded = session.get(model, uuid.UUID(str(row_id)), options=[undefer("*")])
                made = from_json(model, data)
                state = inspect(made)
                assert state.transient and not state.modified
                for column in model.__table__.c:
                    value, expected = getattr(made, column.key), getattr(loaded, column.key)
                    assert (value, type(value)) == (expected, type(expected)), column.key
    finally:
        engine.dispose()


def test_an_object_made_from_json_reads_in_a_process_that_has_not_queried_yet() -> None:
    """A worker's first claim makes its job with ``from_json`` before any query or session
    has configured the mappers; its attributes must read all the same."""
    code = (
        "import uuid\n"
        "from hiddenmodel.jobs.models import Job\n"
        "from hiddenmodel.models import from_json\n"
        "job = from_json(Job, {'id': str(uuid.UUID(int=7)), 'attempts': 1, 'status': 'running'})\n"
        "print(job.id, job.attempts, job.status, job.batch_id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(uuid.UUID(int=7)), "1", "running", "None"]


async def test_a_polls_rendering_runs_bound_to_its_organization_and_leaves_nothing_bound(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Log lines written while the job is rendered carry its organization; the binding ends
    with the read, so nothing after the request (or a later one in the same task) runs as
    that organization."""
    from hiddenmodel.jobs import service
    from hiddenmodel.tenancy import current_org_id

    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    seen: list[uuid.UUID | None] = []
    render = service.render

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(current_org_id.get())
        return render(*args, **kwargs)

    monkeypatch.setattr(service, "render", recording)
    assert current_org_id.get() is None
    r = await client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.status_code == 200, r.text
    assert seen == [uuid.UUID(org.id)]
    assert current_org_id.get() is None
