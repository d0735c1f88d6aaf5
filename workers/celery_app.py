"""The Celery application: JSON only, late acks, one message at a time per process."""

from __future__ import annotations

from celery import Celery
from kombu.entity import Queue

from hiddenmodel.settings import get_settings

QUEUES = ("gpu", "cpu", "webhooks", "maintenance")


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery(
        "hiddenmodel",
        broker=settings.redis_url,
        include=["workers.tasks", "workers.webhooks", "workers.billing"],
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
