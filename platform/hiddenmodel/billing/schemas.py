"""Bodies of the billing API."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from pydantic import BaseModel, ConfigDict, Field

from hiddenmodel.inputs import RequestModel


class CheckoutCreate(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"plan": "pro"}]})

    plan: str = Field(min_length=1, max_length=64, description="Code of the plan to subscribe to.")


class CheckoutRead(BaseModel):
    id: str = Field(description="Stripe Checkout Session id")
    url: str = Field(description="Send the customer here to subscribe.")


class PortalRead(BaseModel):
    url: str = Field(description="Stripe customer portal: payment methods, invoices, plan.")


class BillingRead(BaseModel):
    plan: str
    plan_name: str
    subscription_status: str | None = Field(description="Stripe's status; null: none yet")
    stripe_subscription_id: str | None
    past_due_since: datetime | None
    stripe_customer_id: str | None


class StripeWebhookReceipt(BaseModel):
    received: bool = True
    duplicate: bool = Field(description="true: this event was already stored and handled")
    outcome: str | None = Field(
        default=None, description="applied, ignored, stale or unknown_customer"
    )


class ReconciliationRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    organization_id: uuid.UUID
    day: date
    stripe_customer_id: str
    our_value: int = Field(description="GPU-milliseconds we marked sent for this day")
    our_events: int
    stripe_value: float | None = Field(description="What Stripe's meter aggregated")
    difference: float | None = Field(description="stripe_value - our_value")
    status: str = Field(description="match, mismatch or error")
    error: str | None
    checked_at: datetime
