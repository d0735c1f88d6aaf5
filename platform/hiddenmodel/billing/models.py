"""Stripe's webhook events (global: they arrive before anyone knows the organization) and the
daily reconciliation rows (org-scoped, under RLS)."""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column, org_id_column, uuid_pk


class UsageStripeStatus(enum.StrEnum):
    """Where a usage event stands with Stripe (``usage_events.stripe_status``)."""

    PENDING = "pending"
    SENT = "sent"
    # The organization had no Stripe customer when the event came due: nothing to bill.
    NOT_BILLED = "not_billed"
    # Still unsent when Stripe's 35-day backdating window closed.
    FAILED = "failed"


class StripeEventOutcome(enum.StrEnum):
    APPLIED = "applied"
    IGNORED = "ignored"
    STALE = "stale"
    UNKNOWN_CUSTOMER = "unknown_customer"


class StripeEvent(Base):
    """One Stripe webhook event, stored once by its id and handled once (``handled_at``)."""

    __tablename__ = "stripe_events"
    __table_args__ = (Index("ix_stripe_events_customer_created", "customer_id", "created"),)

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    type: Mapped[str] = mapped_column(String(100), nullable=False)
    # Stripe's own creation time: orders events of one customer that arrive out of order.
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    livemode: Mapped[bool] = mapped_column(Boolean, nullable=False)
    customer_id: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    received_at: Mapped[datetime] = created_at_column()
    handled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(String(32))


class ReconciliationStatus(enum.StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    ERROR = "error"


class BillingReconciliation(Base):
    """One organization's day: the usage we marked sent against what Stripe aggregated."""

    __tablename__ = "billing_reconciliations"
    __table_args__ = (
        UniqueConstraint("organization_id", "day", name="uq_billing_reconciliations_org_day"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    day: Mapped[date] = mapped_column(Date, nullable=False)
    stripe_customer_id: Mapped[str] = mapped_column(String(255), nullable=False)
    # Meter units (GPU-milliseconds), see hiddenmodel.billing.metering.meter_value.
    our_value: Mapped[int] = mapped_column(BigInteger, nullable=False)
    our_events: Mapped[int] = mapped_column(Integer, nullable=False)
    stripe_value: Mapped[float | None] = mapped_column(Float)
    difference: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = created_at_column()
