"""All SQL of billing. Usage-event transitions are compare-and-set on ``stripe_status`` (and
``stripe_attempts`` once claimed), so two pushers never both act on one event.

Async functions serve the API and Stripe's webhook; the ``*_sync`` ones serve the pusher and
the reconciliation, which run in Celery workers.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, literal, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from hiddenmodel.billing.models import (
    BillingReconciliation,
    StripeEvent,
    StripeEventOutcome,
    UsageStripeStatus,
)
from hiddenmodel.usage.models import OrgBilling, Plan, UsageEvent

PENDING = UsageStripeStatus.PENDING.value

# --- plans and the organization's billing row --------------------------------------------


async def get_billing(session: AsyncSession) -> OrgBilling | None:
    """The bound organization's billing row (RLS scopes the table to it)."""
    return (await session.scalars(select(OrgBilling))).one_or_none()


async def lock_billing(session: AsyncSession, org_id: uuid.UUID) -> OrgBilling:
    """The organization's billing row, created on the default plan when absent, locked until
    the end of the transaction so concurrent changes to it are serialised."""
    await session.execute(
        insert(OrgBilling)
        .from_select(
            ["organization_id", "plan_id"],
            select(literal(org_id, OrgBilling.organization_id.type), Plan.id).where(
                Plan.is_default
            ),
        )
        .on_conflict_do_nothing(index_elements=["organization_id"])
    )
    billing = (
        await session.scalars(
            select(OrgBilling)
            .where(OrgBilling.organization_id == org_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).one_or_none()
    if billing is None:
        raise RuntimeError("no default plan is configured")
    return billing


async def get_plan(session: AsyncSession, plan_id: uuid.UUID) -> Plan | None:
    return await session.get(Plan, plan_id)


async def get_plan_by_code(session: AsyncSession, code: str) -> Plan | None:
    return (await session.scalars(select(Plan).where(Plan.code == code))).one_or_none()


async def get_default_plan(session: AsyncSession) -> Plan | None:
    return (await session.scalars(select(Plan).where(Plan.is_default))).one_or_none()


async def get_plan_by_prices(session: AsyncSession, price_ids: Sequence[str]) -> Plan | None:
    """The plan whose Stripe price is one of ``price_ids`` (a subscription's items)."""
    if not price_ids:
        return None
    return (
        await session.scalars(
            select(Plan).where(Plan.stripe_price_id.in_(price_ids)).order_by(Plan.code).limit(1)
        )
    ).first()


# --- Stripe webhook events ---------------------------------------------------------------


async def orgs_by_customer(session: AsyncSession, customer_id: str) -> list[uuid.UUID]:
    """Organizations whose billing row holds ``customer_id`` (definer function, ids only)."""
    rows = await session.execute(
        text("SELECT out_org FROM hm_org_by_stripe_customer(:customer)"),
        {"customer": customer_id},
    )
    return [r[0] for r in rows]


async def store_event(
    session: AsyncSession, event: dict[str, Any], customer_id: str | None
) -> bool:
    """Insert the event unless its id is already stored; True when this call stored it.

    A concurrent delivery of the same event waits on the primary key until the first commits,
    then stores nothing.
    """
    stored = await session.execute(
        insert(StripeEvent)
        .values(
            id=event["id"],
            type=event["type"],
            created=datetime.fromtimestamp(int(event["created"]), tz=UTC),
            livemode=bool(event.get("livemode", False)),
            customer_id=customer_id,
            payload=event,
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(StripeEvent.id)
    )
    return stored.scalar_one_or_none() is not None


async def newer_applied_event(
    session: AsyncSession, event_id: str, customer_id: str, type_prefix: str, created: datetime
) -> bool:
    """Has an event of the same kind for this customer, created later, already been applied?"""
    found = await session.scalar(
        select(StripeEvent.id)
        .where(
            StripeEvent.customer_id == customer_id,
            StripeEvent.type.startswith(type_prefix, autoescape=True),
            StripeEvent.created > created,
            StripeEvent.outcome == StripeEventOutcome.APPLIED.value,
            StripeEvent.id != event_id,
        )
        .limit(1)
    )
    return found is not None


async def finish_event(session: AsyncSession, event_id: str, outcome: StripeEventOutcome) -> None:
    await session.execute(
        update(StripeEvent)
        .where(StripeEvent.id == event_id)
        .values(handled_at=func.now(), outcome=outcome.value)
    )


# --- reconciliation report (operators, through the ops session) --------------------------


async def list_reconciliations(
    session: AsyncSession, day: date | None, status: str | None, limit: int
) -> Sequence[BillingReconciliation]:
    stmt = select(BillingReconciliation)
    if day is not None:
        stmt = stmt.where(BillingReconciliation.day == day)
    if status is not None:
        stmt = stmt.where(BillingReconciliation.status == status)
    stmt = stmt.order_by(
        BillingReconciliation.day.desc(),
        BillingReconciliation.status,
        BillingReconciliation.organization_id,
    ).limit(limit)
    return (await session.scalars(stmt)).all()


# --- the pusher (ids across tenants, then each event inside its organization) ------------


def due_usage_events_sync(session: Session, limit: int) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(organization, usage event) of pending events whose next attempt is due."""
    rows = session.execute(
        text("SELECT out_org, out_event FROM hm_usage_events_due(:limit)"), {"limit": limit}
    )
    return [(r[0], r[1]) for r in rows]


def get_usage_event_sync(session: Session, event_id: uuid.UUID) -> UsageEvent | None:
    return session.get(UsageEvent, event_id, populate_existing=True)


def get_customer_id_sync(session: Session) -> str | None:
    return session.scalar(select(OrgBilling.stripe_customer_id))


def _due(event_id: uuid.UUID) -> tuple[Any, ...]:
    return (
        UsageEvent.id == event_id,
        UsageEvent.stripe_status == PENDING,
        UsageEvent.stripe_next_attempt_at <= func.now(),
    )


def close_unsent_sync(
    session: Session, event_id: uuid.UUID, status: UsageStripeStatus, error: str | None
) -> bool:
    """A due, pending event that will not be sent: ``not_billed`` or ``failed``."""
    result = session.execute(
        update(UsageEvent)
        .where(*_due(event_id))
        .values(stripe_status=status.value, stripe_last_error=error)
        .returning(UsageEvent.id)
    )
    return result.scalar_one_or_none() is not None


def claim_usage_event_sync(session: Session, event_id: uuid.UUID, lease: timedelta) -> int | None:
    """Take a due, pending event for one attempt: no other pusher sees it due until
    ``now + lease``. Returns the attempt number, or None when someone else has it."""
    result = session.execute(
        update(UsageEvent)
        .where(*_due(event_id))
        .values(
            stripe_attempts=UsageEvent.stripe_attempts + 1,
            stripe_next_attempt_at=func.now() + lease,
        )
        .returning(UsageEvent.stripe_attempts)
    )
    return result.scalar_one_or_none()


def _holding(event_id: uuid.UUID, attempt: int) -> tuple[Any, ...]:
    return (
        UsageEvent.id == event_id,
        UsageEvent.stripe_status == PENDING,
        UsageEvent.stripe_attempts == attempt,
    )


def mark_sent_sync(session: Session, event_id: uuid.UUID, attempt: int) -> bool:
    """pending → sent, only for the attempt that holds the event: marked once."""
    result = session.execute(
        update(UsageEvent)
        .where(*_holding(event_id, attempt))
        .values(
            stripe_status=UsageStripeStatus.SENT.value,
            stripe_sent_at=func.now(),
            stripe_last_error=None,
        )
        .returning(UsageEvent.id)
    )
    return result.scalar_one_or_none() is not None


def schedule_retry_sync(
    session: Session, event_id: uuid.UUID, attempt: int, delay: timedelta, error: str
) -> bool:
    result = session.execute(
        update(UsageEvent)
        .where(*_holding(event_id, attempt))
        .values(stripe_next_attempt_at=func.now() + delay, stripe_last_error=error)
        .returning(UsageEvent.id)
    )
    return result.scalar_one_or_none() is not None


# --- the reconciliation (organizations with a customer, then each inside its tenant) ------


def billed_orgs_sync(session: Session) -> list[uuid.UUID]:
    """Organizations that have a Stripe customer (definer function, ids only)."""
    return [r[0] for r in session.execute(text("SELECT out_org FROM hm_billing_customer_orgs()"))]


def sent_gpu_seconds_sync(session: Session, start: datetime, end: datetime) -> list[float]:
    """GPU-seconds of the bound organization's events sent to Stripe, by event time."""
    rows = session.scalars(
        select(UsageEvent.gpu_seconds).where(
            UsageEvent.stripe_status == UsageStripeStatus.SENT.value,
            UsageEvent.created_at >= start,
            UsageEvent.created_at < end,
        )
    )
    return list(rows)


def save_reconciliation_sync(session: Session, values: dict[str, Any]) -> None:
    """Insert or replace the (organization, day) row: a later run supersedes an earlier one."""
    stmt = insert(BillingReconciliation).values(id=uuid.uuid4(), **values)
    session.execute(
        stmt.on_conflict_do_update(
            constraint="uq_billing_reconciliations_org_day",
            set_={k: stmt.excluded[k] for k in values if k not in ("organization_id", "day")},
        )
    )
