"""Celery entry point of webhook deliveries: thin; ids only, inside the organization."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy.exc import OperationalError

from hiddenmodel import metrics
from hiddenmodel.tenancy import org_context
from hiddenmodel.webhooks import delivery, enqueue
from workers.celery_app import app

log = logging.getLogger(__name__)


@app.task(  # type: ignore[untyped-decorator]
    name=enqueue.TASK_NAME,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # The database briefly away: try again soon. Anything else is recorded on the row.
    autoretry_for=(OperationalError,),
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def deliver(self: Any, org_id: str, delivery_id: str) -> str:
    """Make one attempt at a webhook delivery; a failed attempt with tries left is queued
    again after its backoff (the row's ``next_attempt_at`` stays the truth)."""
    org, target = uuid.UUID(org_id), uuid.UUID(delivery_id)
    with org_context(org):
        outcome = delivery.attempt_delivery(org, target)
    if outcome.retry_in is not None:
        delivery.send_retry(org, target, outcome.retry_in)
    log.info("webhook delivery %s: %s", delivery_id, outcome.result)
    metrics.record_webhook_delivery(outcome.result)
    return outcome.result
