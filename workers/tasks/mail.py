"""Celery entry point of outgoing mail: thin; the outbox lives in hiddenmodel.smtp."""

from __future__ import annotations

from workers.celery_app import app


@app.task(name="mail.deliver_outbox", acks_late=True)  # type: ignore[untyped-decorator]
def deliver_outbox() -> dict[str, int]:
    """Retry the outgoing mail that is due (see hiddenmodel.smtp)."""
    from hiddenmodel import smtp

    return smtp.deliver_due()
