"""The Stripe API as billing uses it: one configured client and the few calls we make.

The official SDK does the HTTP: timeouts from settings, and its own retries of connection
errors, 409 and 5xx answers, each retry with the same ``Idempotency-Key``. Everything here is
blocking; the API calls it from a worker thread.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

import stripe

from hiddenmodel.errors import Problem
from hiddenmodel.settings import get_settings


class StripeNotConfigured(Problem):
    status, kind, title = 503, "billing-unavailable", "Billing unavailable"


class StripeUnavailable(Problem):
    status, kind, title = 502, "stripe-unavailable", "Stripe unavailable"


@lru_cache
def stripe_client() -> stripe.StripeClient:
    """The process's Stripe client (``stripe_client.cache_clear()`` after changing settings)."""
    settings = get_settings()
    if settings.stripe_api_key is None:
        raise StripeNotConfigured("Stripe is not configured on this server.")
    base = settings.stripe_api_base
    return stripe.StripeClient(
        settings.stripe_api_key.get_secret_value(),
        base_addresses={"api": base} if base else None,
        max_network_retries=settings.stripe_max_network_retries,
        http_client=stripe.RequestsClient(timeout=settings.stripe_timeout_seconds),
    )


def is_configured() -> bool:
    return get_settings().stripe_api_key is not None


def describe(exc: stripe.StripeError) -> str:
    """A short, secret-free line for logs and ``stripe_last_error``."""
    status = f" (HTTP {exc.http_status})" if exc.http_status else ""
    message = (exc.user_message or str(exc) or "").strip().splitlines()
    return f"{type(exc).__name__}{status}: {message[0] if message else 'no message'}"[:500]


def create_customer(org_id: uuid.UUID, name: str, slug: str) -> str:
    """A customer for the organization; the key derived from its id makes a repeated call
    (two requests at once, a retry after a lost answer) return the same customer."""
    customer = stripe_client().v1.customers.create(
        {
            "name": name,
            "metadata": {"organization_id": str(org_id), "organization_slug": slug},
        },
        {"idempotency_key": f"hm-customer-{org_id}"},
    )
    return customer.id


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str


def create_checkout_session(
    *,
    customer_id: str,
    price_id: str,
    org_id: uuid.UUID,
    plan_code: str,
    success_url: str,
    cancel_url: str,
) -> CheckoutSession:
    metadata = {"organization_id": str(org_id), "plan": plan_code}
    session = stripe_client().v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": str(org_id),
            # A metered price takes no quantity: Stripe bills what the meter aggregates.
            "line_items": [{"price": price_id}],
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": metadata,
            "subscription_data": {"metadata": metadata},
        }
    )
    if session.url is None:
        raise StripeUnavailable("Stripe returned a checkout session without a URL.")
    return CheckoutSession(id=session.id, url=session.url)


def create_portal_session(*, customer_id: str, return_url: str) -> str:
    session = stripe_client().v1.billing_portal.sessions.create(
        {"customer": customer_id, "return_url": return_url}
    )
    return session.url


def send_meter_event(
    *,
    event_name: str,
    customer_id: str,
    value: int,
    identifier: str,
    timestamp: datetime,
    idempotency_key: str,
) -> None:
    """One meter event. Stripe deduplicates on ``identifier``; the idempotency key covers the
    SDK's retries of this one attempt."""
    stripe_client().v1.billing.meter_events.create(
        {
            "event_name": event_name,
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "identifier": identifier,
            "timestamp": int(timestamp.timestamp()),
        },
        {"idempotency_key": idempotency_key},
    )


def meter_total(*, meter_id: str, customer_id: str, start: datetime, end: datetime) -> float:
    """What Stripe aggregated on the meter for the customer in ``[start, end)``."""
    summaries = stripe_client().v1.billing.meters.event_summaries.list(
        meter_id,
        {
            "customer": customer_id,
            "start_time": int(start.timestamp()),
            "end_time": int(end.timestamp()),
        },
    )
    return float(sum(s.aggregated_value for s in summaries.auto_paging_iter()))
