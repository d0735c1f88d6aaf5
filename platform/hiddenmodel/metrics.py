"""Prometheus metrics: request counts and latencies by route template, and the job queues.

The queue gauges are read at scrape time from PostgreSQL and Redis, so every API replica
reports the same platform-wide numbers: aggregate them with ``max``, not ``sum`` (the KEDA
triggers in docker/k8s do).
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections import Counter as Tally
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter("hm_http_requests_total", "HTTP requests", ["method", "route", "status"])
HTTP_LATENCY = Histogram(
    "hm_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def _route_template(scope: Scope) -> str:
    # The router records the matched route in the scope; unmatched paths share one label so
    # that scanners cannot blow up the metric's cardinality.
    route = scope.get("route")
    return str(getattr(route, "path", "unmatched"))


class MetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _route_template(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(time.perf_counter() - start)


# Organizations named in per-organization series; the rest are summed under "other", so the
# series count stays bounded however many tenants there are.
TOP_ORGANIZATIONS = 10
OTHER = "other"
# The Celery queues (workers.celery_app.QUEUES; the platform does not import the workers).
QUEUES = ("gpu", "cpu", "webhooks", "maintenance")
# At most this many messages of a queue are read per scrape to attribute them to organizations.
QUEUED_SAMPLE = 10_000
# The heartbeat keys of live worker processes (workers.liveness.WORKER_PREFIX).
WORKER_KEYS = "hm:worker:*"

log = logging.getLogger(__name__)


def top_n(counts: Tally[str], n: int = TOP_ORGANIZATIONS) -> dict[str, int]:
    """The ``n`` largest counts by name, the remainder summed under ``other``."""
    top = dict(counts.most_common(n))
    rest = sum(v for k, v in counts.items() if k not in top)
    if rest:
        top[OTHER] = rest
    return top


def _message_org(raw: bytes | str) -> str:
    """The organization of a ``jobs.run`` message (its first argument), from the Celery
    message's base64 JSON body; ``other`` for anything else."""
    try:
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        return str(uuid.UUID(str(args[0])))
    except (ValueError, KeyError, IndexError, TypeError):
        return OTHER


class QueueCollector(Collector):
    """Jobs waiting in each Celery queue (Redis list length) and running (PostgreSQL)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from hiddenmodel.db import global_session
        from hiddenmodel.redis import sync_redis

        jobs = GaugeMetricFamily(
            "hm_jobs",
            "Jobs handed to the workers: queued (waiting in the queue) and running",
            labels=["queue", "state"],
        )
        by_org = GaugeMetricFamily(
            "hm_running_jobs_by_organization",
            f"Running jobs per organization (the top {TOP_ORGANIZATIONS}, then other)",
            labels=["queue", "organization"],
        )
        queued_by_org = GaugeMetricFamily(
            "hm_queued_jobs_by_organization",
            f"Jobs waiting in a Celery queue per organization (the top {TOP_ORGANIZATIONS}, then "
            f"other; messages past the first {QUEUED_SAMPLE} of a queue count as other)",
            labels=["queue", "organization"],
        )
        workers = GaugeMetricFamily(
            "hm_worker_processes",
            "Worker processes whose heartbeat is current, by the role their node name starts "
            "with (gpu@…, cpu@…, background@… in docker/k8s)",
            labels=["role"],
        )
        try:
            client = sync_redis()
            waiting = {queue: int(client.llen(queue)) for queue in QUEUES}
            queued: dict[str, Tally[str]] = {}
            for queue in ("gpu", "cpu"):
                messages = client.lrange(queue, 0, QUEUED_SAMPLE - 1)
                queued[queue] = Tally(_message_org(raw) for raw in messages)
                queued[queue][OTHER] += waiting[queue] - len(messages)
            roles: Tally[str] = Tally()
            for key in client.scan_iter(match=WORKER_KEYS, count=1000):
                name = key.decode() if isinstance(key, bytes) else str(key)
                roles[name.removeprefix(WORKER_KEYS[:-1]).split("@", 1)[0]] += 1
            with global_session() as session:
                rows = session.execute(
                    text("SELECT out_org, out_queue FROM hm_running_jobs()")
                ).all()
        except Exception:
            # A scrape during an outage reports the request metrics and nothing invented.
            log.warning("queue metrics unavailable", exc_info=True)
            return
        running: dict[str, Tally[str]] = {queue: Tally() for queue in QUEUES}
        for org, queue in rows:
            running.setdefault(queue, Tally())[str(org)] += 1
        for queue in QUEUES:
            jobs.add_metric([queue, "queued"], waiting[queue])
            jobs.add_metric([queue, "running"], sum(running[queue].values()))
            for org, count in top_n(running[queue]).items():
                by_org.add_metric([queue, org], count)
        for queue, orgs in queued.items():
            for org, count in top_n(+orgs).items():
                queued_by_org.add_metric([queue, org], count)
        for role, count in top_n(roles).items():
            workers.add_metric([role], count)
        yield jobs
        yield by_org
        yield queued_by_org
        yield workers


# Observations made in worker processes (any pod) are added up in one Redis hash, which the
# API's /metrics reads: workers serve no HTTP, and a pod scaled away keeps its counts. A Redis
# flush resets them, which Prometheus reads as a counter reset.
SHARED_KEY = "hm:metrics"
WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
HISTOGRAMS = {"hm_job_wait_seconds": WAIT_BUCKETS, "hm_job_run_seconds": RUN_BUCKETS}
COUNTERS = {
    "hm_jobs_finished": "Jobs finished by a worker, by operation, queue and final state",
    "hm_job_gpu_seconds": "GPU-seconds metered to finished jobs",
    "hm_webhook_deliveries": "Webhook delivery attempts by outcome",
    "hm_stripe_usage_events": "Usage events handled by the Stripe push, by outcome",
}
STRIPE_LAST_SUCCESS = "hm_stripe_push_last_success"


@lru_cache(maxsize=4096)
def _field(name: str, **labels: str) -> str:
    # Remembered: a finished job names 28 fields, of a few hundred there are.
    return json.dumps([name, sorted(labels.items())])


# One _add in one command. A pipeline of one HINCRBYFLOAT a field cost a worker about
# 0.43 ms of CPU a job (a finished job adds 28 fields), most of it packing and parsing the
# commands; the script takes about 0.15 ms, most of that its one round trip.
_ADD = """
local n = tonumber(ARGV[1])
for i = 2, 2 * n, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 2 * n + 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return n
"""


@lru_cache
def _add_script() -> Any:
    from hiddenmodel.redis import sync_redis

    # EVALSHA: the script travels to Redis once per process, not with every call.
    return sync_redis().register_script(_ADD)


def _add(increments: dict[str, float], **sets: float) -> None:
    """Add to the shared hash; a metric never fails the work it describes."""
    from hiddenmodel.redis import sync_redis

    args: list[str | float] = [len(increments)]
    for field, amount in increments.items():
        args += [field, amount]
    for field, value in sets.items():
        args += [field, value]
    try:
        _add_script()(keys=[SHARED_KEY], args=args, client=sync_redis())
    except Exception:
        log.debug("metrics not recorded", exc_info=True)


def _observe(increments: dict[str, float], name: str, value: float, **labels: str) -> None:
    for bound in HISTOGRAMS[name]:
        if value <= bound:
            increments[_field(f"{name}_bucket", le=str(bound), **labels)] = 1
    increments[_field(f"{name}_bucket", le="+Inf", **labels)] = 1
    increments[_field(f"{name}_sum", **labels)] = value
    increments[_field(f"{name}_count", **labels)] = 1


def record_job_end(
    operation: str, queue: str, state: str, wait_s: float, run_s: float, gpu_s: float
) -> None:
    """A job a worker finished: its final state, how long it waited and ran, its GPU time."""
    increments = {_field("hm_jobs_finished", operation=operation, queue=queue, state=state): 1.0}
    _observe(increments, "hm_job_wait_seconds", max(wait_s, 0.0), queue=queue)
    _observe(increments, "hm_job_run_seconds", max(run_s, 0.0), operation=operation)
    if gpu_s:
        increments[_field("hm_job_gpu_seconds", operation=operation)] = gpu_s
    _add(increments)


def record_webhook_delivery(outcome: str) -> None:
    _add({_field("hm_webhook_deliveries", outcome=outcome): 1.0})


def record_stripe_push(counts: dict[str, int]) -> None:
    """One push run's counts; a run that left nothing to retry marks the push as current."""
    increments = {
        _field("hm_stripe_usage_events", outcome=k): float(v)
        for k, v in counts.items()
        if k != "due"
    }
    if counts.get("retrying", 0) == 0:
        _add(increments, **{STRIPE_LAST_SUCCESS: time.time()})
    else:
        _add(increments)


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class SharedCollector(Collector):
    """The counters and histograms that worker processes add to Redis."""

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily | GaugeMetricFamily]:
        from hiddenmodel.redis import sync_redis

        try:
            raw = sync_redis().hgetall(SHARED_KEY)
        except Exception:
            log.warning("shared metrics unavailable", exc_info=True)
            return
        series: Series = {}
        last_success: float | None = None
        for field, amount in raw.items():
            key = field.decode() if isinstance(field, bytes) else str(field)
            if key == STRIPE_LAST_SUCCESS:
                last_success = float(amount)
                continue
            name, labels = json.loads(key)
            series[(name, tuple((k, v) for k, v in labels))] = float(amount)
        yield from _counters(series)
        yield from _histograms(series)
        if last_success is not None:
            yield GaugeMetricFamily(
                "hm_stripe_push_lag_seconds",
                "Seconds since a usage push to Stripe last left nothing to retry",
                value=max(time.time() - last_success, 0.0),
            )


def _counters(series: Series) -> Iterator[CounterMetricFamily]:
    for name, help_text in COUNTERS.items():
        label_names = sorted({k for (n, labels) in series if n == name for k, _ in labels})
        family = CounterMetricFamily(name, help_text, labels=label_names)
        for (n, labels), amount in series.items():
            if n == name:
                family.add_metric([dict(labels)[k] for k in label_names], amount)
        yield family


def _histograms(series: Series) -> Iterator[HistogramMetricFamily]:
    for name, bounds in HISTOGRAMS.items():
        label = "queue" if name == "hm_job_wait_seconds" else "operation"
        family = HistogramMetricFamily(
            name, f"{name.removeprefix('hm_')} of finished jobs", labels=[label]
        )
        observed = {dict(labels)[label] for (n, labels) in series if n == f"{name}_count"}
        for value in sorted(observed):
            buckets = [
                (
                    le,
                    series.get(
                        (f"{name}_bucket", tuple(sorted({"le": le, label: value}.items()))), 0.0
                    ),
                )
                for le in [str(b) for b in bounds] + ["+Inf"]
            ]
            family.add_metric([value], buckets, series.get((f"{name}_sum", ((label, value),)), 0.0))
        yield family


_collector: QueueCollector | None = None


def register_queue_metrics() -> None:
    """Once per process: the API's /metrics then reports the queues."""
    global _collector
    if _collector is None:
        _collector = QueueCollector()
        REGISTRY.register(_collector)
        REGISTRY.register(SharedCollector())


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
