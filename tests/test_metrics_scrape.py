"""/metrics after real jobs: requests by route and status, and the queue gauges the KEDA
triggers scale on (docker/k8s/base/scaledobjects.yaml)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from hiddenmodel.metrics import OTHER, record_stripe_push, top_n
from tests.conftest import db_scalar, unique
from tests.factories import create_endpoint, keyed_org, submit, wait_job
from tests.garments import make_scene
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.usefixtures("services")

OBSERVABILITY = Path(__file__).resolve().parents[1] / "docker" / "k8s" / "observability"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_and_the_queue_after_real_jobs(
    client: httpx.AsyncClient, services: Any, receiver: Receiver
) -> None:
    org, headers = await keyed_org(client)
    path = unique("hook")
    await create_endpoint(client, org, receiver.url(path), event_types=["job.succeeded"])
    before = await _samples(client)
    services.stop_workers()
    ids = [(await submit(client, headers)).json()["id"] for _ in range(3)]
    # Dispatched and waiting in the cpu queue's Redis list, which nobody consumes yet.
    deadline = time.monotonic() + 20
    while _queued(await _samples(client), "cpu") < 3:
        assert time.monotonic() < deadline, "the jobs never showed as queued"
        await asyncio.sleep(0.1)
    by_org = ("hm_queued_jobs_by_organization", (("organization", str(org.id)), ("queue", "cpu")))
    assert (await _samples(client))[by_org] == 3
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
    # The cluster's worker process is named test-worker-<n>@host.
    assert sum(v for (name, _), v in samples.items() if name == "hm_worker_processes") >= 1

    # What the worker processes observed, added up in Redis and served here. The counters are
    # the whole cluster's: a job left over from an earlier test may finish in the same window.
    def grew(name: str, **labels: str) -> float:
        return _value(samples, name, **labels) - _value(before, name, **labels)

    assert grew("hm_jobs_finished_total", operation="resize", queue="cpu", state="succeeded") >= 3
    assert grew("hm_job_wait_seconds_count", queue="cpu") >= 3
    assert grew("hm_job_wait_seconds_bucket", queue="cpu", le="+Inf") >= 3
    assert grew("hm_job_run_seconds_count", operation="resize") >= 3
    assert grew("hm_job_run_seconds_bucket", operation="resize", le="900.0") >= 3
    assert grew("hm_job_run_seconds_sum", operation="resize") > 0
    await receiver.wait(path, 3)
    deadline = time.monotonic() + 20
    while grew("hm_webhook_deliveries_total", outcome="succeeded") < 3:
        assert time.monotonic() < deadline, "the deliveries were not counted"
        await asyncio.sleep(0.1)
        samples = await _samples(client)


async def test_stripe_push_lag_reads_the_last_push_that_left_nothing_to_retry(
    client: httpx.AsyncClient,
) -> None:
    record_stripe_push({"due": 2, "sent": 2})
    lag = _value(await _samples(client), "hm_stripe_push_lag_seconds")
    assert 0 <= lag < 60
    record_stripe_push({"due": 1, "retrying": 1})
    samples = await _samples(client)
    assert _value(samples, "hm_stripe_push_lag_seconds") >= lag
    assert _value(samples, "hm_stripe_usage_events_total", outcome="retrying") >= 1


async def test_a_ghost_jobs_gpu_seconds_are_counted(
    client: httpx.AsyncClient, services: Any, tmp_path: Path
) -> None:
    from workers.models.tiny import make_tiny_model

    model = tmp_path / "tiny-sdxl-inpaint"
    make_tiny_model(model)
    worker = services.start_worker(
        "gpu", "--pool", "threads", "--concurrency", "4", env={"HM_MODEL_DIR": str(model)}
    )
    try:
        _, headers = await keyed_org(client)
        buf = io.BytesIO()
        make_scene("top", seed=3).pil().save(buf, "PNG")
        before = await _samples(client)
        r = await submit(
            client,
            headers,
            operation="ghost_mannequin",
            params={"size": 256, "steps": 4, "seed": 11},
            image=buf.getvalue(),
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert (await wait_job(client, headers, job_id, timeout=180))["status"] == "succeeded"
    finally:
        services.workers.remove(worker)
        worker.stop()
    metered = float(db_scalar("SELECT gpu_seconds FROM jobs WHERE id = :j", j=job_id))
    assert metered > 0
    after = await _samples(client)
    gpu = ("hm_job_gpu_seconds_total", (("operation", "ghost_mannequin"),))
    assert after[gpu] - before.get(gpu, 0.0) == pytest.approx(metered, rel=1e-6)
    ghost = {"operation": "ghost_mannequin", "queue": "gpu", "state": "succeeded"}
    finished = _value(after, "hm_jobs_finished_total", **ghost)
    assert finished - _value(before, "hm_jobs_finished_total", **ghost) == 1


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((OBSERVABILITY / "dashboard.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


async def test_the_dashboard_and_alerts_use_only_metrics_that_metrics_serves(
    client: httpx.AsyncClient, services: Any
) -> None:
    _, headers = await keyed_org(client)
    job_id = (await submit(client, headers)).json()["id"]
    assert (await wait_job(client, headers, job_id))["status"] == "succeeded"
    record_stripe_push({"due": 0})
    r = await client.get("/metrics")
    served = set()
    for family in text_string_to_metric_families(r.text):
        served.add(family.name)
        served |= {s.name for s in family.samples}
        if family.type == "counter":
            served.add(f"{family.name}_total")
        if family.type == "histogram":
            served |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
    exprs = [rule["expr"] for rule in _alert_rules()] + _dashboard_exprs()
    used = {name for expr in exprs for name in re.findall(r"\bhm_[a-z_]+", expr)}
    assert used, exprs
    assert used <= served, sorted(used - served)
    # The three alerts the operators asked for exist, each with a severity and a summary.
    names = {rule["alert"] for rule in _alert_rules()}
    assert {
        "HiddenModelQueueWaitOverTarget",
        "HiddenModelWorkerHeartbeatsMissing",
        "HiddenModelStripePushFailing",
    } <= names
    assert all(
        rule["labels"]["severity"] and rule["annotations"]["summary"] for rule in _alert_rules()
    )


def test_per_organization_series_are_bounded() -> None:
    counts = Counter({f"org-{i}": i + 1 for i in range(25)})
    top = top_n(counts, 10)
    assert len(top) == 11
    assert top[OTHER] == sum(range(1, 16))
    assert sum(top.values()) == sum(counts.values())
    assert top_n(Counter({"a": 2})) == {"a": 2}
