"""/metrics after real jobs: requests by route and status, and the queue gauges the KEDA
triggers scale on (docker/k8s/base/scaledobjects.yaml)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hiddenmodel.metrics import OTHER, top_n
from tests.factories import keyed_org, submit, wait_job

pytestmark = pytest.mark.usefixtures("services")


async def _samples(
    client: httpx.AsyncClient,
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = await client.get("/metrics")
    assert r.status_code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _queued(samples: dict[Any, float], queue: str) -> float:
    return samples[("hm_jobs", (("queue", queue), ("state", "queued")))]


async def test_metrics_count_requests_and_the_queue_after_real_jobs(
    client: httpx.AsyncClient, services: Any
) -> None:
    _, headers = await keyed_org(client)
    services.stop_workers()
    ids = [(await submit(client, headers)).json()["id"] for _ in range(3)]
    # Dispatched and waiting in the cpu queue's Redis list, which nobody consumes yet.
    deadline = time.monotonic() + 20
    while _queued(await _samples(client), "cpu") < 3:
        assert time.monotonic() < deadline, "the jobs never showed as queued"
        await asyncio.sleep(0.1)
    services.start_worker()
    for job_id in ids:
        assert (await wait_job(client, headers, job_id))["status"] == "succeeded"
    samples = await _samples(client)
    assert _queued(samples, "cpu") == 0
    assert samples[("hm_jobs", (("queue", "gpu"), ("state", "running")))] == 0
    submitted = (
        "hm_http_requests_total",
        (("method", "POST"), ("route", "/v1/jobs"), ("status", "202")),
    )
    assert samples[submitted] >= 3


def test_per_organization_series_are_bounded() -> None:
    counts = Counter({f"org-{i}": i + 1 for i in range(25)})
    top = top_n(counts, 10)
    assert len(top) == 11
    assert top[OTHER] == sum(range(1, 16))
    assert sum(top.values()) == sum(counts.values())
    assert top_n(Counter({"a": 2})) == {"a": 2}
