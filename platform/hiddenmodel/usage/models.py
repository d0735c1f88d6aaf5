"""Plans (operator-managed), per-org billing state, quota counters, reservations, usage."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Integer,
    Numeric,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column, org_id_column, uuid_pk


class Plan(Base):
    __tablename__ = "plans"

    id: Mapped[uuid.UUID] = uuid_pk()
    code: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    name: Mapped[str] = mapped_column(String(200), nullable=False)
    stripe_price_id: Mapped[str | None] = mapped_column(String(255))
    price_per_gpu_second: Mapped[Decimal] = mapped_column(Numeric(12, 6), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False, default="usd")
    included_gpu_seconds: Mapped[float] = mapped_column(Float, nullable=False, default=0)
    included_images: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    monthly_gpu_seconds: Mapped[float | None] = mapped_column(Float)
    monthly_images: Mapped[int | None] = mapped_column(Integer)
    max_running_jobs: Mapped[int | None] = mapped_column(Integer)
    max_queued_jobs: Mapped[int | None] = mapped_column(Integer)
    storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    org_requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    # Days a finished job's inputs and outputs are kept; null: forever (hiddenmodel.retention).
    retention_days: Mapped[int | None] = mapped_column(Integer)
    is_default: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = created_at_column()


class OrgBilling(Base):
    """An organization's plan, limit overrides and Stripe state (absent: the default plan)."""

    __tablename__ = "org_billing"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    plan_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("plans.id"), nullable=False
    )
    overrides: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255))
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255))
    subscription_status: Mapped[str | None] = mapped_column(String(32))
    past_due_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = created_at_column()


class QuotaLimit(Base):
    """Sub-limits a tenant admin sets for one member or one API key."""

    __tablename__ = "quota_limits"

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    subject_type: Mapped[str] = mapped_column(String(16), nullable=False)
    subject_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    limits: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = created_at_column()


class QuotaCounter(Base):
    __tablename__ = "quota_counters"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    subject_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    subject_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    period: Mapped[date] = mapped_column(Date, primary_key=True)
    gpu_seconds_used: Mapped[float] = mapped_column(Float, nullable=False, default=0)
    gpu_seconds_reserved: Mapped[float] = mapped_column(Float, nullable=False, default=0)
    images_used: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    images_reserved: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    bytes_used: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class QuotaReservation(Base):
    __tablename__ = "quota_reservations"

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    period: Mapped[date] = mapped_column(Date, nullable=False)
    user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    gpu_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    images: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="held")
    created_at: Mapped[datetime] = created_at_column()
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UsageEvent(Base):
    """One per finished billable job, written in the transaction that finishes it."""

    __tablename__ = "usage_events"

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    job_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    operation: Mapped[str] = mapped_column(String(64), nullable=False)
    outcome: Mapped[str] = mapped_column(String(16), nullable=False)
    gpu_seconds: Mapped[float] = mapped_column(Float, nullable=False)
    images: Mapped[int] = mapped_column(Integer, nullable=False)
    megapixels: Mapped[float] = mapped_column(Float, nullable=False)
    created_at: Mapped[datetime] = created_at_column()
    stripe_status: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    stripe_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    stripe_next_attempt_at: Mapped[datetime] = created_at_column()
    stripe_last_error: Mapped[str | None] = mapped_column(Text)
    stripe_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class UsageDaily(Base):
    """Usage events summed per organization, UTC day, operation, member and API key.

    Kept by a trigger on ``usage_events`` (migration 0018), in the transaction that writes
    the event; the reports read these rows, never the events. Sums are exact decimals of
    the events' values."""

    __tablename__ = "usage_daily"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    organization_id: Mapped[uuid.UUID] = org_id_column()
    day: Mapped[date] = mapped_column(Date, nullable=False)
    operation: Mapped[str] = mapped_column(String(64), nullable=False)
    user_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    jobs: Mapped[int] = mapped_column(BigInteger, nullable=False)
    gpu_seconds: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
    images: Mapped[int] = mapped_column(BigInteger, nullable=False)
    megapixels: Mapped[Decimal] = mapped_column(Numeric, nullable=False)
