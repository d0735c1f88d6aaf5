"""Usage to Stripe and back: usage events pushed as billing meter events, and the daily
comparison of what we sent with what Stripe's meter aggregated.

Unit: Stripe's meter accepts whole numbers only, so the value sent is the event's GPU time in
whole **GPU-milliseconds** (half rounds up). Each event is rounded on its own, at most half a
millisecond per event, and the reconciliation rounds the same way.

The usage event row is the truth. The pusher finds due events across tenants through a
definer function (ids only), then for each one inside its organization's tenant session:

* no Stripe customer → ``not_billed`` (the organization was not subscribed; nothing to bill);
* older than Stripe's 35-day backdating window → ``failed``, logged and counted for operators;
* otherwise claims it for one attempt (``stripe_attempts + 1``, not due again until a lease
  runs out), sends it with ``identifier`` = the event id outside any transaction, and marks it
  ``sent`` only if that attempt still holds it. A failure keeps it ``pending`` with the error
  and the next attempt after an exponential backoff. Stripe deduplicates on the identifier, so
  an attempt whose answer was lost and is sent again is counted once.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import stripe

from hiddenmodel.billing import gateway, repository
from hiddenmodel.billing.models import ReconciliationStatus, UsageStripeStatus
from hiddenmodel.db import global_session, tenant_session
from hiddenmodel.settings import get_settings
from hiddenmodel.tenancy import org_context

log = logging.getLogger(__name__)

# Stripe refuses meter events timestamped more than 35 days ago; the margin covers the time
# between this check and Stripe receiving the event.
METER_WINDOW = timedelta(days=35)
WINDOW_MARGIN = timedelta(minutes=10)
WINDOW_EXPIRED = "older than Stripe's 35-day meter event window; never sent"


def meter_value(gpu_seconds: float) -> int:
    """GPU-seconds as the whole GPU-milliseconds the meter counts."""
    millis = Decimal(repr(gpu_seconds)) * 1000
    return int(millis.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def backoff(attempt: int) -> timedelta:
    """Delay after failed attempt ``attempt`` (1-based): exponential, capped, jittered down to
    half so events that failed together are not retried together."""
    settings = get_settings()
    ceiling = min(
        settings.stripe_push_backoff_cap_seconds,
        settings.stripe_push_backoff_base_seconds * 2.0 ** (attempt - 1),
    )
    return timedelta(seconds=ceiling * random.uniform(0.5, 1.0))


def claim_lease() -> timedelta:
    """Longer than one attempt can take: every SDK try timing out, plus its sleeps between."""
    settings = get_settings()
    tries = settings.stripe_max_network_retries + 1
    sleeps = settings.stripe_max_network_retries * stripe.RequestsClient.MAX_DELAY
    return timedelta(seconds=tries * settings.stripe_timeout_seconds + sleeps + 60)


def push_due_usage_events(limit: int | None = None) -> dict[str, int]:
    """Send up to ``limit`` due usage events to Stripe; returns counts by what happened
    (``due``, ``sent``, ``retrying``, ``not_billed``, ``expired``, ``skipped``,
    ``superseded``; ``unconfigured`` when there is no Stripe API key)."""
    if not gateway.is_configured():
        # Nothing is decided without Stripe: events stay pending until it is configured.
        return {"unconfigured": 1}
    limit = limit or get_settings().stripe_push_batch_size
    with global_session() as session:
        due = repository.due_usage_events_sync(session, limit)
    counts: Counter[str] = Counter(due=len(due))
    for org_id, event_id in due:
        with org_context(org_id):
            counts[_push_one(org_id, event_id)] += 1
    if counts["expired"]:
        log.error("%s usage events expired unsent (Stripe's 35-day window)", counts["expired"])
    return dict(counts)


@dataclass(frozen=True)
class _Claimed:
    attempt: int
    customer_id: str
    value: int
    created_at: datetime


def _push_one(org_id: uuid.UUID, event_id: uuid.UUID) -> str:
    with tenant_session(org_id) as session:
        event = repository.get_usage_event_sync(session, event_id)
        if event is None or event.stripe_status != UsageStripeStatus.PENDING.value:
            return "skipped"
        customer_id = repository.get_customer_id_sync(session)
        if customer_id is None:
            closed = repository.close_unsent_sync(
                session, event_id, UsageStripeStatus.NOT_BILLED, None
            )
            return "not_billed" if closed else "skipped"
        if event.created_at < datetime.now(UTC) - METER_WINDOW + WINDOW_MARGIN:
            closed = repository.close_unsent_sync(
                session, event_id, UsageStripeStatus.FAILED, WINDOW_EXPIRED
            )
            if closed:
                log.error("usage event %s of %s expired unsent", event_id, org_id)
            return "expired" if closed else "skipped"
        attempt = repository.claim_usage_event_sync(session, event_id, claim_lease())
        if attempt is None:
            return "skipped"
        claimed = _Claimed(attempt, customer_id, meter_value(event.gpu_seconds), event.created_at)
    try:
        gateway.send_meter_event(
            event_name=get_settings().stripe_meter_event_name,
            customer_id=claimed.customer_id,
            value=claimed.value,
            identifier=str(event_id),
            timestamp=claimed.created_at,
            # One key per attempt: the SDK's retries of this attempt share it, and a later
            # attempt is not answered with a failure Stripe stored under an earlier key.
            idempotency_key=f"hm-usage-{event_id}-{claimed.attempt}",
        )
    except stripe.StripeError as exc:
        error = gateway.describe(exc)
        delay = backoff(claimed.attempt)
        with tenant_session(org_id) as session:
            repository.schedule_retry_sync(session, event_id, claimed.attempt, delay, error)
        log.warning(
            "usage event %s attempt %s failed (%s); next in %.0fs",
            event_id,
            claimed.attempt,
            error,
            delay.total_seconds(),
        )
        return "retrying"
    with tenant_session(org_id) as session:
        if repository.mark_sent_sync(session, event_id, claimed.attempt):
            return "sent"
    log.warning("usage event %s sent after its claim ran out; Stripe keeps one copy", event_id)
    return "superseded"


# --- the daily reconciliation ------------------------------------------------------------


@dataclass(frozen=True)
class ReconciliationLine:
    organization_id: uuid.UUID
    stripe_customer_id: str
    our_value: int
    our_events: int
    stripe_value: float | None
    difference: float | None
    status: ReconciliationStatus
    error: str | None = None


@dataclass
class ReconciliationReport:
    day: date
    lines: list[ReconciliationLine] = field(default_factory=list)

    @property
    def differences(self) -> list[ReconciliationLine]:
        return [line for line in self.lines if line.status != ReconciliationStatus.MATCH]

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "checked": len(self.lines),
            "matched": len(self.lines) - len(self.differences),
            "differences": [
                {**asdict(line), "organization_id": str(line.organization_id)}
                for line in self.differences
            ],
        }


class ReconciliationNotConfigured(RuntimeError):
    """No meter to compare with (``HM_STRIPE_METER_ID``)."""


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def reconcile(day: date) -> ReconciliationReport:
    """Compare, per organization with a Stripe customer, the usage we marked sent for ``day``
    (UTC, by event time) with what Stripe's meter aggregated; store one row per organization
    and day (a later run replaces it) and return the differences.

    Stripe aggregates asynchronously: run it for a day that is over, and again later; events
    of the day still waiting for a retry show as differences until they are sent.
    """
    meter_id = get_settings().stripe_meter_id
    if not meter_id:
        raise ReconciliationNotConfigured("HM_STRIPE_METER_ID is not set")
    start, end = day_bounds(day)
    with global_session() as session:
        orgs = repository.billed_orgs_sync(session)
    report = ReconciliationReport(day=day)
    for org_id in orgs:
        with org_context(org_id):
            line = _reconcile_org(org_id, meter_id, day, start, end)
        if line is None:
            continue
        report.lines.append(line)
        if line.status != ReconciliationStatus.MATCH:
            log.warning(
                "billing reconciliation %s %s: ours %s, Stripe %s (%s)",
                day,
                org_id,
                line.our_value,
                line.stripe_value,
                line.error or line.status.value,
            )
    return report


def _reconcile_org(
    org_id: uuid.UUID, meter_id: str, day: date, start: datetime, end: datetime
) -> ReconciliationLine | None:
    with tenant_session(org_id) as session:
        customer_id = repository.get_customer_id_sync(session)
        sent = repository.sent_gpu_seconds_sync(session, start, end)
    if customer_id is None:
        return None
    ours = sum(meter_value(s) for s in sent)
    theirs: float | None = None
    error: str | None = None
    try:
        theirs = gateway.meter_total(
            meter_id=meter_id, customer_id=customer_id, start=start, end=end
        )
    except stripe.StripeError as exc:
        error = gateway.describe(exc)
    difference = None if theirs is None else theirs - ours
    if difference is None:
        status = ReconciliationStatus.ERROR
    elif abs(difference) < 0.5:
        status = ReconciliationStatus.MATCH
    else:
        status = ReconciliationStatus.MISMATCH
    line = ReconciliationLine(
        organization_id=org_id,
        stripe_customer_id=customer_id,
        our_value=ours,
        our_events=len(sent),
        stripe_value=theirs,
        difference=difference,
        status=status,
        error=error,
    )
    with tenant_session(org_id) as session:
        repository.save_reconciliation_sync(
            session,
            {
                "organization_id": org_id,
                "day": day,
                "stripe_customer_id": customer_id,
                "our_value": ours,
                "our_events": len(sent),
                "stripe_value": theirs,
                "difference": difference,
                "status": status.value,
                "error": error,
                "checked_at": datetime.now(UTC),
            },
        )
    return line
