"""Operator API: superusers only, plans, organizations' plans and overrides, usage across
tenants — every call audited."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from hiddenmodel.admin.schemas import PlanLimits
from hiddenmodel.usage.service import ORG_LIMITS
from tests.conftest import (
    Account,
    assert_problem,
    bearer,
    db_rows,
    db_scalar,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import Event, add_usage, plan_body


@pytest.fixture
async def operator(client: httpx.AsyncClient) -> Account:
    account = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=account.id)
    return account


@pytest.fixture
def default_plan_restored() -> Iterator[None]:
    """Tests that move the default put it back on 'free' for the tests after them."""
    yield
    db_rows("UPDATE plans SET is_default = false WHERE is_default AND code <> 'free'")
    db_rows("UPDATE plans SET is_default = true WHERE code = 'free'")


def audit_count(actor: str) -> int:
    return int(db_scalar("SELECT count(*) FROM operator_audit_events WHERE actor = :a", a=actor))


def limits_by_name(body: dict[str, Any], subject: str = "org") -> dict[str, Any]:
    return {x["name"]: x["limit"] for x in body["limits"] if x["subject"] == subject}


ADMIN_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/admin/plans", None),
    ("POST", "/v1/admin/plans", {"code": "nope", "name": "Nope", "price_per_gpu_second": "1"}),
    ("GET", "/v1/admin/plans/free", None),
    ("PATCH", "/v1/admin/plans/free", {"name": "Hijacked"}),
    ("GET", "/v1/admin/orgs", None),
    ("GET", "/v1/admin/orgs/00000000-0000-4000-8000-000000000000", None),
    ("PUT", "/v1/admin/orgs/00000000-0000-4000-8000-000000000000/plan", {"plan": "pro"}),
    ("GET", "/v1/admin/usage", None),
]


async def test_only_operators_get_in(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    admin_key = await make_key(client, org, ["admin", "usage:read"])
    before = db_scalar("SELECT count(*) FROM operator_audit_events")
    for method, path, body in ADMIN_CALLS:
        r = await client.request(method, path, json=body, headers=org.owner.headers)
        assert_problem(r, 403, "operator-required")
        r = await client.request(method, path, json=body, headers=bearer(admin_key["key"]))
        assert_problem(r, 403, "operator-required")
        assert_problem(await client.request(method, path, json=body), 401)
    assert db_scalar("SELECT count(*) FROM operator_audit_events") == before
    assert db_scalar("SELECT name FROM plans WHERE code = 'free'") == "Free"
    assert db_scalar("SELECT count(*) FROM plans WHERE code = 'nope'") == 0


async def test_every_operator_call_is_audited(client: httpx.AsyncClient, operator: Account) -> None:
    org = await make_org(client)
    code = unique("plan")
    calls: list[tuple[str, str, dict[str, Any] | None, str]] = [
        ("GET", "/v1/admin/plans", None, "admin.plans.list"),
        ("POST", "/v1/admin/plans", plan_body(code=code), "admin.plans.create"),
        ("GET", f"/v1/admin/plans/{code}", None, "admin.plans.read"),
        ("PATCH", f"/v1/admin/plans/{code}", {"name": "Renamed"}, "admin.plans.update"),
        ("GET", "/v1/admin/orgs", None, "admin.orgs.list"),
        ("GET", f"/v1/admin/orgs/{org.id}", None, "admin.orgs.read"),
        ("PUT", f"/v1/admin/orgs/{org.id}/plan", {"plan": code}, "admin.orgs.set_plan"),
        ("GET", "/v1/admin/usage", None, "admin.usage.report"),
    ]
    for method, path, body, purpose in calls:
        before = audit_count(operator.email)
        r = await client.request(method, path, json=body, headers=operator.headers)
        assert r.status_code in (200, 201), (path, r.text)
        assert audit_count(operator.email) == before + 1, path
        last_purpose, detail = db_rows(
            "SELECT purpose, detail FROM operator_audit_events WHERE actor = :a "
            "ORDER BY created_at DESC LIMIT 1",
            a=operator.email,
        )[0]
        assert last_purpose == purpose
        assert detail["operator_id"] == operator.id
    detail = db_scalar(
        "SELECT detail FROM operator_audit_events WHERE actor = :a AND purpose = :p",
        a=operator.email,
        p="admin.orgs.set_plan",
    )
    assert detail["org_id"] == org.id and detail["plan"] == code
    # A refused change leaves neither the change nor an audit row behind.
    before = audit_count(operator.email)
    r = await client.post("/v1/admin/plans", json=plan_body(code=code), headers=operator.headers)
    assert_problem(r, 409, "plan-exists")
    assert audit_count(operator.email) == before


async def test_create_plan_and_validation(client: httpx.AsyncClient, operator: Account) -> None:
    body = plan_body(currency="EUR", stripe_price_id="price_1QStudio")
    r = await client.post("/v1/admin/plans", json=body, headers=operator.headers)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert r.headers["location"] == f"/v1/admin/plans/{body['code']}"
    assert (plan["code"], plan["currency"], plan["price_per_gpu_second"]) == (
        body["code"],
        "eur",
        "0.003500",
    )
    assert plan["is_default"] is False and plan["storage_bytes"] is None
    listed = (await client.get("/v1/admin/plans", headers=operator.headers)).json()
    assert body["code"] in {p["code"] for p in listed}
    assert (
        await client.get(f"/v1/admin/plans/{body['code']}", headers=operator.headers)
    ).json() == plan

    invalid: list[tuple[dict[str, Any], str]] = [
        (plan_body(price_per_gpu_second="-1"), "validation-error"),
        (plan_body(price_per_gpu_second="0.0000001"), "validation-error"),
        (plan_body(code="Bad Code"), "validation-error"),
        (plan_body(currency="euro"), "validation-error"),
        (plan_body(stripe_price_id="prod_123"), "validation-error"),
        (plan_body(monthly_images=-5), "validation-error"),
        (plan_body(requests_per_minute=0), "validation-error"),
        (plan_body(max_running_jobs=2**31), "validation-error"),
        (plan_body(surprise=1), "validation-error"),
        (plan_body(included_gpu_seconds=300000), "invalid-plan"),
        (plan_body(included_images=500000), "invalid-plan"),
    ]
    for bad, kind in invalid:
        r = await client.post("/v1/admin/plans", json=bad, headers=operator.headers)
        assert_problem(r, 422, kind)
        assert db_scalar("SELECT count(*) FROM plans WHERE code = :c", c=bad["code"]) == 0
    r = await client.post("/v1/admin/plans", json={"code": "x" * 3}, headers=operator.headers)
    assert_problem(r, 422, "validation-error")
    assert_problem(
        await client.post("/v1/admin/plans", json=body, headers=operator.headers),
        409,
        "plan-exists",
    )
    assert_problem(
        await client.get("/v1/admin/plans/no-such-plan", headers=operator.headers),
        404,
        "plan-not-found",
    )


async def test_patch_plan(client: httpx.AsyncClient, operator: Account) -> None:
    body = plan_body(storage_bytes=1024)
    code = (await client.post("/v1/admin/plans", json=body, headers=operator.headers)).json()[
        "code"
    ]
    path = f"/v1/admin/plans/{code}"
    r = await client.patch(
        path,
        json={
            "price_per_gpu_second": "0.0045",
            "monthly_images": None,
            "stripe_price_id": "price_9",
        },
        headers=operator.headers,
    )
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["price_per_gpu_second"] == "0.004500" and plan["monthly_images"] is None
    assert plan["stripe_price_id"] == "price_9" and plan["storage_bytes"] == 1024
    assert plan["name"] == body["name"] and plan["max_running_jobs"] == 32
    for bad, kind in [
        ({"name": None}, "validation-error"),
        ({"price_per_gpu_second": None}, "validation-error"),
        ({"code": "renamed"}, "validation-error"),
        ({"included_gpu_seconds": 1e9}, "invalid-plan"),
    ]:
        assert_problem(await client.patch(path, json=bad, headers=operator.headers), 422, kind)
    # The refused patch changed nothing.
    assert (await client.get(path, headers=operator.headers)).json() == plan
    assert_problem(
        await client.patch("/v1/admin/plans/no-such-plan", json={}, headers=operator.headers),
        404,
        "plan-not-found",
    )


@pytest.mark.usefixtures("default_plan_restored")
async def test_there_is_always_exactly_one_default_plan(
    client: httpx.AsyncClient, operator: Account
) -> None:
    def defaults() -> list[str]:
        return [r[0] for r in db_rows("SELECT code FROM plans WHERE is_default")]

    assert defaults() == ["free"]
    org = await make_org(client)
    reader = bearer((await make_key(client, org, ["usage:read"]))["key"])
    body = plan_body(is_default=True, monthly_images=1234, included_images=0)
    r = await client.post("/v1/admin/plans", json=body, headers=operator.headers)
    assert r.status_code == 201, r.text
    assert defaults() == [body["code"]]
    # An organization without a plan of its own follows the default.
    limits = (await client.get("/v1/usage/limits", headers=reader)).json()
    assert limits["plan"] == body["code"] and limits_by_name(limits)["monthly_images"] == 1234
    r = await client.patch(
        f"/v1/admin/plans/{body['code']}", json={"is_default": False}, headers=operator.headers
    )
    assert_problem(r, 422, "default-plan-required")
    r = await client.patch(
        "/v1/admin/plans/free", json={"is_default": True}, headers=operator.headers
    )
    assert r.status_code == 200 and r.json()["is_default"] is True
    assert defaults() == ["free"]
    listed = (await client.get("/v1/admin/plans", headers=operator.headers)).json()
    assert [p["code"] for p in listed if p["is_default"]] == ["free"]


async def test_org_plan_and_overrides_change_the_org_limits(
    client: httpx.AsyncClient, operator: Account
) -> None:
    org = await make_org(client)
    reader = bearer((await make_key(client, org, ["usage:read"]))["key"])
    limits = (await client.get("/v1/usage/limits", headers=reader)).json()
    free_images = db_scalar("SELECT monthly_images FROM plans WHERE code = 'free'")
    assert limits["plan"] == "free" and limits_by_name(limits)["monthly_images"] == free_images

    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan",
        json={"plan": "pro", "overrides": {"monthly_images": 77, "storage_bytes": None}},
        headers=operator.headers,
    )
    assert r.status_code == 200, r.text
    assert r.json()["plan"] == "pro"
    assert r.json()["overrides"] == {"monthly_images": 77, "storage_bytes": None}
    assert (
        r.json()["limits"]["monthly_images"] == 77 and r.json()["limits"]["max_running_jobs"] == 16
    )
    limits = (await client.get("/v1/usage/limits", headers=reader)).json()
    by_name = limits_by_name(limits)
    assert limits["plan"] == "pro"
    assert by_name["monthly_images"] == 77 and by_name["storage_bytes"] is None
    assert by_name["max_running_jobs"] == 16 and by_name["monthly_gpu_seconds"] == 100000
    # Stored as whole numbers where the limit is one (the dispatcher reads it as an integer).
    stored = db_scalar("SELECT overrides FROM org_billing WHERE organization_id = :o", o=org.id)
    assert stored == {"monthly_images": 77, "storage_bytes": None}
    # The organization's own audit log says who changed its plan.
    actor, data = db_rows(
        "SELECT actor_user_id::text, data FROM audit_events WHERE organization_id = :o "
        "AND action = 'billing.plan_set'",
        o=org.id,
    )[0]
    assert actor == operator.id and data["plan"] == "pro" and data["previous_plan"] is None

    # A new PUT replaces the overrides; limits left out follow the plan again.
    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan",
        json={"plan": "pro", "overrides": {"max_running_jobs": 3}},
        headers=operator.headers,
    )
    assert r.status_code == 200, r.text
    by_name = limits_by_name((await client.get("/v1/usage/limits", headers=reader)).json())
    assert by_name["monthly_images"] == 200000 and by_name["max_running_jobs"] == 3

    # A plan's change reaches every organization on it.
    code = (
        await client.post("/v1/admin/plans", json=plan_body(), headers=operator.headers)
    ).json()["code"]
    r = await client.put(
        f"/v1/admin/orgs/{org.id}/plan", json={"plan": code}, headers=operator.headers
    )
    assert r.status_code == 200, r.text
    r = await client.patch(
        f"/v1/admin/plans/{code}", json={"monthly_images": 54321}, headers=operator.headers
    )
    assert r.status_code == 200, r.text
    by_name = limits_by_name((await client.get("/v1/usage/limits", headers=reader)).json())
    assert by_name["monthly_images"] == 54321


async def test_org_plan_validation(client: httpx.AsyncClient, operator: Account) -> None:
    assert set(PlanLimits.model_fields) == set(ORG_LIMITS)
    org = await make_org(client)
    path = f"/v1/admin/orgs/{org.id}/plan"
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"plan": "pro", "overrides": {"monthly_widgets": 5}}, 422, "invalid-overrides"),
        ({"plan": "pro", "overrides": {"monthly_images": 1.5}}, 422, "invalid-overrides"),
        ({"plan": "pro", "overrides": {"monthly_images": -1}}, 422, "invalid-overrides"),
        ({"plan": "pro", "overrides": {"requests_per_minute": 0}}, 422, "invalid-overrides"),
        ({"plan": "pro", "overrides": {"monthly_images": "5"}}, 422, "validation-error"),
        ({"plan": "pro", "overrides": {"monthly_images": True}}, 422, "validation-error"),
        ({"plan": "no-such-plan"}, 422, "unknown-plan"),
        ({"overrides": {}}, 422, "validation-error"),
    ]
    for body, status, kind in cases:
        assert_problem(await client.put(path, json=body, headers=operator.headers), status, kind)
    r = await client.put(
        path, json={"plan": "pro", "overrides": {"x": 1}}, headers=operator.headers
    )
    assert r.json()["unknown"] == ["x"] and r.json()["allowed"] == list(ORG_LIMITS)
    assert db_scalar("SELECT count(*) FROM org_billing WHERE organization_id = :o", o=org.id) == 0
    r = await client.put(
        "/v1/admin/orgs/00000000-0000-4000-8000-000000000000/plan",
        json={"plan": "pro"},
        headers=operator.headers,
    )
    assert_problem(r, 404, "not-found")
    # A whole-valued number is accepted for a whole-number limit.
    r = await client.put(
        path, json={"plan": "pro", "overrides": {"monthly_images": 10.0}}, headers=operator.headers
    )
    assert r.status_code == 200 and r.json()["overrides"] == {"monthly_images": 10}


async def test_org_listing_pages_with_plan_and_month_usage(
    client: httpx.AsyncClient, operator: Account
) -> None:
    tag = unique("lst")
    orgs = []
    for i in range(5):
        owner = await register(client)
        slug = f"{tag}-{i}"
        r = await client.post(
            "/v1/orgs", json={"slug": slug, "name": f"Listing {tag} {i}"}, headers=owner.headers
        )
        assert r.status_code == 201, r.text
        orgs.append(r.json())
    now = datetime.now(UTC).isoformat()
    add_usage(orgs[1]["id"], Event(now, gpu=1.25, images=2, mp=0.5), Event(now, gpu=0.5, mp=0.25))
    # Last month's usage is not this month's.
    add_usage(orgs[1]["id"], Event("2001-01-01T00:00:00Z", gpu=99))
    await client.put(
        f"/v1/admin/orgs/{orgs[2]['id']}/plan",
        json={"plan": "pro", "overrides": {"monthly_images": 9}},
        headers=operator.headers,
    )
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"q": tag, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/v1/admin/orgs", params=params, headers=operator.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    # Newest first, each once, only the matching ones.
    assert [o["id"] for o in seen] == [o["id"] for o in reversed(orgs)]
    by_id = {o["id"]: o for o in seen}
    used = by_id[orgs[1]["id"]]
    assert (used["plan"], used["plan_assigned"]) == ("free", False)
    assert used["usage"]["period_start"] == datetime.now(UTC).date().replace(day=1).isoformat()
    assert {k: used["usage"][k] for k in ("jobs", "gpu_seconds", "images", "megapixels")} == {
        "jobs": 2,
        "gpu_seconds": 1.75,
        "images": 3,
        "megapixels": 0.75,
    }
    pro = by_id[orgs[2]["id"]]
    assert (pro["plan"], pro["plan_assigned"], pro["overrides"]) == (
        "pro",
        True,
        {"monthly_images": 9},
    )
    assert pro["usage"]["jobs"] == 0
    r = await client.get(f"/v1/admin/orgs/{orgs[1]['id']}", headers=operator.headers)
    assert r.json() == used
    # Unfiltered listing crosses every tenant.
    r = await client.get("/v1/admin/orgs", params={"limit": 200}, headers=operator.headers)
    assert {o["id"] for o in orgs} <= {o["id"] for o in r.json()["items"]}
    assert_problem(
        await client.get("/v1/admin/orgs", params={"cursor": "garbage"}, headers=operator.headers),
        400,
        "invalid-cursor",
    )
    r = await client.get("/v1/admin/orgs", params={"q": "%"}, headers=operator.headers)
    assert r.status_code == 200 and r.json()["items"] == []


async def test_usage_across_tenants(client: httpx.AsyncClient, operator: Account) -> None:
    a, b = await make_org(client), await make_org(client)
    # A month no other test writes to.
    add_usage(
        a.id,
        Event("2013-05-01T00:00:00Z", "resize", 1.0, 1, 0.5),
        Event("2013-05-31T23:59:59Z", "ghost_mannequin", 2.5, 2, 1.0),
        Event("2013-06-01T00:00:00Z", "ghost_mannequin", 40.0, 1, 1.0),
    )
    add_usage(b.id, Event("2013-05-01T12:00:00Z", "ghost_mannequin", 4.0, 4, 2.0))
    may = {"from": "2013-05-01", "to": "2013-05-31"}

    async def report(group_by: str) -> dict[str, Any]:
        r = await client.get(
            "/v1/admin/usage", params={**may, "group_by": group_by}, headers=operator.headers
        )
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        assert body["totals"] == {"jobs": 3, "gpu_seconds": 7.5, "images": 7, "megapixels": 3.5}
        return body

    assert [
        (x["key"], x["label"], x["jobs"], x["gpu_seconds"]) for x in (await report("org"))["rows"]
    ] == [
        (b.id, b.slug, 1, 4.0),
        (a.id, a.slug, 2, 3.5),
    ]
    assert [(x["key"], x["jobs"], x["gpu_seconds"]) for x in (await report("day"))["rows"]] == [
        ("2013-05-01", 2, 5.0),
        ("2013-05-31", 1, 2.5),
    ]
    assert [(x["key"], x["jobs"], x["images"]) for x in (await report("operation"))["rows"]] == [
        ("ghost_mannequin", 2, 6),
        ("resize", 1, 1),
    ]
    r = await client.get(
        "/v1/admin/usage",
        params={"from": "2013-05-02", "to": "2013-05-01"},
        headers=operator.headers,
    )
    assert_problem(r, 422, "invalid-period")
    r = await client.get("/v1/admin/usage", params={"group_by": "member"}, headers=operator.headers)
    assert_problem(r, 422, "validation-error")
