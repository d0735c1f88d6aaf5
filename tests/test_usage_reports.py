"""Usage reports, CSV export and monthly statements: exact sums, periods, tenant isolation."""

from __future__ import annotations

import csv
import io
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest

from hiddenmodel.usage import export, periods, service
from tests.conftest import (
    Account,
    Org,
    assert_problem,
    bearer,
    db_rows,
    make_key,
    make_org,
    register,
    unique,
)
from tests.factories import Event, add_usage


async def add_member(client: httpx.AsyncClient, org: Org, role: str) -> Account:
    member = await register(client)
    db_rows(
        "INSERT INTO memberships (id, organization_id, user_id, role) VALUES (:i, :o, :u, :r)",
        i=uuid.uuid4(),
        o=org.id,
        u=member.id,
        r=role,
    )
    return member


def totals(jobs: int, gpu: float, images: int, mp: float) -> dict[str, Any]:
    return {"jobs": jobs, "gpu_seconds": gpu, "images": images, "megapixels": mp}


def row(
    key: str | None, label: str, jobs: int, gpu: float, images: int, mp: float
) -> dict[str, Any]:
    return {"key": key, "label": label, **totals(jobs, gpu, images, mp)}


@dataclass
class March:
    """Org A's March 2025 usage, with events just outside the month and org B's noise."""

    org: Org
    billing: Account
    member: Account
    reader: dict[str, str]
    key1: dict[str, Any]
    key2: dict[str, Any]
    other: Org
    other_reader: dict[str, str]


@pytest.fixture
async def march(client: httpx.AsyncClient) -> March:
    org = await make_org(client)
    billing = await add_member(client, org, "billing")
    member = await add_member(client, org, "member")
    key1 = await make_key(client, org, ["jobs:write"], name='Catalog "sync", EU')
    key2 = await make_key(client, org, ["jobs:write"], name='=HYPERLINK("http://x")')
    reader = await make_key(client, org, ["usage:read"])
    owner = org.owner.id
    add_usage(
        org.id,
        Event("2025-03-01T00:00:00Z", "resize", 0.0, 1, 0.5, key=key1["id"]),
        Event("2025-03-01T23:59:59.999Z", "ghost_mannequin", 2.5, 1, 1.0, key=key1["id"]),
        Event("2025-03-02T10:00:00Z", "ghost_mannequin", 4.25, 2, 2.0, user=owner),
        Event("2025-03-31T23:59:59Z", "remove_background", 0.75, 1, 0.25, key=key2["id"]),
        Event("2025-04-01T00:00:00Z", "ghost_mannequin", 100.0, 1, 1.0, user=billing.id),
        Event("2025-02-28T23:59:59Z", "resize", 50.0, 1, 1.0, key=key1["id"]),
    )
    other = await make_org(client)
    other_key = await make_key(client, other, ["usage:read", "jobs:write"])
    add_usage(
        other.id,
        Event("2025-03-01T12:00:00Z", "ghost_mannequin", 1000.0, 10, 10.0, key=other_key["id"]),
        Event("2025-03-31T12:00:00Z", "resize", 2000.0, 20, 20.0, user=other.owner.id),
    )
    return March(
        org=org,
        billing=billing,
        member=member,
        reader=bearer(reader["key"]),
        key1=key1,
        key2=key2,
        other=other,
        other_reader=bearer(other_key["key"]),
    )


MARCH = {"from": "2025-03-01", "to": "2025-03-31"}


async def test_grouped_by_day_operation_member_and_key(
    client: httpx.AsyncClient, march: March
) -> None:
    r = await client.get("/v1/usage", params={**MARCH, "group_by": "day"}, headers=march.reader)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["group_by"], body["from"], body["to"]) == ("day", "2025-03-01", "2025-03-31")
    assert body["rows"] == [
        row("2025-03-01", "2025-03-01", 2, 2.5, 2, 1.5),
        row("2025-03-02", "2025-03-02", 1, 4.25, 2, 2.0),
        row("2025-03-31", "2025-03-31", 1, 0.75, 1, 0.25),
    ]
    assert body["totals"] == totals(4, 7.5, 5, 3.75)

    r = await client.get(
        "/v1/usage", params={**MARCH, "group_by": "operation"}, headers=march.reader
    )
    assert r.json()["rows"] == [
        row("ghost_mannequin", "ghost_mannequin", 2, 6.75, 3, 3.0),
        row("remove_background", "remove_background", 1, 0.75, 1, 0.25),
        row("resize", "resize", 1, 0.0, 1, 0.5),
    ]

    r = await client.get("/v1/usage", params={**MARCH, "group_by": "member"}, headers=march.reader)
    assert r.json()["rows"] == [
        row(march.org.owner.id, march.org.owner.email, 1, 4.25, 2, 2.0),
        row(None, service.NO_MEMBER, 3, 3.25, 3, 1.75),
    ]

    r = await client.get("/v1/usage", params={**MARCH, "group_by": "api_key"}, headers=march.reader)
    key1, key2 = march.key1, march.key2
    assert r.json()["rows"] == [
        row(None, service.NO_API_KEY, 1, 4.25, 2, 2.0),
        row(key1["id"], f"{key1['name']} ({key1['prefix']})", 2, 2.5, 2, 1.5),
        row(key2["id"], f"{key2['name']} ({key2['prefix']})", 1, 0.75, 1, 0.25),
    ]
    assert r.json()["totals"] == totals(4, 7.5, 5, 3.75)


async def test_members_with_usage_rights_read_it_at_the_org_path(
    client: httpx.AsyncClient, march: March
) -> None:
    path = f"/v1/orgs/{march.org.id}/usage"
    for account in (march.org.owner, march.billing):
        r = await client.get(
            path, params={**MARCH, "group_by": "operation"}, headers=account.headers
        )
        assert r.status_code == 200, r.text
        assert r.json()["totals"] == totals(4, 7.5, 5, 3.75)
    assert_problem(await client.get(path, headers=march.member.headers), 403, "insufficient-role")
    # The key-scoped path acts in a key's organization only.
    assert_problem(
        await client.get("/v1/usage", headers=march.org.owner.headers), 403, "api-key-required"
    )
    writer = await make_key(client, march.org, ["jobs:write"])
    assert_problem(
        await client.get("/v1/usage", headers=bearer(writer["key"])), 403, "missing-scope"
    )
    assert_problem(await client.get("/v1/usage"), 401)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        ("2025-03-01", "2025-03-01", totals(2, 2.5, 2, 1.5)),
        ("2025-03-02", "2025-03-31", totals(2, 5.0, 3, 2.25)),
        ("2025-03-31", "2025-04-01", totals(2, 100.75, 2, 1.25)),
        ("2025-02-28", "2025-02-28", totals(1, 50.0, 1, 1.0)),
        ("2025-02-28", "2025-04-01", totals(6, 157.5, 7, 5.75)),
        ("2025-04-02", "2025-04-30", totals(0, 0.0, 0, 0.0)),
        # One bound: the month around it.
        ("2025-03-15", None, totals(1, 0.75, 1, 0.25)),
        (None, "2025-03-01", totals(2, 2.5, 2, 1.5)),
    ],
)
async def test_period_bounds_are_utc_days_both_included(
    client: httpx.AsyncClient, march: March, start: str | None, end: str | None, expected: Any
) -> None:
    params = {k: v for k, v in (("from", start), ("to", end)) if v is not None}
    r = await client.get("/v1/usage", params=params, headers=march.reader)
    assert r.status_code == 200, r.text
    assert r.json()["totals"] == expected
    if end is None:
        assert r.json()["to"] == "2025-03-31"
    if start is None:
        assert r.json()["from"] == "2025-03-01"


async def test_default_period_is_the_current_month(client: httpx.AsyncClient, march: March) -> None:
    today = datetime.now(UTC).date()
    r = await client.get("/v1/usage", headers=march.reader)
    body = r.json()
    assert body["group_by"] == "day" and body["from"] == today.replace(day=1).isoformat()
    assert body["to"][:7] == today.isoformat()[:7] and body["to"] >= today.isoformat()
    assert body["rows"] == [] and body["totals"] == totals(0, 0.0, 0, 0.0)


async def test_bad_periods_are_problems(client: httpx.AsyncClient, march: March) -> None:
    async def get(**params: str) -> httpx.Response:
        return await client.get("/v1/usage", params=params, headers=march.reader)

    assert_problem(await get(**{"from": "2025-03-02", "to": "2025-03-01"}), 422, "invalid-period")
    too_long = await get(**{"from": "2024-01-01", "to": "2025-01-01"})
    assert_problem(too_long, 422, "invalid-period")
    assert too_long.json()["max_days"] == periods.MAX_PERIOD_DAYS
    # 2024 is a leap year: its 366 days are the longest period allowed.
    assert (await get(**{"from": "2024-01-01", "to": "2024-12-31"})).status_code == 200
    assert_problem(await get(**{"from": "2025-13-01"}), 422, "validation-error")
    assert_problem(await get(**{"to": "yesterday"}), 422, "validation-error")
    assert_problem(await get(**{"from": "1999-12-31"}), 422, "invalid-period")
    assert_problem(await get(group_by="org"), 422, "validation-error")


async def test_csv_parses_back_to_the_same_numbers(client: httpx.AsyncClient, march: March) -> None:
    params = {**MARCH, "group_by": "api_key"}
    as_json = (await client.get("/v1/usage", params=params, headers=march.reader)).json()
    r = await client.get("/v1/usage.csv", params=params, headers=march.reader)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/csv; charset=utf-8"
    assert r.headers["content-disposition"] == (
        f'attachment; filename="usage-{march.org.slug}-api_key-2025-03-01-2025-03-31.csv"'
    )
    # RFC 4180: a field with a comma or quote is quoted, inner quotes doubled.
    assert '"Catalog ""sync"", EU (' in r.text
    parsed = list(csv.reader(io.StringIO(r.text)))
    assert parsed[0] == list(export.CSV_COLUMNS)
    assert len(parsed) == 1 + len(as_json["rows"])
    for line, expected in zip(parsed[1:], as_json["rows"], strict=True):
        key, label, jobs, gpu, images, mp = line
        assert (key or None) == expected["key"]
        assert int(jobs) == expected["jobs"] and int(images) == expected["images"]
        assert float(gpu) == expected["gpu_seconds"] and float(mp) == expected["megapixels"]
        if expected["label"].startswith("="):
            # Neutralised so a spreadsheet shows it rather than running it.
            assert label == "'" + expected["label"]
        else:
            assert label == expected["label"]
    assert parsed[2][1] == f'Catalog "sync", EU ({march.key1["prefix"]})'


async def test_csv_by_accept_header_and_at_the_org_path(
    client: httpx.AsyncClient, march: March
) -> None:
    r = await client.get("/v1/usage", params=MARCH, headers={**march.reader, "Accept": "text/csv"})
    assert r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"].startswith("attachment;")
    assert "accept" in r.headers["vary"].lower()
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["key"] for x in rows] == ["2025-03-01", "2025-03-02", "2025-03-31"]
    r = await client.get(
        "/v1/usage",
        params=MARCH,
        headers={**march.reader, "Accept": "application/json, text/csv;q=0.5"},
    )
    assert r.headers["content-type"] == "application/json"
    r = await client.get(
        f"/v1/orgs/{march.org.id}/usage.csv",
        params={**MARCH, "group_by": "operation"},
        headers=march.billing.headers,
    )
    assert r.status_code == 200, r.text
    assert [x["key"] for x in csv.DictReader(io.StringIO(r.text))] == [
        "ghost_mannequin",
        "remove_background",
        "resize",
    ]
    assert_problem(
        await client.get(f"/v1/orgs/{march.org.id}/usage.csv", headers=march.member.headers),
        403,
        "insufficient-role",
    )


def put_on_plan(org: Org, **plan: Any) -> str:
    """An operator's plan for the org, written directly (the admin API has its own tests)."""
    code = unique("stmt")
    columns = {"name": code, "price_per_gpu_second": 0, "currency": "usd", **plan}
    names = ", ".join(columns)
    values = ", ".join(f":{name}" for name in columns)
    db_rows(
        f"INSERT INTO plans (id, code, {names}) VALUES (gen_random_uuid(), :code, {values})",
        code=code,
        **columns,
    )
    db_rows(
        "INSERT INTO org_billing (organization_id, plan_id) SELECT :o, id FROM plans "
        "WHERE code = :c",
        o=org.id,
        c=code,
    )
    return code


async def test_statement_subtracts_included_amounts_and_prices_exactly(
    client: httpx.AsyncClient, march: March
) -> None:
    code = put_on_plan(
        march.org,
        price_per_gpu_second=Decimal("0.123457"),
        currency="eur",
        included_gpu_seconds=5.25,
        included_images=2,
    )
    r = await client.get(
        f"/v1/orgs/{march.org.id}/usage/statements/2025-03", headers=march.billing.headers
    )
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["organization_id"], s["month"], s["final"]) == (march.org.id, "2025-03", True)
    assert s["period_start"] == "2025-03-01T00:00:00Z"
    assert s["period_end"] == "2025-04-01T00:00:00Z"
    assert s["plan"]["code"] == code and s["plan"]["currency"] == "eur"
    assert s["totals"] == totals(4, 7.5, 5, 3.75)
    assert [(x["key"], x["gpu_seconds"]) for x in s["by_operation"]] == [
        ("ghost_mannequin", 6.75),
        ("remove_background", 0.75),
        ("resize", 0.0),
    ]
    assert [(x["key"], x["jobs"]) for x in s["by_member"]] == [
        (march.org.owner.id, 1),
        (None, 3),
    ]
    assert len(s["by_api_key"]) == 3
    charges = s["charges"]
    # Money travels as decimal strings, never floats.
    assert all(
        isinstance(charges[k], str)
        for k in ("gpu_seconds", "billable_gpu_seconds", "price_per_gpu_second", "estimated_charge")
    )
    assert Decimal(charges["gpu_seconds"]) == Decimal("7.5")
    assert Decimal(charges["included_gpu_seconds"]) == Decimal("5.25")
    assert Decimal(charges["billable_gpu_seconds"]) == Decimal("2.25")
    assert Decimal(charges["price_per_gpu_second"]) == Decimal("0.123457")
    # 2.25 * 0.123457 = 0.27777825, rounded half up to cents.
    assert charges["estimated_charge"] == "0.28" and charges["currency"] == "eur"
    assert (charges["images"], charges["included_images"], charges["images_beyond_included"]) == (
        5,
        2,
        3,
    )
    # The key-scoped twin answers the same.
    r = await client.get("/v1/usage/statements/2025-03", headers=march.reader)
    assert r.json()["charges"] == charges


async def test_statement_sums_in_decimal_not_binary_floating_point(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    put_on_plan(org, price_per_gpu_second=Decimal("0.01"), included_gpu_seconds=0.5)
    # Ten events of 0.1 GPU-s: a float sum is 0.9999999999999999, which would bill 0.00.
    add_usage(org.id, *[Event(f"2025-05-{d:02d}T08:00:00Z", gpu=0.1) for d in range(1, 11)])
    r = await client.get(f"/v1/orgs/{org.id}/usage/statements/2025-05", headers=org.owner.headers)
    charges = r.json()["charges"]
    assert Decimal(charges["gpu_seconds"]) == Decimal(1)
    assert Decimal(charges["billable_gpu_seconds"]) == Decimal("0.5")
    assert charges["estimated_charge"] == "0.01"


async def test_statement_on_the_default_plan_within_included_amounts(
    client: httpx.AsyncClient, march: March
) -> None:
    r = await client.get(
        f"/v1/orgs/{march.org.id}/usage/statements/2025-03", headers=march.org.owner.headers
    )
    s = r.json()
    assert s["plan"]["code"] == "free"
    assert Decimal(s["charges"]["billable_gpu_seconds"]) == 0
    assert s["charges"]["estimated_charge"] == "0.00"
    current = datetime.now(UTC).strftime("%Y-%m")
    r = await client.get(f"/v1/usage/statements/{current}", headers=march.reader)
    assert r.status_code == 200 and r.json()["final"] is False


@pytest.mark.parametrize("month", ["2025-13", "2025-00", "2025-3", "March", "2999-01", "1999-12"])
async def test_bad_statement_months_are_problems(
    client: httpx.AsyncClient, march: March, month: str
) -> None:
    r = await client.get(f"/v1/usage/statements/{month}", headers=march.reader)
    assert_problem(r, 422, "invalid-period")


async def test_other_orgs_neither_see_nor_change_the_numbers(
    client: httpx.AsyncClient, march: March
) -> None:
    other = march.other
    # Org B's own view holds only its events, though they share the days with A's.
    r = await client.get(
        "/v1/usage", params={**MARCH, "group_by": "operation"}, headers=march.other_reader
    )
    assert r.json()["totals"] == totals(2, 3000.0, 30, 30.0)
    assert {x["key"] for x in r.json()["rows"]} == {"ghost_mannequin", "resize"}
    for path in (
        f"/v1/orgs/{march.org.id}/usage",
        f"/v1/orgs/{march.org.id}/usage.csv",
        f"/v1/orgs/{march.org.id}/usage/statements/2025-03",
    ):
        assert_problem(await client.get(path, headers=other.owner.headers), 404, "not-found")
        assert_problem(await client.get(path, headers=march.other_reader), 404, "not-found")
    r = await client.get("/v1/usage/statements/2025-03", headers=march.other_reader)
    assert r.json()["organization_id"] == other.id
    assert r.json()["totals"] == totals(2, 3000.0, 30, 30.0)


async def test_real_jobs_end_to_end(client: httpx.AsyncClient, services: Any) -> None:
    from tests.factories import png, submit, wait_job

    org = await make_org(client)
    key = await make_key(client, org, ["jobs:read", "jobs:write", "usage:read"], name="e2e, key")
    headers = bearer(key["key"])
    sizes = [(32, 24), (40, 30), (16, 12)]
    done = []
    for width, height in sizes:
        r = await submit(
            client, headers, image=png(64, 48), params={"width": width, "height": height}
        )
        assert r.status_code == 202, r.text
        done.append(await wait_job(client, headers, r.json()["id"]))
    assert [d["status"] for d in done] == ["succeeded"] * 3
    # The worker records megapixels to four decimals.
    megapixels = sum(round(w * h / 1e6, 4) for w, h in sizes)
    today = datetime.now(UTC).date().isoformat()
    period = {"from": today, "to": today}

    r = await client.get("/v1/usage", params={**period, "group_by": "operation"}, headers=headers)
    body = r.json()
    assert [x["key"] for x in body["rows"]] == ["resize"]
    assert body["totals"]["jobs"] == 3 and body["totals"]["images"] == 3
    assert body["totals"]["megapixels"] == pytest.approx(megapixels)
    stored = db_rows(
        "SELECT count(*), sum(gpu_seconds), sum(megapixels) FROM usage_events "
        "WHERE organization_id = :o",
        o=org.id,
    )[0]
    assert body["totals"]["jobs"] == stored[0]
    assert body["totals"]["gpu_seconds"] == pytest.approx(stored[1])
    assert body["totals"]["megapixels"] == pytest.approx(stored[2])

    r = await client.get("/v1/usage", params={**period, "group_by": "api_key"}, headers=headers)
    assert [(x["key"], x["label"], x["jobs"]) for x in r.json()["rows"]] == [
        (key["id"], f"e2e, key ({key['prefix']})", 3)
    ]
    r = await client.get("/v1/usage", params={**period, "group_by": "member"}, headers=headers)
    # Jobs sent with a key count for the member who created the key.
    assert [(x["key"], x["label"]) for x in r.json()["rows"]] == [(org.owner.id, org.owner.email)]
    r = await client.get("/v1/usage", params={**period, "group_by": "day"}, headers=headers)
    assert [(x["key"], x["jobs"]) for x in r.json()["rows"]] == [(today, 3)]

    r = await client.get(f"/v1/orgs/{org.id}/usage.csv", params=period, headers=org.owner.headers)
    (line,) = list(csv.DictReader(io.StringIO(r.text)))
    assert (line["key"], int(line["jobs"])) == (today, 3)
    assert float(line["megapixels"]) == pytest.approx(megapixels)

    r = await client.get(f"/v1/usage/statements/{today[:7]}", headers=headers)
    statement = r.json()
    assert statement["totals"]["jobs"] == 3 and statement["final"] is False
    assert [x["key"] for x in statement["by_operation"]] == ["resize"]


async def test_quantities_have_fixed_precision_in_json_and_csv(
    client: httpx.AsyncClient,
) -> None:
    org = await make_org(client)
    reader = bearer((await make_key(client, org, ["usage:read"]))["key"])
    # Measured GPU-seconds with more digits than a millisecond, and sizes not round in MP.
    add_usage(
        org.id,
        Event("2025-06-02T08:00:00Z", gpu=1.23456, mp=0.1234567),
        Event("2025-06-02T09:00:00Z", gpu=0.1, mp=0.2),
        Event("2025-06-03T09:00:00Z", gpu=0.2004999, mp=0.3),
    )
    june = {"from": "2025-06-01", "to": "2025-06-30"}
    r = await client.get("/v1/usage", params={**june, "group_by": "day"}, headers=reader)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rows"] == [
        row("2025-06-02", "2025-06-02", 2, 1.335, 2, 0.323457),
        row("2025-06-03", "2025-06-03", 1, 0.2, 1, 0.3),
    ]
    assert body["totals"] == totals(3, 1.535, 3, 0.623457)
    r = await client.get("/v1/usage.csv", params={**june, "group_by": "day"}, headers=reader)
    assert r.status_code == 200, r.text
    assert [line[2:] for line in csv.reader(io.StringIO(r.text))][1:] == [
        ["2", "1.335", "2", "0.323457"],
        ["1", "0.2", "1", "0.3"],
    ]
    r = await client.get("/v1/usage/statements/2025-06", headers=reader)
    statement = r.json()
    assert statement["totals"] == totals(3, 1.535, 3, 0.623457)
    assert statement["charges"]["gpu_seconds"] == "1.535"
    assert statement["charges"]["billable_gpu_seconds"] == "0"
