"""Quotas and rate limits: atomic reservations, settlement, refusals that explain themselves."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from hiddenmodel import storage
from hiddenmodel.redis import sync_redis
from tests.conftest import Org, assert_problem, bearer, db_rows, db_scalar, make_key, make_org
from tests.factories import big_png, keyed_org, png, set_overrides, submit, wait_job, wait_status

pytestmark = pytest.mark.usefixtures("services")


def counters(org: Org) -> dict[str, Any]:
    row = db_rows(
        "SELECT images_used, images_reserved, gpu_seconds_used, gpu_seconds_reserved "
        "FROM quota_counters WHERE organization_id = :o AND subject_type = 'org' "
        "AND period <> DATE '1970-01-01'",
        o=org.id,
    )[0]
    return dict(
        zip(("images_used", "images_reserved", "gpu_used", "gpu_reserved"), row, strict=True)
    )


async def test_concurrent_submits_admit_exactly_what_fits(
    client: httpx.AsyncClient, services: Any
) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org, monthly_images=10)
    services.stop_workers()
    image = png(16, 16)
    results = await asyncio.gather(
        *[submit(client, headers, image=image, params={"width": 8}) for _ in range(100)]
    )
    codes = sorted(r.status_code for r in results)
    assert codes.count(202) == 10, codes
    assert codes.count(429) == 90, codes
    refused = next(r for r in results if r.status_code == 429)
    assert_problem(refused, 429, "quota-exceeded")
    body = refused.json()
    assert body["limit"] == "monthly_images" and body["limit_value"] == 10
    assert body["used"] + body["reserved"] == 10 and body["requested"] == 1
    assert body["resets_at"] and int(refused.headers["retry-after"]) > 0
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 10
    assert (
        db_scalar(
            "SELECT count(*) FROM quota_reservations WHERE organization_id = :o "
            "AND status = 'held'",
            o=org.id,
        )
        == 10
    )
    # Refused submissions left no objects behind.
    keys = storage.list_keys(storage.org_prefix(uuid.UUID(org.id)))
    assert len({k.split("/")[3] for k in keys}) == 10
    services.start_worker()
    for r in results:
        if r.status_code == 202:
            assert (await wait_job(client, headers, r.json()["id"]))["status"] == "succeeded"
    assert counters(org)["images_used"] == 10 and counters(org)["images_reserved"] == 0


async def test_finished_job_settles_and_writes_one_usage_event(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    r = await submit(client, headers, params={"width": 40, "height": 30, "mode": "exact"})
    done = await wait_job(client, headers, r.json()["id"])
    assert done["status"] == "succeeded"
    events = db_rows(
        "SELECT outcome, images, megapixels, gpu_seconds, operation, api_key_id FROM "
        "usage_events WHERE job_id = :j",
        j=done["id"],
    )
    assert len(events) == 1
    outcome, images, megapixels, gpu, operation, key_id = events[0]
    assert (outcome, images, operation) == ("succeeded", 1, "resize")
    assert megapixels == pytest.approx(40 * 30 / 1e6) and gpu == 0.0 and key_id is not None
    assert (
        db_scalar("SELECT status FROM quota_reservations WHERE job_id = :j", j=done["id"])
        == "settled"
    )
    assert counters(org) == {
        "images_used": 1,
        "images_reserved": 0,
        "gpu_used": 0.0,
        "gpu_reserved": 0.0,
    }


async def test_unbilled_outcomes_release_and_write_no_usage(
    client: httpx.AsyncClient, services: Any
) -> None:
    org, headers = await keyed_org(client)
    # Fails in the worker: upscaling beyond what resize allows.
    r = await submit(client, headers, image=png(16, 16), params={"width": 4000})
    failed = await wait_job(client, headers, r.json()["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "resize-not-possible"
    services.stop_workers()
    canceled = (await submit(client, headers)).json()
    await client.post(f"/v1/jobs/{canceled['id']}/cancel", headers=headers)
    expired = (await submit(client, headers, data={"cancel_after": "1"})).json()
    await wait_status(client, headers, expired["id"], "expired", timeout=15)
    for job_id in (failed["id"], canceled["id"], expired["id"]):
        assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id) == 0
        assert (
            db_scalar("SELECT status FROM quota_reservations WHERE job_id = :j", j=job_id)
            == "released"
        )
    assert counters(org)["images_reserved"] == 0 and counters(org)["images_used"] == 0


async def test_killed_worker_leaks_no_reservation(client: httpx.AsyncClient, services: Any) -> None:
    org, headers = await keyed_org(client)
    r = await submit(
        client, headers, image=big_png(), params={"width": 4800, "height": 4800, "mode": "fit"}
    )
    job_id = r.json()["id"]
    await wait_status(client, headers, job_id, "running")
    for worker in services.workers:
        worker.kill()
    services.workers = []
    # Nobody runs it now: the reconciler notices the lost lease and requeues; give up on it
    # for good by exhausting attempts, so the reservation must be released, not leaked.
    db_rows("UPDATE jobs SET attempts = 99 WHERE id = :j", j=job_id)
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        status = db_scalar("SELECT status FROM jobs WHERE id = :j", j=job_id)
        if status == "failed":
            break
        await asyncio.sleep(0.2)
    assert db_scalar("SELECT error_code FROM jobs WHERE id = :j", j=job_id) == "worker-lost"
    assert (
        db_scalar("SELECT status FROM quota_reservations WHERE job_id = :j", j=job_id) == "released"
    )
    assert counters(org)["images_reserved"] == 0
    services.start_worker()


async def test_queued_and_storage_limits(client: httpx.AsyncClient, services: Any) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org, max_queued_jobs=2)
    services.stop_workers()
    assert (await submit(client, headers)).status_code == 202
    assert (await submit(client, headers)).status_code == 202
    r = await submit(client, headers)
    assert_problem(r, 429, "quota-exceeded")
    assert r.json()["limit"] == "max_queued_jobs" and "resets_at" not in r.json()
    services.start_worker()
    org2, headers2 = await keyed_org(client)
    set_overrides(org2, storage_bytes=len(png()) + 10)
    assert (await submit(client, headers2)).status_code == 202
    r = await submit(client, headers2)
    assert_problem(r, 429, "quota-exceeded")
    assert r.json()["limit"] == "storage_bytes"


async def test_sub_limits_per_key_and_limits_view(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    key = await make_key(client, org, ["jobs:write", "jobs:read", "usage:read"])
    r = await client.put(
        f"/v1/orgs/{org.id}/quota-limits/api-keys/{key['id']}",
        json={"monthly_images": 1},
        headers=org.owner.headers,
    )
    assert r.status_code == 200 and r.json()["monthly_images"] == 1
    assert_problem(
        await client.put(
            f"/v1/orgs/{org.id}/quota-limits/api-keys/{uuid.uuid4()}",
            json={"monthly_images": 1},
            headers=org.owner.headers,
        ),
        404,
    )
    assert_problem(
        await client.put(
            f"/v1/orgs/{org.id}/quota-limits/api-keys/{key['id']}",
            json={"monthly_images": -1},
            headers=org.owner.headers,
        ),
        422,
    )
    limited = bearer(key["key"])
    assert (await submit(client, limited)).status_code == 202
    r = await submit(client, limited)
    assert_problem(r, 429, "quota-exceeded")
    assert r.json()["subject"] == "api_key"
    # The organization's other keys are not affected.
    assert (await submit(client, headers)).status_code == 202
    view = (await client.get("/v1/usage/limits", headers=limited)).json()
    by = {(row["subject"], row["name"]): row for row in view["limits"]}
    assert by[("api_key", "monthly_images")]["limit"] == 1
    assert (
        by[("api_key", "monthly_images")]["used"] + by[("api_key", "monthly_images")]["reserved"]
        == 1
    )
    assert by[("api_key", "monthly_images")]["remaining"] == 0
    assert by[("org", "monthly_images")]["limit"] is None
    assert view["plan"] == "free"
    assert_problem(await client.get("/v1/usage/limits", headers=headers), 403, "missing-scope")


async def test_dry_run_prices_and_creates_nothing(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    r = await submit(client, headers, data={"dry_run": "true"})
    assert r.status_code == 200, r.text
    quote = r.json()
    assert quote["dry_run"] is True and quote["estimate"] == {"gpu_seconds": 0.0, "images": 1}
    assert quote["price"] == {"amount": "0.000000", "currency": "usd"} and quote["plan"] == "free"
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []
    assert_problem(
        await submit(client, headers, data={"dry_run": "true"}, params={"width": 0}),
        422,
        "invalid-params",
    )


async def test_a_dry_run_applies_the_submit_rules_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org, monthly_images=1)
    first = await submit(client, headers)
    assert first.status_code == 202
    # Counters move while the first job runs (reserved, then used): compare once it is done.
    await wait_job(client, headers, first.json()["id"])
    before = counters(org)
    r = await submit(client, headers, data={"dry_run": "true"})
    assert_problem(r, 429, "quota-exceeded")
    body = r.json()
    assert body["limit"] == "monthly_images" and body["subject"] == "org"
    assert body["limit_value"] == 1 and body["requested"] == 1
    assert body["used"] + body["reserved"] == 1
    assert "resets_at" in body and int(r.headers["Retry-After"]) > 0
    assert counters(org) == before
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 1
    assert db_scalar("SELECT count(*) FROM job_outbox WHERE organization_id = :o", o=org.id) <= 1
    assert (
        db_scalar("SELECT count(*) FROM quota_reservations WHERE organization_id = :o", o=org.id)
        == 1
    )


async def test_past_due_refuses_after_grace(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org)
    db_rows(
        "UPDATE org_billing SET past_due_since = now() - interval '30 days' "
        "WHERE organization_id = :o",
        o=org.id,
    )
    assert_problem(await submit(client, headers), 402, "payment-past-due")
    db_rows(
        "UPDATE org_billing SET past_due_since = now() - interval '1 day' "
        "WHERE organization_id = :o",
        o=org.id,
    )
    assert (await submit(client, headers)).status_code == 202


async def test_rate_limits_per_key_and_org(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org, requests_per_minute=5, org_requests_per_minute=8)
    sync_redis().delete(*[k for k in sync_redis().scan_iter("hm:rl:*")] or ["none"])
    seen = []
    for _ in range(5):
        r = await client.get("/v1/jobs", headers=headers)
        seen.append(r.status_code)
        assert r.headers["ratelimit-policy"] == '"api_key";q=5;w=60, "org";q=8;w=60'
    assert seen == [200] * 5
    assert r.headers["ratelimit"].startswith('"api_key";r=0;')
    r = await client.get("/v1/jobs", headers=headers)
    assert_problem(r, 429, "rate-limited")
    assert int(r.headers["retry-after"]) >= 1 and r.json()["subject"] == "api_key"
    # RateLimit names the limit that refused and, as t, the same wait as Retry-After.
    assert r.headers["ratelimit"] == f'"api_key";r=0;t={r.headers["retry-after"]}'
    # Another key of the same org has its own budget, until the org's runs out.
    other = bearer((await make_key(client, org, ["jobs:read"]))["key"])
    assert [(await client.get("/v1/jobs", headers=other)).status_code for _ in range(3)] == [
        200,
        200,
        200,
    ]
    r = await client.get("/v1/jobs", headers=other)
    assert_problem(r, 429, "rate-limited")
    assert r.json()["subject"] == "org"


async def test_member_sub_limits_follow_the_keys_they_created(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    r = await client.put(
        f"/v1/orgs/{org.id}/quota-limits/members/{org.owner.id}",
        json={"monthly_images": 1},
        headers=org.owner.headers,
    )
    assert r.status_code == 200
    assert (await submit(client, headers)).status_code == 202
    # Another key of the same creator draws from the same member budget.
    other = bearer((await make_key(client, org, ["jobs:write"]))["key"])
    r = await submit(client, other)
    assert_problem(r, 429, "quota-exceeded")
    assert r.json()["subject"] == "member"
    job_user = db_scalar("SELECT user_id FROM jobs WHERE organization_id = :o LIMIT 1", o=org.id)
    assert str(job_user) == org.owner.id


def decimals(value: Any) -> int:
    """How many decimals a JSON number was written with (parsed as a Decimal)."""
    assert isinstance(value, int | Decimal), value
    exponent = Decimal(value).as_tuple().exponent
    assert isinstance(exponent, int)
    return max(0, -exponent)


async def test_limits_view_reads_exact_decimals_despite_float_noise(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    reader = bearer((await make_key(client, org, ["usage:read"]))["key"])
    set_overrides(org, monthly_gpu_seconds=10, monthly_images=50)
    # What settling three jobs and reserving then releasing two leaves in the float counters:
    # 1.3177 + 1.3177 + 1.3178 = 3.9532000000000003 used, 2.7755575615628914e-17 reserved.
    db_rows(
        "INSERT INTO quota_counters (organization_id, subject_type, subject_id, period, "
        "gpu_seconds_used, gpu_seconds_reserved, images_used, images_reserved, bytes_used) "
        "VALUES (:o, 'org', :o, date_trunc('month', now() AT TIME ZONE 'UTC')::date, "
        "CAST(1.3177 AS float8) + CAST(1.3177 AS float8) + CAST(1.3178 AS float8), "
        "CAST(0.1 AS float8) + CAST(0.2 AS float8) - CAST(0.1 AS float8) - CAST(0.2 AS float8), "
        "3, 0, 0)",
        o=org.id,
    )
    assert db_rows(
        "SELECT gpu_seconds_used::text, gpu_seconds_reserved::text FROM quota_counters "
        "WHERE organization_id = :o",
        o=org.id,
    ) == [("3.9532000000000003", "2.7755575615628914e-17")]
    r = await client.get("/v1/usage/limits", headers=reader)
    assert r.status_code == 200, r.text
    assert "e-" not in r.text.lower()
    view = json.loads(r.text, parse_float=Decimal)
    by = {(row["subject"], row["name"]): row for row in view["limits"]}
    gpu = by[("org", "monthly_gpu_seconds")]
    assert gpu["limit"] == 10 and gpu["used"] == Decimal("3.953")
    assert gpu["reserved"] == 0 and gpu["remaining"] == Decimal("6.047")
    images = by[("org", "monthly_images")]
    assert (images["limit"], images["used"], images["reserved"], images["remaining"]) == (
        50,
        3,
        0,
        47,
    )
    for row in view["limits"]:
        numbers = [row[k] for k in ("limit", "used", "reserved", "remaining") if row[k] is not None]
        if row["name"] == "monthly_gpu_seconds":
            assert all(decimals(n) <= 3 for n in numbers), row
        else:
            # Counts and bytes are whole numbers, written without a decimal point.
            assert all(type(n) is int for n in numbers), row


async def test_caps_cannot_exceed_the_organizations_limits(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    key = await make_key(client, org, ["jobs:write"])
    set_overrides(org, monthly_images=500, monthly_gpu_seconds=100.5, requests_per_minute=60)
    key_path = f"/v1/orgs/{org.id}/quota-limits/api-keys/{key['id']}"
    member_path = f"/v1/orgs/{org.id}/quota-limits/members/{org.owner.id}"

    r = await client.put(key_path, json={"monthly_images": 501}, headers=org.owner.headers)
    assert_problem(r, 422, "sub-limit-above-plan")
    body = r.json()
    assert (body["limit"], body["value"], body["organization_limit"]) == (
        "monthly_images",
        501,
        500,
    )
    assert "monthly_images" in body["detail"] and "500" in body["detail"]
    r = await client.put(
        member_path,
        json={"monthly_gpu_seconds": 100.6, "requests_per_minute": 61, "max_queued_jobs": 10**6},
        headers=org.owner.headers,
    )
    assert_problem(r, 422, "sub-limit-above-plan")
    assert [(e["limit"], e["organization_limit"]) for e in r.json()["exceeded"]] == [
        ("monthly_gpu_seconds", 100.5),
        ("requests_per_minute", 60),
    ]
    # Refused caps are not stored.
    assert (await client.get(key_path, headers=org.owner.headers)).json()["monthly_images"] is None

    # Equal to the organization's limit, or below it, is a cap; a limit the organization does
    # not have (max_queued_jobs: unlimited) takes any cap.
    r = await client.put(
        key_path,
        json={"monthly_images": 500, "monthly_gpu_seconds": 100.5, "max_queued_jobs": 10**6},
        headers=org.owner.headers,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["monthly_images"], r.json()["max_queued_jobs"]) == (500, 10**6)
    r = await client.put(
        member_path,
        json={"monthly_gpu_seconds": 99.25, "requests_per_minute": 60},
        headers=org.owner.headers,
    )
    assert r.status_code == 200, r.text
