"""One job in a worker, run in this process: the claim (a job past its deadline expires
instead of running; a delivery that lost the race does nothing), and the progress steps (a
cancel is seen at the first step after each check interval; a burst of steps asks Redis
once, not once a step)."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import event

from hiddenmodel import storage
from hiddenmodel.db import sync_engine, tenant_session
from hiddenmodel.jobs import events, lifecycle, repository
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.processes import free_port
from hiddenmodel.redis import sync_redis
from hiddenmodel.tenancy import org_context
from tests.conftest import db_rows, db_scalar
from tests.factories import insert_endpoint, keyed_org, submit
from workers import runner
from workers.pipelines.contracts import JobCancelled


def _job(job_id: str) -> Any:
    (row,) = db_rows(
        "SELECT status, error_code, attempts, started_at, outputs, worker,"
        " (SELECT count(*) FROM job_outbox o WHERE o.job_id = j.id) AS in_outbox"
        " FROM jobs j WHERE id = :id",
        id=job_id,
    )
    return row


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_job_runs_once_and_a_second_delivery_does_nothing(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "succeeded"
    job = _job(job_id)
    assert (job.status, job.attempts, job.worker) == ("succeeded", 1, "test-worker")
    assert [o["name"] for o in job.outputs] == ["output"]
    assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "another") == "skipped"
    assert _job(job_id).attempts == 1
    events_ = db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :id", id=job_id)
    assert events_ == 1


def _gradient_png(width: int = 320, height: int = 240) -> bytes:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([40 + 0.6 * x, 80 + 0.5 * y, 220 - 0.2 * (x + y)], axis=-1)
    noise = np.random.default_rng(3).normal(0, 2.0, base.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(out, "PNG")
    return out.getvalue()


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_png_compression_chooses_the_encoder_of_a_jobs_output(
    client: httpx.AsyncClient,
) -> None:
    """Fast by default (fpng marks its files), small on request; the same pixels either way,
    and the size recorded is the size stored."""
    org, headers = await keyed_org(client)
    image = _gradient_png()
    stored: dict[str, bytes] = {}
    for compression in ("fast", "small", None):
        params: dict[str, Any] = {
            "width": 160,
            **({"png_compression": compression} if compression else {}),
        }
        job_id = (await submit(client, headers, params=params, image=image)).json()["id"]
        assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "succeeded"
        (output,) = _job(job_id).outputs
        data = storage.get_object(output["key"])
        assert output["bytes"] == len(data)
        stored[str(compression)] = data
    assert stored["None"] == stored["fast"]
    assert b"fdEC" in stored["fast"] and b"fdEC" not in stored["small"]
    assert len(stored["small"]) < len(stored["fast"])
    fast, small = (np.asarray(Image.open(io.BytesIO(stored[k]))) for k in ("fast", "small"))
    assert fast.shape == (120, 160, 3) and np.array_equal(fast, small)
    refused = await submit(client, headers, params={"width": 160, "png_compression": "tiny"})
    assert refused.status_code == 422
    assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_job_past_its_deadline_expires_at_the_claim_instead_of_running(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers, data={"cancel_after": "60"})).json()["id"]
    # Its message reached a worker after the deadline (the reconciler is not running here).
    db_rows("UPDATE jobs SET cancel_after = now() - interval '1 second' WHERE id = :id", id=job_id)
    assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "skipped"
    job = _job(job_id)
    assert (job.status, job.error_code, job.attempts) == ("expired", "expired", 0)
    assert job.started_at is None and job.outputs == [] and job.in_outbox == 0
    r = await client.get(f"/v1/jobs/{job_id}", headers=headers)
    assert r.json()["status"] == "expired"


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_the_one_statement_claim_starts_only_a_job_nothing_holds_back(
    client: httpx.AsyncClient,
) -> None:
    """The claim's one statement wins a queued job whose deadline is still ahead, with every
    column as the job's row has it. A job past its deadline, a job of a suspended
    organization, a job no longer queued and another organization's job it leaves as they
    are, for the second look that says why."""
    org, headers = await keyed_org(client)
    other, _ = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    ids = [
        uuid.UUID((await submit(client, headers, data={"cancel_after": "60"})).json()["id"])
        for _ in range(3)
    ]
    db_rows("UPDATE jobs SET cancel_after = now() - interval '1 second' WHERE id = :id", id=ids[1])
    assert repository.start_if_clear_sync(org_id, ids[1], "test-worker") is None
    assert repository.start_if_clear_sync(uuid.UUID(other.id), ids[0], "test-worker") is None
    job = repository.start_if_clear_sync(org_id, ids[0], "test-worker")
    assert job is not None
    assert (job.status, job.attempts, job.stage, job.worker) == (
        "running",
        1,
        "starting",
        "test-worker",
    )
    with org_context(org_id), tenant_session(org_id) as session:
        stored = repository.get_job_sync(session, ids[0])
        assert stored is not None
        columns = [c.key for c in Job.__table__.c]
        assert {c: getattr(job, c) for c in columns} == {c: getattr(stored, c) for c in columns}
    assert repository.start_if_clear_sync(org_id, ids[0], "test-worker") is None
    db_rows("UPDATE organizations SET suspended_at = now() WHERE id = :id", id=org.id)
    assert repository.start_if_clear_sync(org_id, ids[2], "test-worker") is None
    assert [_job(str(i)).status for i in ids] == ["running", "queued", "queued"]
    assert _job(str(ids[0])).attempts == 1


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The statements a worker sends, each as its first word: a session's (besides the
    organization's binding) and the one-statement transactions' (``SELECT hm_...``)."""
    seen: list[str] = []

    def in_session(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "set_config" not in statement:
            seen.append(statement.split(None, 1)[0].upper())

    one_statement = repository.fetch_all_statement_sync

    def alone(sql: str, params: Any, **how: Any) -> Any:
        seen.append(sql.split("(", 1)[0])
        return one_statement(sql, params, **how)

    monkeypatch.setattr(repository, "fetch_all_statement_sync", alone)
    engine = sync_engine()
    event.listen(engine, "before_cursor_execute", in_session)
    yield seen
    event.remove(engine, "before_cursor_execute", in_session)


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_clear_job_is_claimed_in_one_statement(
    client: httpx.AsyncClient, statements: list[str]
) -> None:
    """The claim of a job nothing holds back is one statement, outside any session; the look
    that says why comes only when that wins nothing."""
    org, headers = await keyed_org(client)
    job_id = uuid.UUID((await submit(client, headers)).json()["id"])
    job = runner._claim(uuid.UUID(org.id), job_id, "test-worker")
    assert job is not None and job.attempts == 1
    assert statements == ["SELECT hm_start_job"]
    statements.clear()
    assert runner._claim(uuid.UUID(org.id), job_id, "another") is None
    assert statements == ["SELECT hm_start_job", "SELECT"]


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_only_the_owning_attempt_finishes_and_each_value_is_stored_as_its_column(
    client: httpx.AsyncClient,
) -> None:
    """finish_sync's UPDATE is built once per set of columns: the attempt check, the
    terminal state and every value (JSON, numbers, NULLs) land as the ORM would write them."""
    org, headers = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    job_id = uuid.UUID((await submit(client, headers)).json()["id"])
    outputs = [{"name": "output", "key": "k", "width": 3}]
    report = {"needs_review": True, "reasons": ["visible seam: median ΔE 45.5"]}
    job = repository.start_if_clear_sync(org_id, job_id, "test-worker")
    assert job is not None and job.stage == "starting"
    with org_context(org_id), tenant_session(org_id) as session:
        stale = repository.finish_sync(
            session, job_id, job.attempts + 1, JobStatus.SUCCEEDED, progress=1.0
        )
        assert not stale
        assert repository.finish_sync(
            session,
            job_id,
            job.attempts,
            JobStatus.SUCCEEDED,
            progress=1.0,
            outputs=outputs,
            report=report,
            compute_seconds=0.25,
            gpu_seconds=None,
        )
        again = repository.finish_sync(
            session, job_id, job.attempts, JobStatus.FAILED, error_code="x", error_message="y"
        )
        assert not again
    with (
        org_context(org_id),
        tenant_session(org_id) as session,
        pytest.raises(ValueError, match="not columns of jobs"),
    ):
        repository.finish_sync(session, job_id, 1, JobStatus.FAILED, owner="someone")
    (row,) = db_rows(
        "SELECT status, stage, progress, outputs, report, compute_seconds, gpu_seconds,"
        " error_code, finished_at IS NOT NULL AS finished FROM jobs WHERE id = :id",
        id=job_id,
    )
    assert tuple(row) == ("succeeded", None, 1.0, outputs, report, 0.25, None, None, True)


_ENDED = (
    "SELECT status, stage, progress, outputs, report, compute_seconds, gpu_seconds, error_code,"
    " finished_at IS NOT NULL AS finished,"
    " (SELECT status FROM quota_reservations r WHERE r.job_id = j.id) AS reservation,"
    " (SELECT array_agg(ARRAY[operation, outcome, gpu_seconds::text, images::text,"
    "  megapixels::text, user_id::text, api_key_id::text]) FROM usage_events e"
    "  WHERE e.job_id = j.id) AS usage"
    " FROM jobs j WHERE id = :id"
)
_COUNTERS = (
    "SELECT subject_type, gpu_seconds_reserved, images_reserved, gpu_seconds_used, images_used,"
    " bytes_used FROM quota_counters WHERE organization_id = :o ORDER BY subject_type, period"
)


def _counters(org_id: uuid.UUID) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db_rows(_COUNTERS, o=org_id)]


def _succeed(job: Any, *, gpu_seconds: float = 0.0) -> bool:
    return runner._finish(
        job,
        JobStatus.SUCCEEDED,
        lifecycle.Metered(gpu_seconds=gpu_seconds, images=1, megapixels=0.25, output_bytes=700),
        outputs=[{"name": "output", "key": "k", "width": 500, "height": 500, "bytes": 700}],
        report={"needs_review": False, "steps": [1, 2.5]},
        progress=1.0,
        compute_seconds=0.125,
        gpu_seconds=gpu_seconds,
    )


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_success_ends_in_one_statement_as_the_session_would_end_it(
    client: httpx.AsyncClient, statements: list[str]
) -> None:
    """A success with no webhook to record is one statement, and leaves the job, its
    reservation, its usage event and the quota counters as the session's way leaves them;
    only the owning attempt of the job's own organization ends it."""
    org, headers = await keyed_org(client)
    other, _ = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    ids = [uuid.UUID((await submit(client, headers)).json()["id"]) for _ in range(2)]
    jobs = [repository.start_if_clear_sync(org_id, i, "test-worker") for i in ids]
    assert all(j is not None for j in jobs)
    before = _counters(org_id)
    statements.clear()

    # Not the owning attempt, or another organization: nothing changes.
    stale = SimpleNamespace(**{**vars(jobs[0]), "attempts": 2})
    assert not _succeed(stale)
    strange = SimpleNamespace(**{**vars(jobs[0]), "organization_id": uuid.UUID(other.id)})
    assert not _succeed(strange)
    assert _job(str(ids[0])).status == "running" and _counters(org_id) == before
    statements.clear()

    assert _succeed(jobs[0], gpu_seconds=0.5)
    assert statements == ["SELECT hm_finish_succeeded_job"]
    after_one = _counters(org_id)
    # The same end the session's way: finish_sync, then record_end_sync.
    values = {
        "outputs": [{"name": "output", "key": "k", "width": 500, "height": 500, "bytes": 700}],
        "report": {"needs_review": False, "steps": [1, 2.5]},
        "progress": 1.0,
        "compute_seconds": 0.125,
        "gpu_seconds": 0.5,
    }
    metered = lifecycle.Metered(gpu_seconds=0.5, images=1, megapixels=0.25, output_bytes=700)
    with org_context(org_id), tenant_session(org_id) as session:
        assert repository.finish_sync(session, ids[1], 1, JobStatus.SUCCEEDED, **values)
        lifecycle.record_end_sync(session, org_id, ids[1], JobStatus.SUCCEEDED, metered)
    after_two = _counters(org_id)

    one, two = (tuple(db_rows(_ENDED, id=i)[0]) for i in ids)
    assert one == two
    assert one[:3] == ("succeeded", None, 1.0) and one[8:10] == (True, "settled")
    user, key = str(jobs[0].user_id), str(jobs[0].api_key_id)
    assert one[10] == [["resize", "succeeded", "0.5", "1", "0.25", user, key]]
    # Each end moved the counters alike: one image and 0.5 s used, 700 bytes stored.
    deltas = [
        [tuple(b - a for a, b in zip(x[1:], y[1:], strict=True)) for x, y in zip(p, q, strict=True)]
        for p, q in ((before, after_one), (after_one, after_two))
    ]
    assert deltas[0] == deltas[1]
    assert any(d[2:4] == (0.5, 1) for d in deltas[0]) and any(d[4] == 700 for d in deltas[0])
    # And once only.
    statements.clear()
    assert not _succeed(jobs[0])
    assert _counters(org_id) == after_two


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_success_with_a_webhook_to_record_ends_the_usual_way(
    client: httpx.AsyncClient, statements: list[str]
) -> None:
    """An endpoint subscribed to the success (by name or to every event) makes the one
    statement do nothing, and the session's way ends the job with its delivery; one that is
    disabled or subscribed to other events leaves the one statement to it."""
    org, headers = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    insert_endpoint(org.id, ["job.failed", "job.expired"])
    insert_endpoint(org.id, [], enabled=False)
    ids = [uuid.UUID((await submit(client, headers)).json()["id"]) for _ in range(3)]
    jobs = [repository.start_if_clear_sync(org_id, i, "test-worker") for i in ids]
    deliveries = "SELECT count(*) FROM webhook_deliveries WHERE organization_id = :o"
    statements.clear()
    assert _succeed(jobs[0])
    assert statements == ["SELECT hm_finish_succeeded_job"]
    assert db_scalar(deliveries, o=org.id) == 0
    for job, subscribed in zip(jobs[1:], (["job.succeeded"], []), strict=True):
        insert_endpoint(org.id, subscribed)
        statements.clear()
        assert _succeed(job)
        assert statements[0] == "SELECT hm_finish_succeeded_job" and "UPDATE" in statements[1:]
    assert db_scalar(deliveries, o=org.id) == 1 + 2
    assert [_job(str(i)).status for i in ids] == ["succeeded"] * 3
    reservations = (
        "SELECT array_agg(DISTINCT status) FROM quota_reservations WHERE job_id = ANY(:ids)"
    )
    assert db_scalar(reservations, ids=ids) == ["settled"]


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_an_operation_this_worker_lacks_fails_the_job_unbilled(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    monkeypatch.setattr(runner, "EXECUTORS", {})
    assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "failed"
    job = _job(job_id)
    assert (job.status, job.error_code, job.outputs) == ("failed", "operation-unavailable", [])
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :id", id=job_id) == 0


@pytest.mark.usefixtures("s3", "no_dispatch")
async def test_a_cancel_during_a_short_job_stops_it_before_its_outputs_are_stored(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel comes while the image is processed, within one check interval of the
    job's first step: the job still ends canceled, with no output and nothing billed."""
    org, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    resize = runner.EXECUTORS["resize"]

    def canceled_meanwhile(ex: Any) -> Any:
        sync_redis().set(events.cancel_key(job_id), 1, ex=60)
        return resize(ex)

    monkeypatch.setitem(runner.EXECUTORS, "resize", canceled_meanwhile)
    try:
        assert runner.run_job(uuid.UUID(org.id), uuid.UUID(job_id), "test-worker") == "canceled"
    finally:
        sync_redis().delete(events.cancel_key(job_id))
    job = _job(job_id)
    assert (job.status, job.error_code, job.outputs) == ("canceled", "canceled", [])
    billed = db_scalar(
        "SELECT coalesce(sum(images), 0) FROM usage_events WHERE job_id = :id", id=job_id
    )
    assert billed == 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The runner's clock alone (``runner.time``), not the process's."""
    fake = Clock()
    monkeypatch.setattr(runner, "time", SimpleNamespace(monotonic=fake))
    return fake


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Each time the runner asks Redis whether a job was canceled."""
    calls: list[object] = []
    real = events.cancel_requested

    def counted(job_id: uuid.UUID | str) -> bool:
        calls.append(job_id)
        return real(job_id)

    monkeypatch.setattr(runner.events, "cancel_requested", counted)
    return calls


@pytest.fixture
def job_id() -> Iterator[uuid.UUID]:
    job = uuid.uuid4()
    yield job
    sync_redis().delete(events.cancel_key(job))


def test_a_cancel_is_seen_at_the_first_step_after_the_check_interval(
    clock: Clock, asked: list[object], job_id: uuid.UUID
) -> None:
    progress = runner.ProgressReporter(uuid.uuid4(), job_id, 1, runner.Ownership())
    start, interval = clock.now, runner.CANCEL_CHECK_INTERVAL_S
    progress("reading", 0.0)  # the first step always asks
    assert len(asked) == 1
    sync_redis().set(events.cancel_key(job_id), 1, ex=60)
    clock.now = start + interval * 0.5
    progress("resizing", 0.1)
    clock.now = start + interval * 0.99
    progress("encoding", 0.9)
    assert len(asked) == 1, "steps within the interval asked Redis again"
    clock.now = start + interval * 1.01
    with pytest.raises(JobCancelled):
        progress("resizing", 0.5)
    assert len(asked) == 2


def test_a_cancel_before_the_outputs_are_stored_always_stops_the_job(
    clock: Clock, asked: list[object], job_id: uuid.UUID
) -> None:
    progress = runner.ProgressReporter(uuid.uuid4(), job_id, 1, runner.Ownership())
    progress("reading", 0.0)
    sync_redis().set(events.cancel_key(job_id), 1, ex=60)
    clock.now += runner.CANCEL_CHECK_INTERVAL_S / 10
    progress("encoding", 0.9)  # within the interval: not asked
    with pytest.raises(JobCancelled):
        progress("storing", 0.95, check_cancel=True)
    assert len(asked) == 2


def test_the_first_step_announces_the_run_and_asks_about_a_cancel(job_id: uuid.UUID) -> None:
    """One round trip: the running state and the first progress event reach a subscriber in
    that order, and a cancel already asked for stops the job there."""
    pubsub = sync_redis().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events.channel(job_id))
    try:
        runner.ProgressReporter(uuid.uuid4(), job_id, 1, runner.Ownership()).begin("reading")
        sync_redis().set(events.cancel_key(job_id), 1, ex=60)
        with pytest.raises(JobCancelled):
            runner.ProgressReporter(uuid.uuid4(), job_id, 1, runner.Ownership()).begin("reading")
        seen = []
        deadline = time.monotonic() + 5
        while len(seen) < 4 and time.monotonic() < deadline:
            # None for the subscription's own confirmation as for a timeout
            if (message := pubsub.get_message(timeout=0.5)) is not None:
                seen.append(json.loads(message["data"]))
    finally:
        pubsub.close()
    first = [
        {"type": "status", "status": "running"},
        {"type": "progress", "stage": "reading", "progress": 0.0},
    ]
    assert seen == first * 2


def test_a_first_step_without_redis_is_a_transient_error(
    monkeypatch: pytest.MonkeyPatch, job_id: uuid.UUID
) -> None:
    """Nothing has been done yet: the job goes back to the queue (TransientError), it does
    not fail."""
    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    monkeypatch.setattr(runner, "sync_redis", lambda: unreachable)
    with pytest.raises(runner.TransientError):
        runner.ProgressReporter(uuid.uuid4(), job_id, 1, runner.Ownership()).begin("reading")


def test_a_lost_lease_stops_the_job_at_its_next_step_without_asking_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[object] = []
    monkeypatch.setattr(runner.events, "cancel_requested", lambda job_id: asked.append(job_id))
    ownership = runner.Ownership()
    progress = runner.ProgressReporter(uuid.uuid4(), uuid.uuid4(), 1, ownership)
    ownership.lost = True
    with pytest.raises(JobCancelled):
        progress("reading", 0.0)
    assert asked == []
