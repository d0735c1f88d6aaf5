"""Shared column helpers and the core tables that belong to no organization."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Any, TypeVar

from sqlalchemy import DateTime, ForeignKey, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, configure_mappers, mapped_column

from hiddenmodel.db import Base

_M = TypeVar("_M", bound=Base)


_FROM_JSON: dict[type, Callable[[Any], Any]] = {
    uuid.UUID: uuid.UUID,
    datetime: datetime.fromisoformat,
    float: float,  # JSON writes a whole float as an integer (``0`` for ``0.0``)
}


@cache
def _column_kinds(model: type[Base]) -> list[tuple[str, str, Callable[[Any], Any] | None]]:
    """(JSON name, attribute, conversion from JSON's value) for each column of ``model``.

    Configures the mappers first: an instance made before any query or session has used them
    (a worker's first claim) would otherwise have attributes that cannot be read."""
    configure_mappers()
    kinds = []
    for column in model.__table__.c:
        kind = column.type.python_type
        kinds.append((column.name, column.key, _FROM_JSON.get(kind)))
    return kinds


def from_json(model: type[_M], data: dict[str, Any]) -> _M:
    """A detached instance from a row sent as JSON (``to_jsonb``): every column, typed.

    The values go straight into the instance's dict, as the ORM's own loading puts them
    there, not through the constructor's instrumented attribute sets (which record each one
    as a change to flush): five times faster, and a key, its organization and a job are
    read this way on every poll.
    """
    instance: _M = model._sa_class_manager.new_instance()  # type: ignore[attr-defined]
    values = instance.__dict__
    for name, key, convert in _column_kinds(model):
        value = data.get(name)
        values[key] = value if value is None or convert is None else convert(value)
    return instance


def uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)


def created_at_column() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


def org_id_column() -> Mapped[uuid.UUID]:
    return mapped_column(
        UUID(as_uuid=True), ForeignKey("organizations.id", ondelete="CASCADE"), nullable=False
    )


class OperatorAuditEvent(Base):
    """One row per use of the cross-tenant ops session."""

    __tablename__ = "operator_audit_events"

    id: Mapped[uuid.UUID] = uuid_pk()
    actor: Mapped[str] = mapped_column(String(320), nullable=False)
    purpose: Mapped[str] = mapped_column(String(200), nullable=False)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, default=dict)
    created_at: Mapped[datetime] = created_at_column()


class EmailMessage(Base):
    """Mail recorded by the default sender (readable by tests and the portal)."""

    __tablename__ = "email_messages"

    id: Mapped[uuid.UUID] = uuid_pk()
    to_address: Mapped[str] = mapped_column(String(320), nullable=False, index=True)
    subject: Mapped[str] = mapped_column(String(300), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    created_at: Mapped[datetime] = created_at_column()


class OutgoingMail(Base):
    """A message for the SMTP relay, kept until the relay has taken it (the outbox): written
    before the first try, so a relay that is down loses nothing; retried with backoff."""

    __tablename__ = "mail_outbox"

    id: Mapped[uuid.UUID] = uuid_pk()
    to_address: Mapped[str] = mapped_column(String(320), nullable=False)
    subject: Mapped[str] = mapped_column(String(300), nullable=False)
    body: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(String(50), nullable=False)
    # pending → sent, or failed after the last attempt.
    status: Mapped[str] = mapped_column(String(20), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = created_at_column()
