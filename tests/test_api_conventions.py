"""Conventions every endpoint shares: problem+json, request ids, OpenAPI, health, metrics."""

from __future__ import annotations

import httpx

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
