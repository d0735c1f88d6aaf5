"""SIGTERM, as Kubernetes sends it when it scales a worker away or rolls the API: a worker
finishes the job in hand within its grace period, or, killed when the grace period runs out,
hands it back to run once elsewhere; never both. The API answers the requests in flight."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, create_engine, pool, text

from hiddenmodel import storage
from tests.conftest import _free_port, db_rows, db_scalar, superuser_url
from tests.factories import big_png, insert_endpoint, keyed_org, submit, wait_job, wait_status
from tests.services import Cluster, Process, hiddenmodel, wait_port


async def _until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def usage_held() -> Iterator[Connection]:
    """A transaction that blocks writes to usage_events: a job's worker then stops inside
    the transaction that finishes it (the job row updated, the usage event not yet written),
    for as long as the test holds it."""
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    conn = engine.connect()
    conn.execute(text("LOCK TABLE usage_events IN SHARE MODE"))
    try:
        yield conn
    finally:
        conn.rollback()
        conn.close()
        engine.dispose()


def _finish_blocked() -> bool:
    """A worker's finish waits on the lock: the session's ``hm_settle_job``, or the one
    statement that ends a success with no webhook to record (``hm_finish_succeeded_job``)."""
    return bool(
        db_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND (query ILIKE '%hm_settle_job%' "
            "OR query ILIKE '%hm_finish_succeeded_job%')"
        )
    )


# How the job's end is written: in one statement (autocommit), or, with a webhook endpoint
# subscribed to it, in a session's transaction that records the delivery too.
FINISHES = ("one statement", "session")


def _billed(job_id: str) -> int:
    return int(db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id))


# The pools the manifests run: solo (CPU and background workers), threads (GPU workers, here
# on the cpu queue: the shutdown path is the pool's, not the model's).
POOLS = {"solo": (), "threads": ("--pool", "threads", "--concurrency", "4")}


async def _job_in_its_finish(
    client: httpx.AsyncClient, services: Cluster, pool: str = "solo", finish: str = FINISHES[0]
) -> tuple[Any, dict[str, str], str, Process]:
    services.stop_workers()
    worker = services.start_worker("cpu", *POOLS[pool])
    org, headers = await keyed_org(client)
    if finish == "session":
        insert_endpoint(org.id, ["job.succeeded"])
    r = await submit(
        client, headers, image=big_png(1200), params={"width": 1000, "height": 1000, "mode": "fit"}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    await wait_status(client, headers, job_id, "running")
    await _until(_finish_blocked, 30, "the worker to wait inside its finish")
    return org, headers, job_id, worker


@pytest.mark.parametrize("finish", FINISHES)
@pytest.mark.parametrize("pool", sorted(POOLS))
async def test_sigterm_lets_the_running_job_finish_once(
    client: httpx.AsyncClient, services: Cluster, usage_held: Connection, pool: str, finish: str
) -> None:
    org, headers, job_id, worker = await _job_in_its_finish(client, services, pool, finish)
    worker.popen.send_signal(signal.SIGTERM)
    await _until(lambda: "Warm shutdown" in worker.log(), 20, "the warm shutdown")
    # Shutting down, but not before its job is done.
    assert worker.alive()
    usage_held.rollback()
    done = await wait_job(client, headers, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert worker.popen.wait(30) == 0
    assert _billed(job_id) == 1
    keys = storage.list_keys(f"orgs/{org.id}/jobs/{job_id}/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["image.png", "output.png"]
    services.workers.remove(worker)


@pytest.mark.parametrize("finish", FINISHES)
@pytest.mark.parametrize("pool", sorted(POOLS))
async def test_a_worker_killed_when_its_grace_period_ends_leaves_one_end(
    client: httpx.AsyncClient, services: Cluster, usage_held: Connection, pool: str, finish: str
) -> None:
    """Killed inside the session's transaction, the worker's end rolls back and the job runs
    again elsewhere (attempt 2). Killed while its one statement waits, that statement is the
    server's to finish: it commits when the lock is released, and the job's next delivery
    finds it ended (attempt 1). Either way one end, one usage event, one output."""
    org, headers, job_id, worker = await _job_in_its_finish(client, services, pool, finish)
    worker.popen.send_signal(signal.SIGTERM)
    await _until(lambda: "Warm shutdown" in worker.log(), 20, "the warm shutdown")
    # The grace period is over: the kubelet's SIGKILL.
    worker.kill()
    services.workers.remove(worker)
    usage_held.rollback()
    services.start_worker("cpu")
    done = await wait_job(client, headers, job_id, timeout=90)
    attempts = 2 if finish == "session" else 1
    assert done["status"] == "succeeded" and done["attempts"] == attempts, done
    assert _billed(job_id) == 1
    row = db_rows("SELECT status, outputs FROM jobs WHERE id = :j", j=job_id)[0]
    assert row[0] == "succeeded" and len(row[1]) == 1
    keys = storage.list_keys(f"orgs/{org.id}/jobs/{job_id}/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["image.png", "output.png"]


async def test_the_api_answers_a_request_in_flight_when_sigterm_arrives(
    client: httpx.AsyncClient, no_dispatch: Cluster
) -> None:
    org, headers = await keyed_org(client)
    port = _free_port()
    api = hiddenmodel("api-drain", "api", "--host", "127.0.0.1", "--port", str(port))
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as remote:
            # No worker runs: the job stays queued and the request waits the full 3 s.
            pending = asyncio.create_task(
                submit(remote, {**headers, "Prefer": "wait=3"}, image=big_png(400))
            )
            await _until(
                lambda: db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id),
                20,
                "the request to be in flight",
            )
            api.popen.send_signal(signal.SIGTERM)
            r = await pending
        assert r.status_code == 202, r.text
        assert r.headers["Preference-Applied"] == "wait=3"
        # uvicorn drains, then exits by the signal it caught (or 0 on older releases).
        assert api.popen.wait(30) in (0, -signal.SIGTERM)
        assert "Waiting for application shutdown" in api.log()
        # Once drained it is gone: no new request is accepted.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=2)
    finally:
        if api.alive():
            api.kill()
        else:
            api.stop()
