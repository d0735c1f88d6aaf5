"""What the README's walkthrough meets on a developer machine: checkout without Stripe, an
output whose object is gone, numbers that read right, webhooks to a local receiver, and the
demo key that `up` replaces on each run."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from hiddenmodel import provisioning, storage
from hiddenmodel.settings import Settings
from hiddenmodel.webhooks import signing
from tests.conftest import (
    Account,
    _free_port,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)
from tests.services import hiddenmodel


async def test_checkout_without_stripe_is_unavailable(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    for plan in ("pro", "free", "no-such-plan"):
        r = await client.post(
            f"/v1/orgs/{org.id}/billing/checkout", json={"plan": plan}, headers=org.owner.headers
        )
        assert_problem(r, 503, "billing-unavailable")
    assert (
        db_scalar(
            "SELECT count(*) FROM audit_events "
            "WHERE organization_id = :o AND action LIKE 'billing.%'",
            o=org.id,
        )
        == 0
    )


async def _finished_resize(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    from tests.factories import submit, wait_job

    r = await submit(client, headers)
    assert r.status_code == 202, r.text
    job = await wait_job(client, headers, r.json()["id"])
    assert job["status"] == "succeeded", job
    return job


async def test_an_output_no_longer_stored_is_not_found(
    client: httpx.AsyncClient, services: Any
) -> None:
    org = await make_org(client)
    headers = bearer((await make_key(client, org))["key"])
    job = await _finished_resize(client, headers)
    path = f"/v1/jobs/{job['id']}/outputs/output"
    assert (await client.get(path, headers=headers)).status_code == 307
    key = db_scalar("SELECT outputs->0->>'key' FROM jobs WHERE id = :j", j=job["id"])
    storage.delete_objects([key])
    assert_problem(await client.get(path, headers=headers), 404, "output-not-found")


async def test_a_jobs_gpu_seconds_read_to_the_millisecond(
    client: httpx.AsyncClient, services: Any
) -> None:
    org = await make_org(client)
    headers = bearer((await make_key(client, org))["key"])
    job = await _finished_resize(client, headers)
    db_rows("UPDATE jobs SET gpu_seconds = 3.9532000000000003 WHERE id = :j", j=job["id"])
    r = await client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert r.json()["gpu_seconds"] == 3.953, r.text
    assert "3.9532000000000003" not in r.text


async def test_admin_plan_numbers_are_rounded(client: httpx.AsyncClient) -> None:
    from tests.factories import plan_body

    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    body = plan_body(included_gpu_seconds=0.1 + 0.2, monthly_gpu_seconds=7.000000000000001)
    r = await client.post("/v1/admin/plans", json=body, headers=operator.headers)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert (plan["included_gpu_seconds"], plan["monthly_gpu_seconds"]) == (0.3, 7.0), plan
    org = await make_org(client)
    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan",
        json={"plan": body["code"], "overrides": {"monthly_gpu_seconds": 3.9532000000000003}},
        headers=operator.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["overrides"] == {"monthly_gpu_seconds": 3.953}, r.text
    assert r.json()["limits"]["monthly_gpu_seconds"] == 3.953, r.text
    r = await client.get(f"/v1/admin/orgs/{org.id}", headers=operator.headers)
    assert r.json()["overrides"] == {"monthly_gpu_seconds": 3.953}, r.text


@pytest.mark.parametrize(
    ("env", "allowed"),
    [
        ({}, True),
        ({"HM_ENVIRONMENT": "development"}, True),
        ({"HM_ENVIRONMENT": "staging"}, False),
        ({"HM_ENVIRONMENT": "production"}, False),
        ({"HM_ENVIRONMENT": "development", "HM_WEBHOOK_ALLOW_PRIVATE_URLS": "false"}, False),
        ({"HM_ENVIRONMENT": "staging", "HM_WEBHOOK_ALLOW_PRIVATE_URLS": "true"}, True),
    ],
)
def test_private_webhook_urls_are_allowed_by_default_in_development_only(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], allowed: bool
) -> None:
    monkeypatch.delenv("HM_ENVIRONMENT", raising=False)
    monkeypatch.delenv("HM_WEBHOOK_ALLOW_PRIVATE_URLS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().webhook_allow_private_urls is allowed


def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


async def test_webhook_listen_verifies_and_prints_events(
    client: httpx.AsyncClient, services: Any
) -> None:
    """The walkthrough's receiver: a test event and a job's event arrive verified over plain
    http on loopback; a message signed with another secret is refused 401 and not printed."""
    org = await make_org(client)
    port = _free_port()
    r = await client.post(
        f"/v1/orgs/{org.id}/webhook-endpoints",
        json={"url": f"http://127.0.0.1:{port}/hooks"},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    endpoint = r.json()
    listener = hiddenmodel(
        f"webhook-listen-{port}",
        "webhook-listen",
        "--secret",
        endpoint["secret"],
        "--port",
        str(port),
        "--count",
        "2",
    )
    try:
        _wait_for(lambda: "listening on" in listener.log(), listener.log())
        body = json.dumps({"type": "forged"}).encode()
        forged = signing.webhook_headers(
            [signing.generate_secret()], "msg_x", int(time.time()), body
        )
        refused = httpx.post(f"http://127.0.0.1:{port}/hooks", content=body, headers=forged)
        assert refused.status_code == 401, refused.text

        r = await client.post(
            f"/v1/orgs/{org.id}/webhook-endpoints/{endpoint['id']}/test",
            headers=org.owner.headers,
        )
        assert r.status_code == 202, r.text
        headers = bearer((await make_key(client, org))["key"])
        job = await _finished_resize(client, headers)

        deadline = time.monotonic() + 30
        while listener.alive():
            assert time.monotonic() < deadline, listener.log()
            await asyncio.sleep(0.1)
        assert listener.popen.returncode == 0, listener.log()
        events = [json.loads(line) for line in listener.log().splitlines() if line.startswith("{")]
        assert sorted(e["type"] for e in events) == ["job.succeeded", "webhook.test"], events
        assert all(e["webhook-id"] for e in events)
        assert next(e for e in events if e["type"] == "job.succeeded")["data"]["id"] == job["id"]
        assert "forged" not in listener.log().replace("refused", "")
        assert "refused /hooks" in listener.log()
    finally:
        listener.stop()


async def test_the_demo_key_replaces_the_previous_one(client: httpx.AsyncClient) -> None:
    owner: Account = await register(client)
    slug = unique("demo")
    await provisioning.create_org(slug, "Demo", owner.email)
    expires = datetime.now(UTC) + timedelta(days=7)
    first = await provisioning.replace_api_keys(
        slug, "demo key", "demo key 1", ["jobs:read"], expires
    )
    other = await provisioning.create_api_key(slug, "ci", ["jobs:read"])
    second = await provisioning.replace_api_keys(
        slug, "demo key", "demo key 2", ["jobs:read"], expires
    )
    assert_problem(await client.get("/v1/me", headers=bearer(first)), 401, "api-key-revoked")
    assert (await client.get("/v1/me", headers=bearer(second))).status_code == 200
    assert (await client.get("/v1/me", headers=bearer(other))).status_code == 200
    rows = db_rows(
        "SELECT k.name, k.revoked_at IS NULL, k.expires_at IS NOT NULL FROM api_keys k "
        "JOIN organizations o ON o.id = k.organization_id WHERE o.slug = :s ORDER BY k.name",
        s=slug,
    )
    assert [tuple(r) for r in rows] == [
        ("ci", True, False),
        ("demo key 1", False, True),
        ("demo key 2", True, True),
    ]
