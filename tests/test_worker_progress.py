"""A running job's progress steps: a cancel is seen at the first step after each check
interval, and a burst of steps asks Redis once, not once a step."""

from __future__ import annotations

import uuid

import pytest

from hiddenmodel.jobs import events
from hiddenmodel.redis import sync_redis
from workers import runner
from workers.pipelines.contracts import JobCancelled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_cancel_is_seen_at_the_first_step_after_the_check_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock, asked = Clock(), []
    monkeypatch.setattr(runner.time, "monotonic", clock)
    real = events.cancel_requested

    def counted(job_id: uuid.UUID | str) -> bool:
        asked.append(job_id)
        return real(job_id)

    monkeypatch.setattr(runner.events, "cancel_requested", counted)
    org, job = uuid.uuid4(), uuid.uuid4()
    progress = runner.ProgressReporter(org, job, 1, runner.Ownership())
    try:
        start = clock.now
        progress("reading", 0.0)  # the first step always asks
        assert len(asked) == 1
        sync_redis().set(events.cancel_key(job), 1, ex=60)
        clock.now = start + runner.CANCEL_CHECK_INTERVAL_S / 2
        progress("resizing", 0.1)
        progress("encoding", 0.9)
        assert len(asked) == 1, "steps within the interval asked Redis again"
        clock.now = start + runner.CANCEL_CHECK_INTERVAL_S
        with pytest.raises(JobCancelled):
            progress("storing", 0.95)
        assert len(asked) == 2
    finally:
        sync_redis().delete(events.cancel_key(job))


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
