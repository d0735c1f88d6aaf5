"""Per-organization webhooks: endpoints, signed deliveries of job events, retries and a log.

Messages follow Standard Webhooks (``webhook-id``, ``webhook-timestamp``,
``webhook-signature``). A delivery row is the truth about what is owed to a receiver; Celery
messages only carry its id, so a lost message delays a delivery and never drops it.
"""
