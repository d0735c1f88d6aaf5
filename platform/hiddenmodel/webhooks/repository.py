"""All SQL of webhooks. Delivery state changes are compare-and-set on ``(status, attempts)``.

Async functions serve the API; the ``*_sync`` ones serve the job runner, the dispatcher and
the delivery task, which run on plain threads.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Select, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.pagination import paginate
from hiddenmodel.webhooks.models import (
    DeliveryStatus,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
)

PENDING = DeliveryStatus.PENDING.value
DELIVERING = DeliveryStatus.DELIVERING.value
LIVE = (PENDING, DELIVERING)


@lru_cache(maxsize=64)
def _subscribed(event_type: str) -> Select[tuple[WebhookEndpoint]]:
    # Built once per event type: a job's finish asks, and building it took longer than
    # running it.
    return (
        select(WebhookEndpoint)
        .where(
            WebhookEndpoint.enabled.is_(True),
            or_(
                func.cardinality(WebhookEndpoint.event_types) == 0,
                WebhookEndpoint.event_types.contains([event_type]),
            ),
        )
        .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    )


# --- endpoints ---------------------------------------------------------------------------


async def get_endpoint(session: AsyncSession, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
    return await session.get(WebhookEndpoint, endpoint_id, populate_existing=True)


async def count_endpoints(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(WebhookEndpoint)) or 0)


async def list_endpoints(
    session: AsyncSession, cursor: str | None, limit: int
) -> tuple[Sequence[Any], str | None]:
    return await paginate(
        session,
        select(WebhookEndpoint),
        created_at=WebhookEndpoint.created_at,
        id_=WebhookEndpoint.id,
        cursor=cursor,
        limit=limit,
    )


async def delete_endpoint(session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    await session.delete(endpoint)


def subscribed_endpoints_sync(session: Session, event_type: str) -> Sequence[WebhookEndpoint]:
    return session.scalars(_subscribed(event_type)).all()


def get_endpoint_sync(session: Session, endpoint_id: uuid.UUID) -> WebhookEndpoint | None:
    return session.get(WebhookEndpoint, endpoint_id, populate_existing=True)


# --- deliveries (API) --------------------------------------------------------------------


async def get_delivery(session: AsyncSession, delivery_id: uuid.UUID) -> WebhookDelivery | None:
    return await session.get(WebhookDelivery, delivery_id, populate_existing=True)


async def list_deliveries(
    session: AsyncSession,
    endpoint_id: uuid.UUID,
    status: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[Any], str | None]:
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if status:
        stmt = stmt.where(WebhookDelivery.status == status)
    return await paginate(
        session,
        stmt,
        created_at=WebhookDelivery.created_at,
        id_=WebhookDelivery.id,
        cursor=cursor,
        limit=limit,
    )


async def list_attempts(
    session: AsyncSession, delivery_id: uuid.UUID
) -> Sequence[WebhookDeliveryAttempt]:
    stmt = (
        select(WebhookDeliveryAttempt)
        .where(WebhookDeliveryAttempt.delivery_id == delivery_id)
        .order_by(WebhookDeliveryAttempt.attempt)
    )
    return (await session.scalars(stmt)).all()


# --- delivery task (inside the delivery's tenant session) --------------------------------


def claim_sync(
    session: Session, delivery_id: uuid.UUID, lease: timedelta, max_attempts: int
) -> WebhookDelivery | None:
    """pending (due) or delivering (lease expired) → delivering, one attempt more; the winner
    holds the delivery until ``now + lease``. Only for an enabled endpoint."""
    enabled = (
        select(WebhookEndpoint.id)
        .where(
            WebhookEndpoint.id == WebhookDelivery.endpoint_id,
            WebhookEndpoint.enabled.is_(True),
        )
        .exists()
    )
    return session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status.in_(LIVE),
            WebhookDelivery.next_attempt_at <= func.now(),
            WebhookDelivery.attempts < max_attempts,
            enabled,
        )
        .values(
            status=DELIVERING,
            attempts=WebhookDelivery.attempts + 1,
            last_attempt_at=func.now(),
            next_attempt_at=func.now() + lease,
        )
        .returning(WebhookDelivery)
    ).scalar_one_or_none()


@dataclass(frozen=True)
class DeliveryState:
    """What a delivery that could not be claimed is doing instead."""

    status: str
    attempts: int
    due_in_seconds: float | None
    endpoint_enabled: bool


def delivery_state_sync(session: Session, delivery_id: uuid.UUID) -> DeliveryState | None:
    row = session.execute(
        select(
            WebhookDelivery.status,
            WebhookDelivery.attempts,
            func.extract("epoch", WebhookDelivery.next_attempt_at - func.now()),
            WebhookEndpoint.enabled,
        )
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id)
    ).one_or_none()
    if row is None:
        return None
    due = float(row[2]) if row[2] is not None else None
    return DeliveryState(
        status=row[0], attempts=row[1], due_in_seconds=due, endpoint_enabled=bool(row[3])
    )


def give_up_sync(
    session: Session, delivery_id: uuid.UUID, attempts: int, status: str, error: str
) -> bool:
    """A live delivery that will not be attempted again (endpoint disabled, attempts spent)."""
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == status,
            WebhookDelivery.attempts == attempts,
        )
        .values(status=DeliveryStatus.FAILED.value, next_attempt_at=None, last_error=error)
        .returning(WebhookDelivery.id)
    )
    return result.scalar_one_or_none() is not None


def finish_attempt_sync(
    session: Session,
    delivery_id: uuid.UUID,
    attempt: int,
    *,
    succeeded: bool,
    retry_in: float | None,
    status_code: int | None,
    error: str | None,
) -> bool:
    """delivering → succeeded, pending (retry at ``now + retry_in``) or failed; only for the
    attempt that holds the delivery, so a worker whose lease ran out changes nothing."""
    values: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    if succeeded:
        values.update(
            status=DeliveryStatus.SUCCEEDED.value, next_attempt_at=None, delivered_at=func.now()
        )
    elif retry_in is not None:
        values.update(
            status=PENDING,
            next_attempt_at=func.now() + timedelta(seconds=retry_in),
            enqueued_at=func.now(),
        )
    else:
        values.update(status=DeliveryStatus.FAILED.value, next_attempt_at=None)
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DELIVERING,
            WebhookDelivery.attempts == attempt,
        )
        .values(**values)
        .returning(WebhookDelivery.id)
    )
    return result.scalar_one_or_none() is not None


def add_attempt_sync(session: Session, attempt: WebhookDeliveryAttempt) -> None:
    session.add(attempt)


# --- sweeper (across tenants through a definer function, ids only) -----------------------


def due_deliveries_sync(
    session: Session, grace_seconds: float, limit: int
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(organization, delivery) of live deliveries whose message may be lost; marks them
    re-enqueued."""
    rows = session.execute(
        text("SELECT * FROM hm_webhook_deliveries_due(:grace, :limit)"),
        {"grace": grace_seconds, "limit": limit},
    )
    return [(r[0], r[1]) for r in rows]
