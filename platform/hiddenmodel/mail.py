"""Outgoing mail through a pluggable sender.

The default sender records each message in ``email_messages`` and the log, so development,
tests and the portal can read what would have been sent. Production installs a sender that
talks to a mail service with :func:`set_mail_sender`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from hiddenmodel.db import async_global_session
from hiddenmodel.models import EmailMessage

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


_sender: MailSender = DatabaseMailSender()


def set_mail_sender(sender: MailSender) -> None:
    global _sender
    _sender = sender


async def send_mail(mail: Mail) -> None:
    await _sender.send(mail)
