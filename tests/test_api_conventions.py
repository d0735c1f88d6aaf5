"""Conventions every endpoint shares: problem+json, request ids, OpenAPI, health, metrics."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import httpx
import pytest

from tests.conftest import assert_problem


async def test_request_id_is_echoed_or_generated(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/healthz")
    assert len(r.headers["x-request-id"]) == 32
    # A hostile id is replaced, never reflected.
    r = await client.get("/healthz", headers={"X-Request-Id": "<script>" + "a" * 300})
    assert "<" not in r.headers["x-request-id"]
    r = await client.get("/v1/me", headers={"X-Request-Id": "trace-me"})
    assert_problem(r, 401)
    assert r.json()["request_id"] == "trace-me"


async def test_unknown_route_and_method_are_problems(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/v1/nope"), 404, "not-found")
    assert_problem(await client.delete("/healthz"), 405, "method-not-allowed")


async def test_openapi_is_clean(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    operation_ids = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            assert op.get("operationId"), (method, path)
            assert op.get("tags"), (method, path)
            operation_ids.append(op["operationId"])
    assert len(operation_ids) == len(set(operation_ids))
    create_org = spec["paths"]["/v1/orgs"]["post"]
    assert "application/problem+json" in str(create_org["responses"])
    schemas = spec["components"]["schemas"]
    assert schemas["OrganizationCreate"].get("examples")


async def test_health_readiness_metrics(client: httpx.AsyncClient, s3: None) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["checks"] == {"database": "ok", "redis": "ok", "storage": "ok"}
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert 'hm_http_requests_total{method="GET",route="/readyz",status="200"}' in r.text


async def test_readiness_fails_when_redis_is_unreachable(
    client: httpx.AsyncClient, monkeypatch: object
) -> None:
    from hiddenmodel import redis as hm_redis
    from hiddenmodel.settings import get_settings

    settings = get_settings()
    original = settings.redis_url
    hm_redis.async_redis.cache_clear()
    object.__setattr__(settings, "redis_url", "redis://127.0.0.1:1/0")
    try:
        r = await client.get("/readyz")
    finally:
        object.__setattr__(settings, "redis_url", original)
        hm_redis.async_redis.cache_clear()
    assert_problem(r, 503, "not-ready")
    assert r.json()["checks"]["database"] == "ok"
    assert r.json()["checks"]["redis"].startswith("unavailable")


# Counts FastAPI building a route's dependency tree, before and after the app's start-up, in a
# process of its own: the test session's app has long built every route.
_ROUTE_BUILDS = textwrap.dedent(
    """
    import asyncio, httpx, fastapi.routing
    built = [0]
    plain = fastapi.routing.get_dependant
    def counting(*args, **kwargs):
        built[0] += 1
        return plain(*args, **kwargs)
    fastapi.routing.get_dependant = counting
    from hiddenmodel.api import app as composition
    composition._freeze_startup_objects = lambda: None  # the test's process, not a server's
    async def main(start):
        app = composition.create_app()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            created = built[0]
            if start:
                async with app.router.lifespan_context(app):
                    at_start = built[0] - created
                    first, second = await requests(client)
            else:
                at_start = 0
                first, second = await requests(client)
            print(at_start, first, second)
    async def requests(client):
        counts = []
        for _ in range(2):
            before = built[0]
            # A path no route has: the router matches it against every route.
            assert (await client.get("/v1/no-such-thing")).status_code == 404
            counts.append(built[0] - before)
        return counts
    for start in (False, True):
        asyncio.run(main(start))
    """
)


def test_routes_are_built_at_start_up_not_by_the_first_request() -> None:
    """FastAPI builds a route's dependencies when the router first looks at it; the first
    request after a start made it look at every route (some 250 ms). The app's start-up
    does it, so the first request builds nothing."""
    done = subprocess.run(
        [sys.executable, "-c", _ROUTE_BUILDS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    without_start, with_start = (
        list(map(int, line.split())) for line in done.stdout.split("\n")[:2]
    )
    # Without the start-up the first request builds the routes (the check's own control)...
    assert without_start[1] > 100 and without_start[2] == 0
    # ...with it, the start-up builds them all, and no request builds any.
    assert with_start[0] >= without_start[1] and with_start[1:] == [0, 0]


def test_route_building_refuses_a_path_that_a_route_matches() -> None:
    """The build matches a path no route has; were a route to match it (a catch-all), the
    routes after it would not be built, and the start-up says so instead."""
    from fastapi import FastAPI

    from hiddenmodel.api.app import build_routes

    app = FastAPI()

    @app.get("/{rest:path}")
    def anything(rest: str) -> str:  # pragma: no cover - never dispatched
        return rest

    with pytest.raises(RuntimeError, match="a route matches"):
        build_routes(app)
