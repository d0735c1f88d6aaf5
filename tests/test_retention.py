"""Retention: the plan's default, an organization's shorter setting, the sweep that deletes
the objects of jobs past it (with a clock the test moves), 410 for an expired output, and the
bucket's lifecycle rules on the tenant tags."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest

from hiddenmodel import storage
from hiddenmodel.retention import sweep
from hiddenmodel.settings import get_settings
from tests.conftest import (
    Org,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import submit, wait_job

FREE_PLAN_DAYS = 30


async def _set(client: httpx.AsyncClient, org: Org, days: int | None) -> httpx.Response:
    return await client.put(
        f"/v1/orgs/{org.id}/retention", json={"days": days}, headers=org.owner.headers
    )


async def test_an_organization_can_only_shorten_its_plans_retention(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    r = await client.get(f"/v1/orgs/{org.id}/retention", headers=org.owner.headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"plan_days": FREE_PLAN_DAYS, "days": None, "effective_days": 30}

    r = await _set(client, org, FREE_PLAN_DAYS + 1)
    assert_problem(r, 422, "retention-above-plan")
    assert r.json()["plan_days"] == FREE_PLAN_DAYS and r.json()["days"] == 31
    for bad in (0, -1, 36501, "7", 2.5):
        r = await client.put(
            f"/v1/orgs/{org.id}/retention", json={"days": bad}, headers=org.owner.headers
        )
        assert r.status_code == 422, (bad, r.text)
    r = await client.put(
        f"/v1/orgs/{org.id}/retention", json={"days": 7, "extra": 1}, headers=org.owner.headers
    )
    assert r.status_code == 422, r.text
    assert db_scalar("SELECT count(*) FROM org_retention WHERE organization_id = :o", o=org.id) == 0

    r = await _set(client, org, 7)
    assert r.status_code == 200, r.text
    assert r.json() == {"plan_days": FREE_PLAN_DAYS, "days": 7, "effective_days": 7}
    r = await _set(client, org, 5)
    assert r.json()["effective_days"] == 5
    actions = db_rows(
        "SELECT data FROM audit_events WHERE organization_id = :o AND action = 'retention.set' "
        "ORDER BY created_at",
        o=org.id,
    )
    assert [a[0] for a in actions] == [
        {"days": 7, "previous": None},
        {"days": 5, "previous": 7},
    ]
    r = await _set(client, org, None)
    assert r.json() == {"plan_days": FREE_PLAN_DAYS, "days": None, "effective_days": 30}

    # Reading takes any member or key of the organization; changing it, an admin.
    reader = await make_key(client, org, ["jobs:read"])
    r = await client.get(f"/v1/orgs/{org.id}/retention", headers=bearer(reader["key"]))
    assert r.status_code == 200
    r = await client.put(
        f"/v1/orgs/{org.id}/retention", json={"days": 3}, headers=bearer(reader["key"])
    )
    assert_problem(r, 403)
    stranger = await make_org(client)
    r = await client.get(f"/v1/orgs/{org.id}/retention", headers=stranger.owner.headers)
    assert r.status_code in (403, 404)


async def test_a_plan_without_retention_keeps_forever_unless_the_org_says_otherwise(
    client: httpx.AsyncClient,
) -> None:
    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    code = unique("plan")
    r = await client.post(
        "/v1/admin/plans",
        json={"code": code, "name": "Archive", "price_per_gpu_second": "0.001"},
        headers=operator.headers,
    )
    assert r.status_code == 201, r.text
    assert r.json()["retention_days"] is None
    org = await make_org(client)
    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan", json={"plan": code}, headers=operator.headers
    )
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/orgs/{org.id}/retention", headers=org.owner.headers)
    assert r.json() == {"plan_days": None, "days": None, "effective_days": None}
    r = await _set(client, org, 36500)
    assert r.json()["effective_days"] == 36500

    # The plan gains a retention shorter than the organization's own: the plan's applies.
    r = await client.patch(
        f"/v1/admin/plans/{code}", json={"retention_days": 90}, headers=operator.headers
    )
    assert r.status_code == 200 and r.json()["retention_days"] == 90
    r = await client.get(f"/v1/orgs/{org.id}/retention", headers=org.owner.headers)
    assert r.json() == {"plan_days": 90, "days": 36500, "effective_days": 90}
    r = await client.patch(
        f"/v1/admin/plans/{code}", json={"retention_days": 0}, headers=operator.headers
    )
    assert r.status_code == 422


def _keys(org_id: str, job_id: str) -> list[str]:
    return storage.list_keys(f"{storage.org_prefix(uuid.UUID(org_id))}jobs/{job_id}/")


async def _finished_job(
    client: httpx.AsyncClient, org: Org
) -> tuple[dict[str, Any], dict[str, str]]:
    key = await make_key(client, org, ["jobs:read", "jobs:write"])
    headers = bearer(key["key"])
    r = await submit(client, headers)
    assert r.status_code == 202, r.text
    job = await wait_job(client, headers, r.json()["id"])
    assert job["status"] == "succeeded", job
    assert len(_keys(org.id, job["id"])) == 2  # the input and the output
    return job, headers


@pytest.mark.usefixtures("services")
async def test_the_sweep_deletes_objects_past_retention_and_keeps_the_job(
    client: httpx.AsyncClient,
) -> None:
    short, long_ = await make_org(client), await make_org(client)
    assert (await _set(client, short, 2)).status_code == 200
    assert (await _set(client, long_, 10)).status_code == 200
    job, headers = await _finished_job(client, short)
    kept, kept_headers = await _finished_job(client, long_)
    finished = datetime.fromisoformat(job["timings"]["finished_at"])

    early = sweep.expire_due_jobs(now=finished + timedelta(days=1, hours=23))
    assert early.finished
    assert len(_keys(short.id, job["id"])) == 2

    done = sweep.expire_due_jobs(now=finished + timedelta(days=3), batch=1)
    assert done.finished and done.jobs >= 1 and done.refused == 0
    assert _keys(short.id, job["id"]) == []
    assert len(_keys(long_.id, kept["id"])) == 2

    # The job stays, with its outputs described and marked expired.
    r = await client.get(f"/v1/jobs/{job['id']}", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "succeeded" and body["expired_at"] is not None
    assert [o["name"] for o in body["outputs"]] == ["output"]
    assert body["outputs"][0]["url"] is None and body["outputs"][0]["url_expires_at"] is None
    r = await client.get(f"/v1/jobs/{job['id']}/outputs/output", headers=headers)
    assert_problem(r, 410, "output-expired")
    assert r.json()["retention_days"] == 2 and "2 days" in r.json()["detail"]
    # Billing history stays: the usage event is never deleted.
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job["id"]) == 1
    r = await client.get(f"/v1/jobs/{kept['id']}", headers=kept_headers)
    assert r.json()["expired_at"] is None and r.json()["outputs"][0]["url"]

    # Nothing left to do at the same time; the longer retention's turn comes later.
    again = sweep.expire_due_jobs(now=finished + timedelta(days=3))
    assert again.finished and again.jobs == 0
    later = sweep.expire_due_jobs(now=finished + timedelta(days=11))
    assert later.jobs >= 1 and _keys(long_.id, kept["id"]) == []
    expired = db_scalar("SELECT expired_at FROM jobs WHERE id = :j", j=kept["id"])
    assert expired == finished + timedelta(days=11)


@pytest.mark.usefixtures("services")
async def test_shortening_retention_expires_old_jobs_at_the_next_sweep(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    job, headers = await _finished_job(client, org)
    finished = datetime.fromisoformat(job["timings"]["finished_at"])
    at = finished + timedelta(days=5)
    sweep.expire_due_jobs(now=at)  # free plan: 30 days, not due
    assert len(_keys(org.id, job["id"])) == 2
    assert (await _set(client, org, 4)).status_code == 200
    sweep.expire_due_jobs(now=at)
    assert _keys(org.id, job["id"]) == []
    r = await client.get(f"/v1/jobs/{job['id']}/outputs/output", headers=headers)
    assert_problem(r, 410, "output-expired")


def _rules() -> list[dict[str, Any]]:
    client = storage.s3_client()
    try:
        rules: list[dict[str, Any]] = client.get_bucket_lifecycle_configuration(
            Bucket=get_settings().s3_bucket
        )["Rules"]
    except client.exceptions.ClientError:
        return []
    return rules


@pytest.mark.usefixtures("s3")
async def test_lifecycle_rules_follow_each_organizations_retention(
    client: httpx.AsyncClient,
) -> None:
    s3 = storage.s3_client()
    bucket = get_settings().s3_bucket
    # A rule of the operator's own: left as it is.
    own = {
        "ID": "abort-uploads",
        "Status": "Enabled",
        "Filter": {"Prefix": "uploads/"},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 2},
    }
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [own]})
    org = await make_org(client)
    assert (await _set(client, org, 3)).status_code == 200

    written = sweep.sync_lifecycle_rules()
    assert written is not None and written >= 1
    rules = {r["ID"]: r for r in _rules()}
    assert "abort-uploads" in rules
    ours = rules[f"{sweep.RULE_PREFIX}{org.id}"]
    assert ours["Expiration"]["Days"] == 3 + sweep.LIFECYCLE_MARGIN_DAYS
    assert ours["Filter"]["Tag"] == {"Key": "tenant", "Value": org.id}
    assert ours["Status"] == "Enabled"

    assert (await _set(client, org, None)).status_code == 200
    sweep.sync_lifecycle_rules()
    rules = {r["ID"]: r for r in _rules()}
    assert rules[f"{sweep.RULE_PREFIX}{org.id}"]["Expiration"]["Days"] == (
        FREE_PLAN_DAYS + sweep.LIFECYCLE_MARGIN_DAYS
    )
    assert "abort-uploads" in rules


def test_rules_go_to_the_shortest_retentions_when_there_is_no_room_for_all() -> None:
    a, b, c = (uuid.UUID(int=i) for i in (1, 2, 3))
    rules = sweep.lifecycle_rules([(a, 30), (b, 2), (c, 7)], room=2)
    assert [r["ID"] for r in rules] == [f"{sweep.RULE_PREFIX}{b}", f"{sweep.RULE_PREFIX}{c}"]
    assert sweep.lifecycle_rules([(a, 30)], room=0) == []


@pytest.mark.usefixtures("services")
async def test_the_maintenance_task_runs_the_sweep(client: httpx.AsyncClient) -> None:
    from workers.tasks import maintenance

    org = await make_org(client)
    await _finished_job(client, org)
    result = maintenance.expire_outputs.run()
    assert result["finished"] is True and result["refused"] == 0
    assert result["lifecycle_rules"] is not None and result["lifecycle_rules"] >= 1
