"""The Celery application: JSON only, late acks, one message at a time per process."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery, signals
from kombu.entity import Queue

from hiddenmodel.settings import get_settings
from workers import liveness
from workers.tasks import MODULES as TASK_MODULES

log = logging.getLogger(__name__)

QUEUES = ("gpu", "cpu", "webhooks", "maintenance")


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery(
        "hiddenmodel",
        broker=settings.redis_url,
        include=list(TASK_MODULES),
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="cpu",
        task_routes={
            "webhooks.*": {"queue": "webhooks"},
            "maintenance.*": {"queue": "maintenance"},
            "mail.*": {"queue": "maintenance"},
            "usage.*": {"queue": "maintenance"},
            "billing.*": {"queue": "maintenance"},
        },
        broker_transport_options={
            # Longer than the longest hard limit: a slow job is never delivered twice.
            "visibility_timeout": settings.celery_visibility_timeout_seconds,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
    )
    return app


app = make_celery()


def _announce_worker(sender: Any = None, **_: Any) -> None:
    """The worker's main process announces itself before it consumes anything."""
    liveness.start(getattr(sender, "hostname", None))
    # The job's fate is logged by the job code (workers.tasks.jobs, workers.runner); Celery's
    # "Task ... succeeded" says only that the function returned, so it stays out of the logs.
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)


def _announce_pool_process(**_: Any) -> None:
    """A pool process (prefork) runs the jobs: it announces itself under its own identity."""
    liveness.start()


def _retire(**_: Any) -> None:
    liveness.stop()


def _note_receipt(request: Any = None, **_: Any) -> None:
    """The moment a job's message reaches this worker, write down who holds it."""
    if request is None or request.name != "jobs.run":
        return
    try:
        liveness.record_receipt(str(request.id), str(request.args[0]))
    except (redis.RedisError, IndexError) as exc:
        log.warning("no receipt for task %s: %s", request.id, exc)


signals.worker_init.connect(_announce_worker, weak=False)
signals.worker_process_init.connect(_announce_pool_process, weak=False)
signals.worker_process_shutdown.connect(_retire, weak=False)
signals.worker_shutdown.connect(_retire, weak=False)
signals.task_received.connect(_note_receipt, weak=False)
