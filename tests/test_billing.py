"""Billing with Stripe: the real SDK against a local recorder, real PostgreSQL, Redis, Celery."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from hiddenmodel.billing import metering
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
)
from tests.factories import submit, wait_job
from tests.services import LOG_DIR, Process
from tests.stripe_fixtures import (
    EVENT_NAME,
    METER_ID,
    PRO_PRICE,
    WEBHOOK_SECRET,
)
from tests.stripe_recorder import StripeRecorder

# --- helpers -----------------------------------------------------------------------------


async def billed_org(client: httpx.AsyncClient) -> tuple[Org, str]:
    """An organization with a Stripe customer (opened the portal once)."""
    org = await make_org(client)
    r = await client.post(f"/v1/orgs/{org.id}/billing/portal", headers=org.owner.headers)
    assert r.status_code == 201, r.text
    r = await client.get(f"/v1/orgs/{org.id}/billing", headers=org.owner.headers)
    customer: str = r.json()["stripe_customer_id"]
    assert customer.startswith("cus_")
    return org, customer


def plant_usage_event(
    org_id: str,
    *,
    gpu_seconds: float = 1.0,
    created_at: datetime | None = None,
    status: str = "pending",
) -> str:
    """A finished job and its usage event, written as the superuser (time travel included)."""
    job_id, event_id = uuid.uuid4(), uuid.uuid4()
    db_rows(
        "INSERT INTO jobs (id, organization_id, operation, operation_version, queue, params, "
        "status, inputs, request_hash) VALUES (:j, :o, 'resize', '1', 'cpu', '{}', "
        "'succeeded', '{}', 'planted')",
        j=job_id,
        o=org_id,
    )
    db_rows(
        "INSERT INTO usage_events (id, organization_id, job_id, operation, outcome, gpu_seconds, "
        "images, megapixels, created_at, stripe_status, stripe_next_attempt_at) "
        "VALUES (:e, :o, :j, 'resize', 'succeeded', :g, 1, 0.1, coalesce(:c, now()), :s, now())",
        e=event_id,
        o=org_id,
        j=job_id,
        g=gpu_seconds,
        c=created_at,
        s=status,
    )
    return str(event_id)


def usage_row(event_id: str) -> dict[str, Any]:
    row = db_rows(
        "SELECT stripe_status, stripe_attempts, stripe_last_error, stripe_sent_at, "
        "stripe_next_attempt_at, gpu_seconds, created_at FROM usage_events WHERE id = :e",
        e=event_id,
    )[0]
    return dict(row._mapping)


async def push() -> dict[str, int]:
    return await asyncio.to_thread(metering.push_due_usage_events, 500)


async def push_until(event_id: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Push until the event's row satisfies ``done``. A worker may be pushing at the same
    time (the dispatcher schedules it): whoever claims the event does the attempt."""
    deadline = time.monotonic() + 30
    while True:
        await push()
        row = usage_row(event_id)
        if done(row):
            return row
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.2)


def status_is(status: str, attempts: int | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda row: (
        row["stripe_status"] == status and (attempts is None or row["stripe_attempts"] == attempts)
    )


def make_due(event_id: str) -> None:
    db_rows(
        "UPDATE usage_events SET stripe_next_attempt_at = now() - interval '1 second' "
        "WHERE id = :e",
        e=event_id,
    )


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(event).encode()
    stamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"Stripe-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


def stripe_event(type_: str, obj: dict[str, Any], created: int | None = None) -> dict[str, Any]:
    return {
        "id": f"evt_{uuid.uuid4().hex[:24]}",
        "object": "event",
        "type": type_,
        "created": created or int(time.time()),
        "livemode": False,
        "api_version": "2026-10-28.endive",
        "data": {"object": obj},
    }


def subscription(customer: str, status: str = "active", price: str = PRO_PRICE) -> dict[str, Any]:
    return {
        "id": f"sub_{uuid.uuid4().hex[:14]}",
        "object": "subscription",
        "customer": customer,
        "status": status,
        "items": {"object": "list", "data": [{"id": "si_1", "price": {"id": price}}]},
    }


async def post_event(client: httpx.AsyncClient, event: dict[str, Any]) -> httpx.Response:
    body, headers = signed(event)
    return await client.post("/v1/stripe/webhook", content=body, headers=headers)


async def billing_of(client: httpx.AsyncClient, org: Org) -> dict[str, Any]:
    r = await client.get(f"/v1/orgs/{org.id}/billing", headers=org.owner.headers)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# --- customer, checkout, portal ----------------------------------------------------------


async def test_customer_is_created_once_and_checkout_links(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    org = await make_org(client)
    assert (await billing_of(client, org))["stripe_customer_id"] is None
    url = f"/v1/orgs/{org.id}/billing/checkout"
    results = await asyncio.gather(
        *[client.post(url, json={"plan": "pro"}, headers=org.owner.headers) for _ in range(5)]
    )
    assert [r.status_code for r in results] == [201] * 5, [r.text for r in results]
    assert all(r.json()["url"].startswith("https://checkout.stripe.com/") for r in results)

    creates = [
        r
        for r in recorder.calls("POST", "/v1/customers")
        if r.form.get("metadata[organization_id]") == org.id
    ]
    assert len(creates) == 1
    assert creates[0].idempotency_key == f"hm-customer-{org.id}"
    assert creates[0].form["metadata[organization_slug]"] == org.slug
    billing = await billing_of(client, org)
    customer = billing["stripe_customer_id"]
    assert customer in recorder.customers
    assert (billing["plan"], billing["subscription_status"]) == ("free", None)

    sessions = [
        r
        for r in recorder.calls("POST", "/v1/checkout/sessions")
        if r.form.get("customer") == customer
    ]
    assert len(sessions) == 5
    form = sessions[0].form
    assert form["mode"] == "subscription"
    assert form["line_items[0][price]"] == PRO_PRICE
    assert form["client_reference_id"] == org.id
    assert form["subscription_data[metadata][organization_id]"] == org.id
    assert "{CHECKOUT_SESSION_ID}" in form["success_url"]

    r = await client.post(f"/v1/orgs/{org.id}/billing/portal", headers=org.owner.headers)
    assert r.status_code == 201, r.text
    assert r.json()["url"].startswith("https://billing.stripe.com/")
    portal = recorder.calls("POST", "/v1/billing_portal/sessions")[-1]
    assert portal.form["customer"] == customer
    assert portal.form["return_url"].endswith(f"/portal/orgs/{org.id}/billing")
    assert [
        r
        for r in recorder.calls("POST", "/v1/customers")
        if r.form.get("metadata[organization_id]") == org.id
    ] == creates

    actions = [
        row[0]
        for row in db_rows(
            "SELECT action FROM audit_events WHERE organization_id = :o AND action LIKE "
            "'billing.%' ORDER BY created_at",
            o=org.id,
        )
    ]
    assert actions.count("billing.customer_created") == 1
    assert actions.count("billing.checkout_started") == 5
    assert "billing.portal_opened" in actions


async def test_a_plan_without_price_is_refused(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    org = await make_org(client)
    for plan in ("free", "no-such-plan"):
        r = await client.post(
            f"/v1/orgs/{org.id}/billing/checkout", json={"plan": plan}, headers=org.owner.headers
        )
        assert_problem(r, 422, "plan-not-purchasable")
    assert (await billing_of(client, org))["stripe_customer_id"] is None


async def test_who_may_manage_billing(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    billing_user, member = await register(client), await register(client)
    for account, role in ((billing_user, "billing"), (member, "member")):
        db_rows(
            "INSERT INTO memberships (id, organization_id, user_id, role) VALUES (:i, :o, :u, :r)",
            i=uuid.uuid4(),
            o=org.id,
            u=account.id,
            r=role,
        )
    url = f"/v1/orgs/{org.id}/billing"
    assert (await client.get(url, headers=billing_user.headers)).status_code == 200
    r = await client.post(f"{url}/portal", headers=billing_user.headers)
    assert r.status_code == 201, r.text
    assert_problem(await client.get(url, headers=member.headers), 403, "insufficient-role")
    admin_key = await make_key(client, org, ["admin"])
    assert (await client.get(url, headers=bearer(admin_key["key"]))).status_code == 200
    jobs_key = await make_key(client, org, ["jobs:read", "jobs:write"])
    assert_problem(await client.get(url, headers=bearer(jobs_key["key"])), 403, "missing-scope")
    other = await make_org(client)
    assert_problem(await client.get(url, headers=other.owner.headers), 404)


# --- usage to Stripe ---------------------------------------------------------------------


@pytest.mark.usefixtures("services")
async def test_a_finished_job_is_pushed_exactly_once(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    org, customer = await billed_org(client)
    key = await make_key(client, org, ["jobs:read", "jobs:write"])
    r = await submit(client, bearer(key["key"]))
    assert r.status_code == 202, r.text
    job = await wait_job(client, bearer(key["key"]), r.json()["id"])
    assert job["status"] == "succeeded", job
    rows = db_rows("SELECT id FROM usage_events WHERE job_id = :j", j=job["id"])
    assert len(rows) == 1
    event_id = str(rows[0][0])

    row = await push_until(event_id, status_is("sent"))
    assert row["stripe_attempts"] == 1, row
    assert row["stripe_sent_at"] is not None
    calls = recorder.meter_event_calls(event_id)
    assert len(calls) == 1
    assert calls[0].form == {
        "event_name": EVENT_NAME,
        "payload[stripe_customer_id]": customer,
        "payload[value]": str(metering.meter_value(row["gpu_seconds"])),
        "identifier": event_id,
        "timestamp": str(int(row["created_at"].timestamp())),
    }
    assert calls[0].idempotency_key == f"hm-usage-{event_id}-1"
    assert recorder.meter_events[event_id].customer == customer

    await push()
    assert len(recorder.meter_event_calls(event_id)) == 1
    assert usage_row(event_id)["stripe_attempts"] == 1


def test_meter_values_are_whole_gpu_milliseconds() -> None:
    assert metering.meter_value(0.0) == 0
    assert metering.meter_value(1.2345) == 1235
    assert metering.meter_value(0.0004) == 0
    assert metering.meter_value(0.0005) == 1
    assert metering.meter_value(12.5) == 12500


async def test_stripe_failing_twice_then_recovering(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    org, _ = await billed_org(client)
    event_id = plant_usage_event(org.id, gpu_seconds=1.2345)
    recorder.fail_next(2, when=lambda r: r.form.get("identifier") == event_id)
    row = await push_until(event_id, status_is("sent"))
    assert row["stripe_attempts"] == 1
    calls = recorder.meter_event_calls(event_id)
    # The SDK retried the same attempt: one idempotency key, one event accepted.
    assert [c.status for c in calls] == [500, 500, 200]
    assert {c.idempotency_key for c in calls} == {f"hm-usage-{event_id}-1"}
    assert recorder.meter_events[event_id].value == 1235


async def test_an_outage_waits_retries_with_backoff_and_sends_once(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    org, _ = await billed_org(client)
    event_id = plant_usage_event(org.id, gpu_seconds=2.0)
    mine = lambda r: r.form.get("identifier") == event_id  # noqa: E731
    # More failures than the SDK retries: the attempt fails, the event waits.
    recorder.fail_next(3, when=mine)
    before = datetime.now(UTC)
    row = await push_until(event_id, lambda row: row["stripe_last_error"] is not None)
    assert (row["stripe_status"], row["stripe_attempts"]) == ("pending", 1), row
    assert "APIError" in row["stripe_last_error"] and "500" in row["stripe_last_error"]
    assert row["stripe_next_attempt_at"] > before + timedelta(seconds=20)
    assert event_id not in recorder.meter_events
    await push()
    assert len(recorder.meter_event_calls(event_id)) == 3  # not due yet: nothing sent

    # Stripe did the work but the answers were lost: it is accepted once, then deduplicated
    # on the identifier when the next attempt sends it again.
    make_due(event_id)
    recorder.fail_next(3, mode="close_after", when=mine)
    row = await push_until(
        event_id, lambda row: "APIConnectionError" in (row["stripe_last_error"] or "")
    )
    assert (row["stripe_status"], row["stripe_attempts"]) == ("pending", 2), row
    assert "APIConnectionError" in row["stripe_last_error"]
    assert recorder.meter_events[event_id].value == 2000
    assert recorder.duplicate_identifiers.count(event_id) == 0

    make_due(event_id)
    row = await push_until(event_id, status_is("sent", attempts=3))
    assert row["stripe_last_error"] is None
    calls = recorder.meter_event_calls(event_id)
    assert len(calls) == 7
    assert {c.idempotency_key for c in calls} == {f"hm-usage-{event_id}-{n}" for n in (1, 2, 3)}
    assert recorder.duplicate_identifiers.count(event_id) == 1


async def test_events_without_customer_or_too_old_are_not_sent(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    unbilled = await make_org(client)
    free_event = plant_usage_event(unbilled.id)
    org, _ = await billed_org(client)
    old_event = plant_usage_event(org.id, created_at=datetime.now(UTC) - timedelta(days=36))
    assert (await push_until(free_event, status_is("not_billed")))["stripe_attempts"] == 0
    old = await push_until(old_event, status_is("failed"))
    assert "35-day" in old["stripe_last_error"] and old["stripe_attempts"] == 0
    assert recorder.meter_event_calls(free_event) == []
    assert recorder.meter_event_calls(old_event) == []


@pytest.mark.usefixtures("services")
async def test_push_runs_as_a_celery_task(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    from workers.tasks.billing import push_to_stripe

    org, _ = await billed_org(client)
    event_id = plant_usage_event(org.id, gpu_seconds=0.25)
    queue = f"billing-test-{uuid.uuid4().hex[:6]}"
    (LOG_DIR / "billing-worker.log").unlink(missing_ok=True)
    worker = Process(
        "billing-worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "--include",
            "workers.tasks.billing",
            "--queues",
            queue,
            "--pool",
            "solo",
            "--hostname",
            f"{queue}@%h",
            "--loglevel",
            "INFO",
        ],
    )
    try:
        deadline = time.monotonic() + 30
        while "ready." not in worker.log():
            assert worker.alive() and time.monotonic() < deadline, worker.log()[-3000:]
            await asyncio.sleep(0.1)
        push_to_stripe.apply_async(kwargs={"limit": 100}, queue=queue)
        deadline = time.monotonic() + 20
        while usage_row(event_id)["stripe_status"] != "sent":
            assert time.monotonic() < deadline, worker.log()[-3000:]
            await asyncio.sleep(0.1)
    finally:
        worker.stop()
    assert recorder.meter_events[event_id].value == 250
    assert "usage.push_to_stripe" in worker.log()


# --- Stripe's webhooks -------------------------------------------------------------------


async def test_webhook_signature_is_verified(client: httpx.AsyncClient) -> None:
    event = stripe_event("invoice.paid", {"id": "in_1", "object": "invoice", "customer": "c"})
    body, headers = signed(event, secret="whsec_wrong")
    r = await client.post("/v1/stripe/webhook", content=body, headers=headers)
    assert_problem(r, 400, "invalid-stripe-signature")
    r = await client.post("/v1/stripe/webhook", content=body)
    assert_problem(r, 400, "invalid-stripe-signature")
    good_body, good_headers = signed(event)
    r = await client.post("/v1/stripe/webhook", content=good_body + b" ", headers=good_headers)
    assert_problem(r, 400, "invalid-stripe-signature")
    assert db_scalar("SELECT count(*) FROM stripe_events WHERE id = :i", i=event["id"]) == 0


async def test_subscription_events_are_stored_once_and_handled_once(
    client: httpx.AsyncClient,
) -> None:
    org, customer = await billed_org(client)
    sub = subscription(customer)
    created = stripe_event("customer.subscription.created", sub)
    results = await asyncio.gather(*[post_event(client, created) for _ in range(5)])
    assert [r.status_code for r in results] == [200] * 5, [r.text for r in results]
    bodies = [r.json() for r in results]
    assert sorted(b["duplicate"] for b in bodies) == [False, True, True, True, True]
    assert [b["outcome"] for b in bodies if not b["duplicate"]] == ["applied"]
    billing = await billing_of(client, org)
    assert (billing["plan"], billing["subscription_status"]) == ("pro", "active")
    assert billing["stripe_subscription_id"] == sub["id"]
    assert db_scalar("SELECT count(*) FROM stripe_events WHERE id = :i", i=created["id"]) == 1
    audits = db_scalar(
        "SELECT count(*) FROM audit_events WHERE organization_id = :o "
        "AND data->>'stripe_event' = :e",
        o=org.id,
        e=created["id"],
    )
    assert audits == 1

    # An update created before the one applied arrives late: stored, not applied.
    late = stripe_event(
        "customer.subscription.updated",
        {**sub, "status": "incomplete"},
        created=created["created"] - 60,
    )
    assert (await post_event(client, late)).json()["outcome"] == "stale"
    assert (await billing_of(client, org))["subscription_status"] == "active"

    deleted = stripe_event(
        "customer.subscription.deleted", {**sub, "status": "canceled"}, created["created"] + 1
    )
    assert (await post_event(client, deleted)).json()["outcome"] == "applied"
    billing = await billing_of(client, org)
    assert (billing["plan"], billing["subscription_status"]) == ("free", "canceled")

    stranger = stripe_event("customer.subscription.created", subscription("cus_nobody"))
    assert (await post_event(client, stranger)).json()["outcome"] == "unknown_customer"
    other = stripe_event("charge.succeeded", {"id": "ch_1", "object": "charge"})
    assert (await post_event(client, other)).json()["outcome"] == "ignored"
    assert (await post_event(client, other)).json() == {
        "received": True,
        "duplicate": True,
        "outcome": None,
    }


@pytest.mark.usefixtures("services")
async def test_past_due_refuses_jobs_after_the_grace_period(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    org, customer = await billed_org(client)
    headers = bearer((await make_key(client, org, ["jobs:read", "jobs:write"]))["key"])
    invoice = {"id": f"in_{uuid.uuid4().hex[:14]}", "object": "invoice", "customer": customer}
    failed = stripe_event("invoice.payment_failed", invoice)
    assert (await post_event(client, failed)).json()["outcome"] == "applied"
    billing = await billing_of(client, org)
    assert billing["subscription_status"] == "past_due"
    assert billing["past_due_since"] is not None
    # Within the default grace period, work goes on.
    assert (await submit(client, headers)).status_code == 202

    monkeypatch.setenv("HM_BILLING_PAST_DUE_GRACE_DAYS", "0")
    get_settings.cache_clear()
    try:
        r = await submit(client, headers)
        assert_problem(r, 402, "payment-past-due")
        assert r.json()["past_due_since"]
        # A second failure does not move the start of the grace period.
        again = stripe_event("invoice.payment_failed", invoice, failed["created"] + 5)
        await post_event(client, again)
        assert (await billing_of(client, org))["past_due_since"] == billing["past_due_since"]

        paid = stripe_event("invoice.paid", invoice, failed["created"] + 10)
        assert (await post_event(client, paid)).json()["outcome"] == "applied"
        billing = await billing_of(client, org)
        assert billing["past_due_since"] is None
        assert billing["subscription_status"] == "active"
        assert (await submit(client, headers)).status_code == 202
    finally:
        monkeypatch.delenv("HM_BILLING_PAST_DUE_GRACE_DAYS")
        get_settings.cache_clear()


# --- reconciliation ----------------------------------------------------------------------


async def test_reconciliation_reports_a_planted_difference(
    client: httpx.AsyncClient, recorder: StripeRecorder
) -> None:
    day = datetime.now(UTC).date() - timedelta(days=1)
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    matching, _ = await billed_org(client)
    drifting, drifting_customer = await billed_org(client)
    for seconds in (1.5, 0.25):
        event_id = plant_usage_event(matching.id, gpu_seconds=seconds, created_at=noon)
        await push_until(event_id, status_is("sent"))
    # The planted difference: marked sent here, never received by Stripe.
    plant_usage_event(drifting.id, gpu_seconds=3.0, created_at=noon, status="sent")

    report = await asyncio.to_thread(metering.reconcile, day)
    lines = {str(line.organization_id): line for line in report.lines}
    assert lines[matching.id].status == "match"
    assert (lines[matching.id].our_value, lines[matching.id].stripe_value) == (1750, 1750.0)
    drift = lines[drifting.id]
    assert (drift.status, drift.our_value, drift.stripe_value) == ("mismatch", 3000, 0.0)
    assert drift.difference == -3000
    assert drifting.id in {d["organization_id"] for d in report.as_dict()["differences"]}
    summaries = [
        r
        for r in recorder.calls("GET", f"/v1/billing/meters/{METER_ID}/event_summaries")
        if r.query["customer"] == drifting_customer
    ]
    assert summaries[-1].query["start_time"] == str(int(noon.timestamp()) - 12 * 3600)
    assert summaries[-1].query["end_time"] == str(int(noon.timestamp()) + 12 * 3600)

    operator = await register(client)
    db_rows("UPDATE users SET is_superuser = true WHERE id = :u", u=operator.id)
    url = "/v1/admin/billing/reconciliations"
    r = await client.get(url, params={"day": day.isoformat()}, headers=operator.headers)
    assert r.status_code == 200, r.text
    rows = {row["organization_id"]: row for row in r.json()}
    assert rows[drifting.id]["status"] == "mismatch"
    assert rows[drifting.id]["difference"] == -3000
    assert rows[matching.id]["status"] == "match"
    r = await client.get(url, params={"status": "mismatch"}, headers=operator.headers)
    assert drifting.id in {row["organization_id"] for row in r.json()}
    assert matching.id not in {row["organization_id"] for row in r.json()}
    assert_problem(await client.get(url, headers=matching.owner.headers), 403, "operator-required")
    assert (
        db_scalar(
            "SELECT count(*) FROM operator_audit_events WHERE actor = :a "
            "AND purpose = 'billing reconciliation report'",
            a=operator.email,
        )
        == 2
    )

    # Stripe unreachable: the day is reported as an error and checked again next run.
    recorder.fail_next(3, when=lambda r: r.query.get("customer") == drifting_customer)
    report = await asyncio.to_thread(metering.reconcile, day)
    line = next(x for x in report.lines if str(x.organization_id) == drifting.id)
    assert line.status == "error" and line.error and "APIError" in line.error
    assert db_rows(
        "SELECT status, our_value FROM billing_reconciliations "
        "WHERE organization_id = :o AND day = :d",
        o=drifting.id,
        d=day,
    ) == [("error", 3000)]
