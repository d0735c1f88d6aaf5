"""The operator's worst day, bounded to about two minutes: 200 jobs while workers are killed
every second, Redis is flushed and PostgreSQL restarted (see tests/chaos.py for the stack and
the scenario, bench/recovery.py for the numbers in docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests import chaos

JOBS = 200
# From a worker's death to its job running again, at the 99th percentile.
RECOVERY_P99_BOUND_S = 10.0


@pytest.fixture(scope="module")
def stack() -> Iterator[chaos.Stack]:
    running = chaos.Stack()
    running.start()
    try:
        yield running
    finally:
        running.stop()


async def test_the_worst_day_loses_nothing_and_recovers_in_seconds(stack: chaos.Stack) -> None:
    result = await chaos.run(stack, jobs=JOBS)
    summary = result.summary()
    print(json.dumps(summary, default=str))
    # Every refusal was a 503 with Retry-After; none was a 500.
    assert result.server_errors == [], result.server_errors
    assert len(result.jobs) == JOBS and len(set(result.jobs)) == JOBS
    assert result.flushed_at is not None and result.restarted_at is not None
    assert result.kills >= 3, summary
    # Every job final within 30 s of the last fault.
    assert result.all_final_at is not None, summary

    with stack.pg.connect() as conn:
        # One job per Idempotency-Key, however often a submit was retried.
        assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (JOBS,)
        assert conn.execute("SELECT max(attempts) FROM jobs").fetchone()[0] <= 3
        succeeded = {
            r[0] for r in conn.execute("SELECT id::text FROM jobs WHERE status = 'succeeded'")
        }
        events = [r[0] for r in conn.execute("SELECT job_id::text FROM usage_events")]
        # Exactly one usage event per succeeded job, and none for any other.
        assert sorted(events) == sorted(succeeded)
        assert conn.execute(
            "SELECT count(*) FROM quota_reservations WHERE status = 'held'"
        ).fetchone() == (0,)
        # The counters say what the events say.
        used = conn.execute(
            "SELECT coalesce(sum(images_used), 0) FROM quota_counters "
            "WHERE subject_type = 'org' AND period <> DATE '1970-01-01'"
        ).fetchone()[0]
        assert (
            used == conn.execute("SELECT coalesce(sum(images), 0) FROM usage_events").fetchone()[0]
        )
        jobs = {r[0] for r in conn.execute("SELECT id::text FROM jobs")}
    assert len(succeeded) >= JOBS * 0.9, summary

    # No orphan objects: every object in the bucket belongs to a job that exists.
    keys: list[str] = []
    for page in stack.s3().get_paginator("list_objects_v2").paginate(Bucket=chaos.BUCKET):
        keys += [o["Key"] for o in page.get("Contents", [])]
    owners = {key.split("/")[3] for key in keys}
    assert owners <= jobs, sorted(owners - jobs)
    with_output = {key.split("/")[3] for key in keys if "/output." in key}
    assert succeeded <= with_output

    assert len(result.recoveries) >= 3, summary
    assert result.percentile(99) <= RECOVERY_P99_BOUND_S, summary
