"""Rules of billing on the API side: the Stripe customer, checkout and portal links, Stripe's
webhooks and the operators' reconciliation report. No HTTP here.

Stripe is called from a worker thread (the SDK blocks) and never inside a transaction that
others wait on, except the organization's own billing row, locked so that two requests at once
create one customer.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any, ParamSpec, TypeVar

import stripe
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from hiddenmodel.admin.auth import Operator
from hiddenmodel.billing import gateway, repository
from hiddenmodel.billing.models import StripeEventOutcome
from hiddenmodel.billing.schemas import (
    BillingRead,
    CheckoutRead,
    PortalRead,
    ReconciliationRead,
    StripeWebhookReceipt,
)
from hiddenmodel.db import async_global_session, async_tenant_session, commit, ops_session, rollback
from hiddenmodel.errors import Problem
from hiddenmodel.inputs import JsonRefused, parse_json
from hiddenmodel.settings import get_settings
from hiddenmodel.usage.models import OrgBilling, Plan
from tenants.auth import OrgScope, Permission
from tenants.models import Role, Scope
from tenants.service import audit

log = logging.getLogger(__name__)

MANAGE_BILLING = Permission("manage_billing", frozenset({Role.OWNER, Role.BILLING}), Scope.ADMIN)

SUBSCRIPTION_EVENTS = (
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
)
INVOICE_EVENTS = ("invoice.paid", "invoice.payment_failed")
# Statuses of a subscription that still bills; an older one ending must not undo a newer one.
LIVE_SUBSCRIPTION = frozenset({"active", "trialing", "past_due", "unpaid", "incomplete"})
# Stripe's ids and event types are short ASCII words; its events nest a dozen levels at most.
STRIPE_ID = re.compile(r"[A-Za-z0-9_]{1,255}")
STRIPE_EVENT_TYPE = re.compile(r"[a-z0-9_.]{1,255}")
STRIPE_EVENT_MAX_BYTES = 1024 * 1024
STRIPE_EVENT_MAX_DEPTH = 32

P = ParamSpec("P")
T = TypeVar("T")


class PlanNotPurchasable(Problem):
    status, kind, title = 422, "plan-not-purchasable", "Plan not purchasable"


class InvalidStripeSignature(Problem):
    status, kind, title = 400, "invalid-stripe-signature", "Invalid Stripe signature"


async def _stripe(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Call the blocking SDK off the event loop; Stripe's failures become a 502 problem."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except stripe.StripeError as exc:
        log.warning("Stripe call %s failed: %s", fn.__name__, gateway.describe(exc))
        raise gateway.StripeUnavailable(
            "Stripe did not complete the request; try again shortly."
        ) from exc


def _billing_url(org_id: uuid.UUID, query: str = "") -> str:
    return f"{get_settings().public_base_url}/portal/orgs/{org_id}/billing{query}"


async def _plan(session: AsyncSession, billing: OrgBilling | None) -> Plan:
    plan = (
        await repository.get_plan(session, billing.plan_id)
        if billing is not None
        else await repository.get_default_plan(session)
    )
    if plan is None:
        raise RuntimeError("no default plan is configured")
    return plan


# --- the organization's side -------------------------------------------------------------


async def view(scope: OrgScope) -> BillingRead:
    """The organization's plan and where it stands with Stripe."""
    billing = await repository.get_billing(scope.session)
    plan = await _plan(scope.session, billing)
    return BillingRead(
        plan=plan.code,
        plan_name=plan.name,
        subscription_status=billing.subscription_status if billing else None,
        stripe_subscription_id=billing.stripe_subscription_id if billing else None,
        past_due_since=billing.past_due_since if billing else None,
        stripe_customer_id=billing.stripe_customer_id if billing else None,
    )


async def ensure_customer(scope: OrgScope) -> OrgBilling:
    """The organization's billing row with a Stripe customer, both created on first need (the
    row on the default plan). The organization id is in the customer's metadata."""
    billing = await repository.lock_billing(scope.session, scope.org_id)
    if billing.stripe_customer_id is None:
        customer_id = await _stripe(
            gateway.create_customer, scope.org_id, scope.org.name, scope.org.slug
        )
        billing.stripe_customer_id = customer_id
        billing.updated_at = datetime.now(UTC)
        audit(
            scope.session,
            scope.org_id,
            scope.principal,
            "billing.customer_created",
            "stripe_customer",
            customer_id,
        )
        await scope.session.flush()
    return billing


async def start_checkout(scope: OrgScope, plan_code: str) -> CheckoutRead:
    """A Stripe Checkout Session that subscribes the organization to ``plan_code``."""
    if not gateway.is_configured():
        # Before the plan: without Stripe no plan can be bought, whichever is asked for.
        raise gateway.StripeNotConfigured("Stripe is not configured on this server.")
    plan = await repository.get_plan_by_code(scope.session, plan_code)
    if plan is None:
        raise PlanNotPurchasable(f"There is no plan '{plan_code}'.", plan=plan_code)
    if not plan.stripe_price_id:
        raise PlanNotPurchasable(
            f"The plan '{plan_code}' has no Stripe price: it cannot be bought.", plan=plan_code
        )
    billing = await ensure_customer(scope)
    assert billing.stripe_customer_id is not None
    session = await _stripe(
        gateway.create_checkout_session,
        customer_id=billing.stripe_customer_id,
        price_id=plan.stripe_price_id,
        org_id=scope.org_id,
        plan_code=plan.code,
        success_url=_billing_url(
            scope.org_id, "?checkout=success&session_id={CHECKOUT_SESSION_ID}"
        ),
        cancel_url=_billing_url(scope.org_id, "?checkout=canceled"),
    )
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "billing.checkout_started",
        "stripe_checkout_session",
        session.id,
        plan=plan.code,
    )
    await scope.session.flush()
    return CheckoutRead(id=session.id, url=session.url)


async def open_portal(scope: OrgScope) -> PortalRead:
    """A Stripe customer-portal session for the organization's customer."""
    billing = await ensure_customer(scope)
    assert billing.stripe_customer_id is not None
    url = await _stripe(
        gateway.create_portal_session,
        customer_id=billing.stripe_customer_id,
        return_url=_billing_url(scope.org_id),
    )
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "billing.portal_opened",
        "stripe_customer",
        billing.stripe_customer_id,
    )
    await scope.session.flush()
    return PortalRead(url=url)


# --- Stripe's webhooks -------------------------------------------------------------------


def _verified_event(payload: bytes, signature: str | None) -> dict[str, Any]:
    secret = get_settings().stripe_webhook_secret
    if secret is None:
        raise gateway.StripeNotConfigured("Stripe webhooks are not configured on this server.")
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8"),
            signature or "",
            secret.get_secret_value(),
            stripe.Webhook.DEFAULT_TOLERANCE,
        )
    except (ValueError, stripe.SignatureVerificationError) as exc:
        raise InvalidStripeSignature(
            "The Stripe-Signature header does not verify this body."
        ) from exc
    # Signed by Stripe, yet parsed with limits: the body is stored as jsonb (no NUL), and a
    # document nested beyond any real event would overflow the parser's stack.
    try:
        event = parse_json(
            payload, max_bytes=STRIPE_EVENT_MAX_BYTES, max_depth=STRIPE_EVENT_MAX_DEPTH
        )
    except JsonRefused as exc:
        raise _malformed(str(exc)) from exc
    if not (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and STRIPE_ID.fullmatch(event["id"])
        and isinstance(event.get("type"), str)
        and STRIPE_EVENT_TYPE.fullmatch(event["type"])
        and type(event.get("created")) is int
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    ):
        raise _malformed("not shaped like a Stripe event")
    customer = event["data"]["object"].get("customer")
    if isinstance(customer, str) and not STRIPE_ID.fullmatch(customer):
        raise _malformed("the customer id is not a Stripe id")
    return event


def _malformed(why: str) -> Problem:
    return Problem(f"The event is refused: {why}.", kind="malformed-stripe-event")


def _customer_of(event: dict[str, Any]) -> str | None:
    obj = event["data"]["object"]
    customer = obj.get("id") if obj.get("object") == "customer" else obj.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return customer if isinstance(customer, str) else None


async def receive_stripe_event(payload: bytes, signature: str | None) -> StripeWebhookReceipt:
    """Verify, store once by event id and handle once, in one transaction.

    Owns its sessions: which one (the organization's tenant session, or a global one for an
    event that names no known customer) is known only after reading the event. A replayed
    event finds its id stored and changes nothing; a failure stores nothing, so Stripe's
    retry handles the event afresh.
    """
    event = _verified_event(payload, signature)
    customer_id = _customer_of(event)
    handled = event["type"] in SUBSCRIPTION_EVENTS + INVOICE_EVENTS
    org_id: uuid.UUID | None = None
    if handled and customer_id is not None:
        async with async_global_session() as lookup:
            orgs = await repository.orgs_by_customer(lookup, customer_id)
        if len(orgs) > 1:
            log.error("Stripe customer %s belongs to several organizations", customer_id)
        elif orgs:
            org_id = orgs[0]
    session = async_tenant_session(org_id) if org_id else async_global_session()
    async with session:
        try:
            if not await repository.store_event(session, event, customer_id):
                await rollback(session)
                return StripeWebhookReceipt(duplicate=True)
            if not handled:
                outcome = StripeEventOutcome.IGNORED
            elif org_id is None:
                log.warning("Stripe event %s names no known customer", event["id"])
                outcome = StripeEventOutcome.UNKNOWN_CUSTOMER
            else:
                assert customer_id is not None
                outcome = await _apply(session, org_id, customer_id, event)
            await repository.finish_event(session, event["id"], outcome)
            await commit(session)
        except BaseException:
            await rollback(session)
            raise
    return StripeWebhookReceipt(duplicate=False, outcome=outcome.value)


async def _apply(
    session: AsyncSession, org_id: uuid.UUID, customer_id: str, event: dict[str, Any]
) -> StripeEventOutcome:
    # The row lock orders concurrent events of one organization, so the check for a newer
    # event below sees whatever the previous holder committed.
    billing = await repository.lock_billing(session, org_id)
    kind = "customer.subscription." if event["type"] in SUBSCRIPTION_EVENTS else "invoice."
    created = datetime.fromtimestamp(event["created"], tz=UTC)
    if await repository.newer_applied_event(session, event["id"], customer_id, kind, created):
        return StripeEventOutcome.STALE
    if kind == "invoice.":
        _apply_invoice(session, billing, event, created)
        return StripeEventOutcome.APPLIED
    return await _apply_subscription(session, billing, event)


async def _apply_subscription(
    session: AsyncSession, billing: OrgBilling, event: dict[str, Any]
) -> StripeEventOutcome:
    obj = event["data"]["object"]
    subscription_id = obj.get("id")
    if not isinstance(subscription_id, str):
        return StripeEventOutcome.IGNORED
    status = obj.get("status")
    deleted = event["type"] == "customer.subscription.deleted"
    current = billing.stripe_subscription_id
    ending = deleted or status not in LIVE_SUBSCRIPTION
    if current is not None and current != subscription_id and ending:
        return StripeEventOutcome.IGNORED
    prices = [
        item["price"]["id"]
        for item in (obj.get("items") or {}).get("data") or []
        if isinstance(item.get("price"), dict) and isinstance(item["price"].get("id"), str)
    ]
    if deleted:
        plan = await _plan(session, None)
        status = status or "canceled"
    else:
        found = await repository.get_plan_by_prices(session, prices)
        if found is None:
            log.warning("no plan has Stripe price %s (event %s)", prices, event["id"])
        plan = found or await _plan(session, billing)
    billing.plan_id = plan.id
    billing.stripe_subscription_id = subscription_id
    billing.subscription_status = status if isinstance(status, str) else None
    billing.updated_at = datetime.now(UTC)
    audit(
        session,
        billing.organization_id,
        None,
        "billing.subscription_deleted" if deleted else "billing.subscription_updated",
        "stripe_subscription",
        subscription_id,
        plan=plan.code,
        status=billing.subscription_status,
        stripe_event=event["id"],
    )
    await session.flush()
    return StripeEventOutcome.APPLIED


def _apply_invoice(
    session: AsyncSession, billing: OrgBilling, event: dict[str, Any], created: datetime
) -> None:
    invoice_id = event["data"]["object"].get("id")
    if event["type"] == "invoice.paid":
        billing.past_due_since = None
        if billing.subscription_status in ("past_due", "unpaid"):
            billing.subscription_status = "active"
        action = "billing.invoice_paid"
    else:
        # The first failure starts the grace period; later ones do not extend it.
        if billing.past_due_since is None:
            billing.past_due_since = created
        billing.subscription_status = "past_due"
        action = "billing.payment_failed"
    billing.updated_at = datetime.now(UTC)
    audit(
        session,
        billing.organization_id,
        None,
        action,
        "stripe_invoice",
        invoice_id if isinstance(invoice_id, str) else None,
        past_due_since=billing.past_due_since.isoformat() if billing.past_due_since else None,
        stripe_event=event["id"],
    )


# --- operators ---------------------------------------------------------------------------


async def list_reconciliations(
    operator: Operator, day: date | None, status: str | None, limit: int
) -> list[ReconciliationRead]:
    """Reconciliation rows across organizations, newest day first (ops session, audited)."""
    async with ops_session(
        actor=operator.email,
        purpose="billing reconciliation report",
        detail={"operator_id": str(operator.user_id), "day": day, "status": status},
    ) as session:
        rows = await repository.list_reconciliations(session, day, status, limit)
        return [ReconciliationRead.model_validate(r) for r in rows]
