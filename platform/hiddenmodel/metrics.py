"""Prometheus metrics: request counts and latencies by route template, and the job queues.

The queue gauges are read at scrape time from PostgreSQL and Redis, so every API replica
reports the same platform-wide numbers: aggregate them with ``max``, not ``sum`` (the KEDA
triggers in docker/k8s do).
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
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

log = logging.getLogger(__name__)


def top_n(counts: Tally[str], n: int = TOP_ORGANIZATIONS) -> dict[str, int]:
    """The ``n`` largest counts by name, the remainder summed under ``other``."""
    top = dict(counts.most_common(n))
    rest = sum(v for k, v in counts.items() if k not in top)
    if rest:
        top[OTHER] = rest
    return top


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
        try:
            client = sync_redis()
            waiting = {queue: int(client.llen(queue)) for queue in QUEUES}
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
        yield jobs
        yield by_org


_collector: QueueCollector | None = None


def register_queue_metrics() -> None:
    """Once per process: the API's /metrics then reports the queues."""
    global _collector
    if _collector is None:
        _collector = QueueCollector()
        REGISTRY.register(_collector)


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
