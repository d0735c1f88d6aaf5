"""Batch tables (org-scoped, under RLS)."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from hiddenmodel.db import Base
from hiddenmodel.models import created_at_column, org_id_column, uuid_pk


class BatchStatus(enum.StrEnum):
    # Taking items; nothing admitted yet.
    OPEN = "open"
    # Admitted: every ready item is a job.
    SUBMITTED = "submitted"
    # Every job has ended.
    COMPLETED = "completed"
    # Canceled: before submit, or after it once every job has ended.
    CANCELED = "canceled"

    @property
    def ended(self) -> bool:
        return self in (BatchStatus.COMPLETED, BatchStatus.CANCELED)


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="SET NULL")
    )
    name: Mapped[str | None] = mapped_column(String(200))
    webhook_tag: Mapped[str | None] = mapped_column(String(200))
    operation: Mapped[str] = mapped_column(String(64), nullable=False)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    item_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    submitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at_column()


class BatchItem(Base):
    """One photo of a batch (with its optional mask and interior frame), and its job's id."""

    __tablename__ = "batch_items"

    id: Mapped[uuid.UUID] = uuid_pk()
    organization_id: Mapped[uuid.UUID] = org_id_column()
    batch_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("batches.id", ondelete="CASCADE"), nullable=False
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String(512), nullable=False)
    # The batch's params with the item's own over them, validated.
    params: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    # Like ``Job.inputs``: {"image": {"key", "format", ...}, "mask": {...}}; empty when rejected.
    inputs: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), nullable=False)
    gpu_seconds_estimate: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    images_estimate: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # Set when the item was refused at intake (a damaged photo): it never becomes a job.
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at_column()
