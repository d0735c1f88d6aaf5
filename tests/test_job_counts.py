"""The job counters and the daily usage roll-ups equal a recount, whatever happened.

``job_counts`` (queued and running jobs per organization, member and API key),
``job_queue_minutes`` (queued jobs per organization and minute of admission, migration 0021)
and ``usage_daily`` (usage events per organization, day, operation, member and key) are kept
by triggers in the transactions that change jobs and write usage (migration 0018). Every check
here compares them with ``COUNT(*)``/``SUM`` over the rows themselves, in one statement (one
snapshot), so a drift of a single job is a failure.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import select

from hiddenmodel.db import async_tenant_session, tenant_session
from hiddenmodel.jobs import lifecycle, repository
from hiddenmodel.jobs.models import Job, JobStatus
from tests.conftest import bearer, db_rows, db_scalar, make_key, unique
from tests.factories import Event, add_usage, keyed_org, png, submit, wait_job
from tests.polling import until

# Rows where the counters and a recount of the organizations' live jobs disagree.
COUNTER_DRIFT = """
WITH live AS (
    SELECT organization_id, status, user_id, api_key_id FROM jobs
    WHERE organization_id = ANY(CAST(:orgs AS uuid[])) AND status IN ('queued', 'running')
), recount AS (
    SELECT organization_id, 'org' AS kind, organization_id AS id, status FROM live
    UNION ALL
    SELECT organization_id, 'member', user_id, status FROM live WHERE user_id IS NOT NULL
    UNION ALL
    SELECT organization_id, 'api_key', api_key_id, status FROM live WHERE api_key_id IS NOT NULL
), expected AS (
    SELECT organization_id, kind, id, count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'running') AS running
    FROM recount GROUP BY 1, 2, 3
)
SELECT coalesce(c.organization_id, e.organization_id), coalesce(c.subject_type, e.kind),
       coalesce(c.subject_id, e.id), c.queued, c.running, e.queued, e.running
FROM (SELECT * FROM job_counts WHERE organization_id = ANY(CAST(:orgs AS uuid[]))) c
FULL JOIN expected e
  ON e.organization_id = c.organization_id AND e.kind = c.subject_type AND e.id = c.subject_id
WHERE coalesce(c.queued, 0) <> coalesce(e.queued, 0)
   OR coalesce(c.running, 0) <> coalesce(e.running, 0)
"""

# Minutes where the queued-per-minute rows and a recount of the queued jobs disagree (a row
# left at zero is a disagreement too: the trigger deletes a minute that comes to zero).
MINUTE_DRIFT = """
WITH expected AS (
    SELECT organization_id,
           date_bin('1 minute', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS minute,
           count(*) AS queued
    FROM jobs WHERE organization_id = ANY(CAST(:orgs AS uuid[])) AND status = 'queued'
    GROUP BY 1, 2
)
SELECT coalesce(q.organization_id, e.organization_id), coalesce(q.minute, e.minute), q.queued,
       e.queued
FROM (SELECT * FROM job_queue_minutes WHERE organization_id = ANY(CAST(:orgs AS uuid[]))) q
FULL JOIN expected e ON e.organization_id = q.organization_id AND e.minute = q.minute
WHERE q.queued IS DISTINCT FROM e.queued
"""

# Rows where the roll-up and a recount of the organizations' usage events disagree.
ROLL_UP_DRIFT = """
WITH expected AS (
    SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date AS day, operation, user_id,
           api_key_id, count(*) AS jobs, sum(gpu_seconds::numeric) AS gpu_seconds,
           sum(images) AS images, sum(megapixels::numeric) AS megapixels
    FROM usage_events WHERE organization_id = ANY(CAST(:orgs AS uuid[]))
    GROUP BY 1, 2, 3, 4, 5
), rolled AS (
    SELECT * FROM usage_daily WHERE organization_id = ANY(CAST(:orgs AS uuid[]))
)
SELECT e.*, r.jobs, r.gpu_seconds, r.images, r.megapixels
FROM rolled r FULL JOIN expected e
  ON e.organization_id = r.organization_id AND e.day = r.day AND e.operation = r.operation
 AND e.user_id IS NOT DISTINCT FROM r.user_id AND e.api_key_id IS NOT DISTINCT FROM r.api_key_id
WHERE r.jobs IS DISTINCT FROM e.jobs OR r.gpu_seconds IS DISTINCT FROM e.gpu_seconds
   OR r.images IS DISTINCT FROM e.images OR r.megapixels IS DISTINCT FROM e.megapixels
"""


def counter_drift(*orgs: str) -> list[Any]:
    return db_rows(COUNTER_DRIFT, orgs=list(orgs))


def minute_drift(*orgs: str) -> list[Any]:
    return db_rows(MINUTE_DRIFT, orgs=list(orgs))


def roll_up_drift(*orgs: str) -> list[Any]:
    return db_rows(ROLL_UP_DRIFT, orgs=list(orgs))


def new_user() -> str:
    return str(
        db_scalar(
            "INSERT INTO users (id, email, hashed_password, is_active, is_superuser, "
            "is_verified) VALUES (gen_random_uuid(), :e, 'x', true, false, true) RETURNING id",
            e=f"{unique()}@example.com",
        )
    )


def counts(org: str) -> dict[tuple[str, str], tuple[int, int]]:
    rows = db_rows(
        "SELECT subject_type, subject_id, queued, running FROM job_counts "
        "WHERE organization_id = :o",
        o=org,
    )
    return {(r[0], str(r[1])): (r[2], r[3]) for r in rows}


async def test_counters_equal_a_recount_through_concurrent_submits_cancels_expiries_and_runs(
    client: httpx.AsyncClient, services: Any
) -> None:
    """Two organizations, two keys each, submitting at once while the worker runs jobs,
    some canceled while queued and some expiring; the counters match a recount at every look
    and at the end, and the usage roll-up matches the usage events."""
    org_a, headers_a = await keyed_org(client)
    org_b, headers_b = await keyed_org(client)
    second_a = bearer((await make_key(client, org_a, ["jobs:read", "jobs:write"]))["key"])
    senders = [headers_a, headers_b, second_a]
    image = png(48, 32)

    async def one(i: int) -> dict[str, Any]:
        headers = senders[i % len(senders)]
        data = {"cancel_after": "1"} if i % 5 == 4 else None
        r = await submit(client, headers, image=image, data=data)
        assert r.status_code == 202, r.text
        body: dict[str, Any] = r.json()
        body["headers"] = headers
        if i % 4 == 1:
            cancel = await client.post(f"/v1/jobs/{body['id']}/cancel", headers=headers)
            assert cancel.status_code in (200, 202, 409), cancel.text
        return body

    looks: list[list[Any]] = []
    seen_live = False

    async def watch(stop: asyncio.Event) -> None:
        nonlocal seen_live
        while not stop.is_set():
            looks.append(counter_drift(org_a.id, org_b.id) + minute_drift(org_a.id, org_b.id))
            live = db_scalar(
                "SELECT coalesce(sum(queued + running), 0) FROM job_counts "
                "WHERE organization_id = ANY(CAST(:o AS uuid[]))",
                o=[org_a.id, org_b.id],
            )
            seen_live = seen_live or live > 0
            await asyncio.sleep(0.02)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    # No worker while the jobs come in, so those with a one-second deadline surely expire
    # (on a quick machine the worker would run them first); then it runs the rest.
    services.stop_workers()
    jobs = await asyncio.gather(*(one(i) for i in range(30)))
    # Every one-second deadline has passed, on the database's clock.
    deadlines = (
        "SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND cancel_after > now()"
    )
    ids = [job["id"] for job in jobs]

    async def all_passed() -> bool:
        return bool(db_scalar(deadlines, ids=ids) == 0)

    await until(all_passed, what="the deadlines passing")
    services.start_worker()
    ended = [await wait_job(client, job["headers"], job["id"], timeout=90) for job in jobs]
    stop.set()
    await watcher

    statuses = {job["status"] for job in ended}
    assert {"succeeded", "canceled", "expired"} <= statuses, statuses
    assert seen_live, "the counters never showed a live job: nothing was tested"
    assert all(drift == [] for drift in looks), [d for d in looks if d][:3]
    assert counter_drift(org_a.id, org_b.id) == []
    assert minute_drift(org_a.id, org_b.id) == []
    for org in (org_a.id, org_b.id):
        assert all(v == (0, 0) for v in counts(org).values()), counts(org)
    assert (
        db_scalar(
            "SELECT count(*) FROM usage_events WHERE organization_id = ANY(CAST(:o AS uuid[]))",
            o=[org_a.id, org_b.id],
        )
        > 0
    )
    assert roll_up_drift(org_a.id, org_b.id) == []


async def test_every_transition_moves_the_counters_of_its_subjects(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """Submit, claim, recovery's re-queue, start again, finish with its settlement, cancel,
    expiry, and a member's deletion (its jobs lose their user): after each, the rows of the
    organization, the member and the API key say what a recount says."""
    org, headers = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    key_id = str(db_scalar("SELECT id FROM api_keys WHERE organization_id = :o", o=org.id))
    ids = [uuid.UUID((await submit(client, headers)).json()["id"]) for _ in range(3)]
    assert counts(org.id)[("org", org.id)] == (3, 0)
    assert counts(org.id)[("api_key", key_id)] == (3, 0)

    # A member's own job, as a signed-in member submits it.
    user_id = new_user()
    db_rows("UPDATE jobs SET user_id = :u, api_key_id = NULL WHERE id = :j", u=user_id, j=ids[2])
    assert counts(org.id)[("member", str(user_id))] == (1, 0)
    assert counts(org.id)[("api_key", key_id)] == (2, 0)
    assert counter_drift(org.id) == []

    with tenant_session(org_id) as s:
        job = repository.start_sync(s, ids[0], "test-worker@host")
        assert job is not None
    assert counts(org.id)[("org", org.id)] == (2, 1)
    with tenant_session(org_id) as s:
        assert repository.heartbeat_sync(s, ids[0], 1, progress=0.5)
    assert counts(org.id)[("org", org.id)] == (2, 1)
    with tenant_session(org_id) as s:  # recovery: the worker died
        assert repository.requeue_running_sync(s, ids[0], 1)
    assert counts(org.id)[("org", org.id)] == (3, 0)
    assert counter_drift(org.id) == []
    assert minute_drift(org.id) == []

    with tenant_session(org_id) as s:
        assert repository.start_sync(s, ids[0], "test-worker@host") is not None
    with tenant_session(org_id) as s:
        assert repository.finish_sync(s, ids[0], 2, JobStatus.SUCCEEDED)
        lifecycle.record_end_sync(
            s, org_id, ids[0], JobStatus.SUCCEEDED, lifecycle.Metered(images=1, megapixels=0.5)
        )
    assert counts(org.id)[("org", org.id)] == (2, 0)
    assert roll_up_drift(org.id) == []

    r = await client.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    assert counts(org.id)[("org", org.id)] == (1, 0)
    assert counts(org.id)[("api_key", key_id)] == (0, 0)

    db_rows("DELETE FROM users WHERE id = :u", u=user_id)  # the job's user_id becomes null
    assert ("member", str(user_id)) not in counts(org.id) or counts(org.id)[
        ("member", str(user_id))
    ] == (0, 0)
    assert counts(org.id)[("org", org.id)] == (1, 0)

    db_rows("UPDATE jobs SET cancel_after = now() - interval '1 second' WHERE id = :j", j=ids[2])
    with tenant_session(org_id) as s:
        assert repository.expire_sync(s, ids[2])
        lifecycle.record_end_sync(s, org_id, ids[2], JobStatus.EXPIRED)
    assert counts(org.id)[("org", org.id)] == (0, 0)
    assert counter_drift(org.id) == []
    assert minute_drift(org.id) == []


async def test_a_refused_submit_leaves_the_counters_as_they_were(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """A submit refused for the queue limit is rolled back with its counter moves; the queue
    limit is read from the counters, so the next refusal still counts right."""
    org, headers = await keyed_org(client)
    db_rows(
        "INSERT INTO org_billing (organization_id, plan_id, overrides) "
        "SELECT :o, id, '{\"max_queued_jobs\": 2}' FROM plans WHERE is_default",
        o=org.id,
    )
    for _ in range(2):
        assert (await submit(client, headers)).status_code == 202
    refused = await submit(client, headers)
    assert refused.status_code == 429, refused.text
    assert counts(org.id)[("org", org.id)] == (2, 0)
    assert counter_drift(org.id) == []


def test_roll_ups_follow_events_written_and_deleted() -> None:
    """Events on several days, operations, members and keys, then a job deleted with its
    event: the roll-up equals a recount after each, to the exact decimal."""
    org_id = str(uuid.uuid4())
    db_rows(
        "INSERT INTO organizations (id, slug, name) VALUES (:o, :s, 'Roll-up')",
        o=org_id,
        s=unique("rollup"),
    )
    user = new_user()
    events = [
        Event("2026-10-31T23:59:59.999+00:00", gpu=0.1, mp=0.3),
        Event("2026-11-01T00:00:00+00:00", gpu=0.2, mp=0.1, user=user),
        Event("2026-11-01T12:00:00+00:00", gpu=0.7, mp=1e-6, user=user),
        Event("2026-11-01T13:00:00+00:00", operation="resize", gpu=0.0, images=3),
        Event("2026-11-02T01:00:00+02:00", gpu=1 / 3, mp=2 / 3),
    ]
    add_usage(org_id, *events)
    assert roll_up_drift(org_id) == []
    rows = db_scalar("SELECT count(*) FROM usage_daily WHERE organization_id = :o", o=org_id)
    assert rows == 4  # two events share a day, an operation, a member and no key
    db_rows(
        "DELETE FROM jobs WHERE id = (SELECT job_id FROM usage_events WHERE organization_id = :o "
        "AND gpu_seconds = 0.7)",
        o=org_id,
    )
    assert roll_up_drift(org_id) == []
    db_rows(
        "DELETE FROM jobs WHERE id IN (SELECT job_id FROM usage_events "
        "WHERE organization_id = :o AND created_at < '2026-11-01')",
        o=org_id,
    )
    assert roll_up_drift(org_id) == []
    assert (
        db_scalar(
            "SELECT count(*) FROM usage_daily WHERE organization_id = :o AND day = '2026-10-31'",
            o=org_id,
        )
        == 0
    )


async def test_a_claim_takes_each_organizations_first_jobs_within_its_room(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """hm_claim_dispatch reads organizations from their counters and each one's outbox from
    the front: every organization with queued jobs is served, each gets its oldest jobs, no
    more than its cap less what it has in flight, and a tight limit goes round the
    organizations first. Claims run in rolled-back transactions."""
    from sqlalchemy import create_engine, pool, text

    from tests.conftest import superuser_url

    orgs = [await keyed_org(client) for _ in range(3)]
    admitted: dict[str, list[str]] = {}
    for n, (org, headers) in zip((6, 2, 1), orgs, strict=True):
        admitted[org.id] = [(await submit(client, headers)).json()["id"] for _ in range(n)]
    first = orgs[0][0].id
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)

    def claim(cap: int, limit: int, in_flight: int = 0) -> dict[str, list[str]]:
        with engine.connect() as conn, conn.begin() as tx:
            conn.execute(
                text("DELETE FROM job_outbox WHERE organization_id <> ALL(CAST(:o AS uuid[]))"),
                {"o": list(admitted)},
            )
            for job in admitted[first][:in_flight]:  # dispatched, not started
                conn.execute(text("DELETE FROM job_outbox WHERE job_id = :j"), {"j": job})
                conn.execute(
                    text("UPDATE jobs SET dispatched_at = now() WHERE id = :j"), {"j": job}
                )
            rows = conn.execute(
                text("SELECT out_org, out_job FROM hm_claim_dispatch(:cap, :limit)"),
                {"cap": cap, "limit": limit},
            ).all()
            tx.rollback()
        got: dict[str, set[str]] = {}
        for row in rows:
            got.setdefault(str(row.out_org), set()).add(str(row.out_job))
        # In admission order, so a prefix check says "the oldest ones".
        return {o: [j for j in admitted[o] if j in jobs] for o, jobs in got.items()}

    try:
        assert claim(3, 100) == {
            first: admitted[first][:3],
            orgs[1][0].id: admitted[orgs[1][0].id],
            orgs[2][0].id: admitted[orgs[2][0].id],
        }
        assert claim(3, 100, in_flight=2)[first] == admitted[first][2:3]
        tight = claim(3, 3)
        assert {o: len(j) for o, j in tight.items()} == {o: 1 for o in admitted}
        assert all(jobs == admitted[o][:1] for o, jobs in tight.items())
    finally:
        engine.dispose()


async def test_queue_positions_of_a_page_and_of_one_job_agree(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """A listing computes its page's queue positions in one query from the counters; they
    are the jobs admitted before each, and what ``GET /v1/jobs/{id}`` says."""
    _, headers = await keyed_org(client)
    ids = [(await submit(client, headers)).json()["id"] for _ in range(4)]
    r = await client.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    expected = {ids[0]: 0, ids[2]: 1, ids[3]: 2}
    page = (await client.get("/v1/jobs", headers=headers)).json()["items"]
    assert {j["id"]: j["queue_position"] for j in page} == {**expected, ids[1]: None}
    deep = (await client.get("/v1/jobs", params={"limit": 2}, headers=headers)).json()
    second = await client.get(
        "/v1/jobs", params={"limit": 2, "cursor": deep["next_cursor"]}, headers=headers
    )
    assert [(j["id"], j["queue_position"]) for j in second.json()["items"]] == [
        (ids[1], None),
        (ids[0], 0),
    ]
    for job_id, position in expected.items():
        one = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        assert one["queue_position"] == position


async def test_queue_positions_stay_exact_across_minutes_cancels_claims_and_requeues(
    client: httpx.AsyncClient, no_dispatch: Any
) -> None:
    """Queued jobs admitted over several minutes (two at the same instant, as a batch admits
    them, two in one minute seconds apart), then canceled, claimed, re-queued and deleted out
    of admission order: after each step every queued job's position, from ``GET`` and from a
    listing, is a recount of the queued jobs admitted before it, and the per-minute rows
    equal a recount of the queue."""
    org, headers = await keyed_org(client)
    org_id = uuid.UUID(org.id)
    # (minutes before the current minute, second within it): a batch pair at one instant,
    # two minutes with two jobs each seconds apart, a minute with one job.
    admitted = [(41, 10), (41, 10), (41, 40), (40, 5), (33, 0), (33, 59), (20, 30)]
    admitted += [(7, 15), (7, 16), (3, 0), (2, 30), (1, 1)]
    ids = [
        str(
            db_scalar(
                "INSERT INTO jobs (id, organization_id, operation, operation_version, queue, "
                "params, status, inputs, request_hash, created_at) VALUES (gen_random_uuid(), "
                ":o, 'resize', '1', 'cpu', '{}', 'queued', '{}', 'test', "
                "date_bin('1 minute', now(), TIMESTAMPTZ '2000-01-01 00:00:00+00') "
                "- make_interval(mins => :m) + make_interval(secs => :s)) RETURNING id",
                o=org.id,
                m=minutes,
                s=second,
            )
        )
        for minutes, second in admitted
    ]
    ids += [(await submit(client, headers)).json()["id"] for _ in range(2)]

    async def positions_are_recounts() -> int:
        expected = {
            str(r[0]): r[1]
            for r in db_rows(
                "SELECT j.id, (SELECT count(*) FROM jobs k WHERE k.status = 'queued' "
                "AND k.organization_id = j.organization_id AND k.created_at < j.created_at) "
                "FROM jobs j "
                "WHERE j.organization_id = :o AND j.status = 'queued'",
                o=org.id,
            )
        }
        listed = await client.get(
            "/v1/jobs", params={"status": "queued", "limit": 200}, headers=headers
        )
        assert {j["id"]: j["queue_position"] for j in listed.json()["items"]} == expected
        for job_id, position in expected.items():
            one = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
            assert one["queue_position"] == position, (job_id, one["queue_position"], position)
        assert minute_drift(org.id) == []
        return len(expected)

    assert await positions_are_recounts() == 14
    # The batch pair shares a position; the job after it in the same minute comes after both.
    first = (await client.get(f"/v1/jobs/{ids[0]}", headers=headers)).json()
    second = (await client.get(f"/v1/jobs/{ids[1]}", headers=headers)).json()
    third = (await client.get(f"/v1/jobs/{ids[2]}", headers=headers)).json()
    assert (first["queue_position"], second["queue_position"], third["queue_position"]) == (0, 0, 2)

    for job_id in (ids[4], ids[9]):  # canceled from the middle, out of order
        assert (await client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)).status_code == 200
    assert await positions_are_recounts() == 12
    with tenant_session(org_id) as s:  # claimed newest first, then the oldest
        assert repository.start_sync(s, ids[12], "test-worker@host") is not None
        assert repository.start_sync(s, ids[0], "test-worker@host") is not None
    assert await positions_are_recounts() == 10
    with tenant_session(org_id) as s:  # the oldest comes back, in its own minute
        assert repository.requeue_running_sync(s, ids[0], 1)
    assert await positions_are_recounts() == 11
    # The only job of its minute leaves (no row is left at zero), and one of a pair is deleted.
    assert (await client.post(f"/v1/jobs/{ids[6]}/cancel", headers=headers)).status_code == 200
    db_rows("DELETE FROM jobs WHERE id = :j", j=ids[7])
    assert await positions_are_recounts() == 9
    assert db_scalar(
        "SELECT count(*) FROM job_queue_minutes WHERE organization_id = :o", o=org.id
    ) == len(
        {
            r[0]
            for r in db_rows(
                "SELECT date_bin('1 minute', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') "
                "FROM jobs WHERE organization_id = :o AND status = 'queued'",
                o=org.id,
            )
        }
    )

    # A page read just before one of its jobs leaves the queue: that job is counted on its own
    # (the queued jobs admitted before it), the others as ever.
    async with async_tenant_session(org_id) as session:
        page = (
            await session.scalars(
                select(Job).where(Job.status == "queued").order_by(Job.created_at, Job.id)
            )
        ).all()
        gone = page[len(page) // 2]
        db_rows("UPDATE jobs SET status = 'canceled' WHERE id = :j", j=gone.id)
        positions = await repository.queue_positions(session, page)
    recount = {
        r[0]: r[1]
        for r in db_rows(
            "SELECT j.id, (SELECT count(*) FROM jobs k WHERE k.status = 'queued' "
            "AND k.organization_id = j.organization_id AND k.created_at < j.created_at) "
            "FROM jobs j WHERE j.id = ANY(CAST(:ids AS uuid[]))",
            ids=[j.id for j in page],
        )
    }
    assert positions == recount
    assert minute_drift(org.id) == []
