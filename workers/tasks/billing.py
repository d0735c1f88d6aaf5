"""Celery entry points of billing: thin; the rules live in hiddenmodel.billing.metering."""

from __future__ import annotations

import logging
import time
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.exc import OperationalError

from hiddenmodel import metrics
from hiddenmodel.billing import metering
from hiddenmodel.settings import get_settings
from workers.celery_app import app

log = logging.getLogger(__name__)


@app.task(  # type: ignore[untyped-decorator]
    name="usage.push_to_stripe",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def push_to_stripe(limit: int | None = None) -> dict[str, int]:
    """Send due usage events to Stripe as meter events, a batch at a time, until none is due
    or the push interval is used up (the next run takes over). Runs that overlap are harmless:
    each event is claimed by one of them."""
    budget = get_settings().stripe_push_interval_seconds
    started = time.monotonic()
    total: dict[str, int] = {}
    while True:
        counts = metering.push_due_usage_events(limit)
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
        batch = limit or get_settings().stripe_push_batch_size
        if counts.get("due", 0) < batch or time.monotonic() - started >= budget:
            break
    if total.get("due"):
        log.info("usage pushed to Stripe: %s", total)
    metrics.record_stripe_push(total)
    return total


@app.task(  # type: ignore[untyped-decorator]
    name="billing.reconcile",
    acks_late=True,
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=5,
)
def reconcile(day: str | None = None) -> dict[str, Any]:
    """Compare one UTC day's usage (default: yesterday) with Stripe's meter; store and return
    the differences."""
    target = date.fromisoformat(day) if day else datetime.now(UTC).date() - timedelta(days=1)
    report = metering.reconcile(target).as_dict()
    log.info(
        "billing reconciliation %s: %s checked, %s differ",
        report["day"],
        report["checked"],
        len(report["differences"]),
    )
    return report
