"""Webhook tables (org-scoped, under RLS)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column, org_id_column, uuid_pk


class EventType(enum.StrEnum):
    JOB_SUCCEEDED = "job.succeeded"
    JOB_FAILED = "job.failed"
    JOB_CANCELED = "job.canceled"
    JOB_EXPIRED = "job.expired"
    BATCH_COMPLETED = "batch.completed"
    WEBHOOK_TEST = "webhook.test"


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERING = "delivering"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (DeliveryStatus.SUCCEEDED, DeliveryStatus.FAILED)


class WebhookEndpoint(Base):
    """Where an organization wants its events, and the secret(s) they are signed with.

    Secrets are stored only encrypted (see :mod:`hiddenmodel.webhooks.signing`). During a
    rotation the previous secret keeps signing until ``previous_secret_expires_at``.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        # Target of the deliveries' composite foreign key: a delivery and its endpoint always
        # belong to the same organization.
        UniqueConstraint("organization_id", "id", name="uq_webhook_endpoints_org_id"),
        Index("ix_webhook_endpoints_org_created", "organization_id", "created_at", "id"),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    url: Mapped[str] = mapped_column(String(2048), nullable=False)
    description: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    # Empty: every event type.
    event_types: Mapped[list[str]] = mapped_column(ARRAY(String(64)), nullable=False, default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    secret_ciphertext: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    previous_secret_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )


class WebhookDelivery(Base):
    """One message owed to one endpoint, with the state of its retries.

    ``next_attempt_at`` is the truth about when to try again: while ``pending`` it is the due
    time, while ``delivering`` the end of the worker's lease (after which another may claim it).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "endpoint_id"],
            ["webhook_endpoints.organization_id", "webhook_endpoints.id"],
            ondelete="CASCADE",
            name="fk_webhook_deliveries_endpoint",
        ),
        UniqueConstraint("organization_id", "id", name="uq_webhook_deliveries_org_id"),
        Index(
            "ix_webhook_deliveries_org_endpoint_created",
            "organization_id",
            "endpoint_id",
            "created_at",
            "id",
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    endpoint_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    # ``webhook-id``: one per event, shared by its endpoints, kept by retries and redeliveries.
    message_id: Mapped[str] = mapped_column(String(64), nullable=False)
    status: Mapped[str] = mapped_column(
        String(16), nullable=False, default=DeliveryStatus.PENDING.value
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When a message for it was last handed to the broker; the sweeper re-sends only after a
    # grace period, so a backlog is not flooded with duplicates.
    enqueued_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    redelivery_of: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = created_at_column()


class WebhookDeliveryAttempt(Base):
    """One HTTP request made for a delivery: the delivery log's detail."""

    __tablename__ = "webhook_delivery_attempts"
    __table_args__ = (
        ForeignKeyConstraint(
            ["organization_id", "delivery_id"],
            ["webhook_deliveries.organization_id", "webhook_deliveries.id"],
            ondelete="CASCADE",
            name="fk_webhook_delivery_attempts_delivery",
        ),
        UniqueConstraint(
            "organization_id", "delivery_id", "attempt", name="uq_webhook_delivery_attempts"
        ),
    )

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    delivery_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    response_body: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    created_at: Mapped[datetime] = created_at_column()
