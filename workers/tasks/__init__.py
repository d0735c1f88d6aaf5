"""Celery entry points, one module per kind of work: thin, ids in, the rules in the domains.

Task names (``jobs.run``, ``webhooks.deliver``, ``usage.push_to_stripe``, ...) are what queued
messages and the dispatcher refer to: they stay as they are whatever module holds them.
``workers.celery_app`` includes every module of :data:`MODULES`.
"""

MODULES = (
    "workers.tasks.jobs",
    "workers.tasks.mail",
    "workers.tasks.maintenance",
    "workers.tasks.billing",
    "workers.tasks.webhooks",
)
