"""Queueing webhook deliveries, for the API, the job runner and the dispatcher.

The rows are written by :mod:`hiddenmodel.webhooks.service` in the caller's transaction;
this module hands their ids to the ``webhooks`` queue once that transaction has committed,
and re-sends those whose message may be lost. It publishes messages only: the HTTP attempt
lives in :mod:`hiddenmodel.webhooks.delivery`, which runs in the worker.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from functools import lru_cache

from celery import Celery
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from hiddenmodel.db import after_commit, global_session
from hiddenmodel.settings import get_settings
from hiddenmodel.webhooks import repository

log = logging.getLogger(__name__)

TASK_NAME = "webhooks.deliver"
QUEUE = "webhooks"
SWEEP_BATCH = 500


@lru_cache
def _producer() -> Celery:
    """A send-only Celery client, so the API and the dispatcher enqueue deliveries without
    importing the worker application. It publishes the same JSON protocol to the same broker."""
    client = Celery("hiddenmodel-webhooks", broker=get_settings().redis_url, set_as_current=False)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # A broker outage must not hold an API response for long: the sweeper re-sends.
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0.1,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
    )
    return client


def send_deliveries(
    org_id: uuid.UUID, delivery_ids: Iterable[uuid.UUID], *, countdown: float | None = None
) -> None:
    """Queue ``webhooks.deliver`` for each delivery; call after the commit that wrote them.

    A broker failure is logged, not raised: the rows stay due and the sweeper sends them.
    """
    for delivery_id in delivery_ids:
        try:
            _producer().send_task(
                TASK_NAME,
                args=[str(org_id), str(delivery_id)],
                queue=QUEUE,
                countdown=countdown,
            )
        except Exception:
            log.warning(
                "could not queue webhook delivery %s; the sweeper will", delivery_id, exc_info=True
            )
            return


def send_after_commit(session: AsyncSession, org_id: uuid.UUID, ids: list[uuid.UUID]) -> None:
    """Queue the deliveries ``ids`` once ``session`` commits (nothing if it rolls back)."""
    if not ids:
        return

    async def _send() -> None:
        await run_in_threadpool(send_deliveries, org_id, ids)

    after_commit(session, _send)


def sweep_due_deliveries(limit: int = SWEEP_BATCH) -> int:
    """Re-queue deliveries whose message may be lost (Redis flushed, a worker killed during
    an attempt): due, or past their lease, for longer than ``redispatch_grace_seconds``.
    For the dispatcher's reconcile pass; returns how many were sent."""
    grace = get_settings().redispatch_grace_seconds
    with global_session() as session:
        due = repository.due_deliveries_sync(session, grace, limit)
    by_org: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for org_id, delivery_id in due:
        by_org[org_id].append(delivery_id)
    for org_id, ids in by_org.items():
        send_deliveries(org_id, ids)
    if due:
        log.info("re-queued %d webhook deliveries", len(due))
    return len(due)
