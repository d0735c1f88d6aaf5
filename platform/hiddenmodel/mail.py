"""Outgoing mail through a pluggable sender.

The sender is chosen by ``HM_MAIL_SENDER``. ``database``, the default, records each message
in ``email_messages`` and the log, so development, tests and the portal can read what would
have been sent. ``smtp`` sends through a relay by way of an outbox
(:mod:`hiddenmodel.smtp`). :func:`set_mail_sender` installs another sender.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from hiddenmodel.db import async_global_session
from hiddenmodel.models import EmailMessage
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mail:
    to: str
    subject: str
    body: str
    kind: str


class MailSender(Protocol):
    async def send(self, mail: Mail) -> None: ...


class DatabaseMailSender:
    """Records mail in the database (its own transaction: a sent mail stays sent)."""

    async def send(self, mail: Mail) -> None:
        async with async_global_session() as session, session.begin():
            session.add(
                EmailMessage(
                    to_address=mail.to.lower(), subject=mail.subject, body=mail.body, kind=mail.kind
                )
            )
        log.info(
            "mail recorded kind=%s to=%s subject=%r\n%s",
            mail.kind,
            mail.to,
            mail.subject,
            mail.body,
        )


_sender: MailSender | None = None


def set_mail_sender(sender: MailSender | None) -> None:
    """Install ``sender`` for every message; None goes back to ``HM_MAIL_SENDER``'s."""
    global _sender
    _sender = sender


def mail_sender() -> MailSender:
    if _sender is not None:
        return _sender
    if get_settings().mail_sender == "smtp":
        from hiddenmodel.smtp import SmtpMailSender

        return SmtpMailSender()
    return DatabaseMailSender()


async def send_mail(mail: Mail) -> None:
    await mail_sender().send(mail)
