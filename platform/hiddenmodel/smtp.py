"""Mail through an SMTP relay (``HM_MAIL_SENDER=smtp``), by way of an outbox.

Each message is stored in ``mail_outbox`` in its own transaction before anything is sent, then
tried at once. A try that fails (relay down, refused connection, a 4xx answer, a timeout) is
retried later with exponential backoff by :func:`deliver_due`, which the dispatcher schedules as
the ``mail.deliver_outbox`` task: a message is never lost because the relay was away. A 5xx
answer (the relay refuses the message for good) ends it as ``failed``, as does the last
allowed attempt. Each message keeps one ``Message-ID`` across tries, so a receiver can tell a
retry of a message it already took after an ambiguous failure.

The connection is encrypted by STARTTLS (``HM_SMTP_SECURITY=starttls``, port 587: refused if
the relay does not offer it) or from the first byte (``tls``, port 465), with the relay's
certificate checked against the system's CAs or ``HM_SMTP_CA_FILE``.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import ssl
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import formatdate

from sqlalchemy import select, update

from hiddenmodel.db import async_global_session, global_session
from hiddenmodel.mail import Mail
from hiddenmodel.models import OutgoingMail
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)

MESSAGE_ID_DOMAIN = "hiddenmodel.dev"


class PermanentFailure(Exception):
    """The relay refused the message for good (a 5xx answer)."""


@dataclass(frozen=True)
class Outgoing:
    id: uuid.UUID
    to: str
    subject: str
    body: str
    attempts: int


def build_message(mail: Outgoing) -> EmailMessage:
    settings = get_settings()
    message = EmailMessage()
    message["From"] = settings.smtp_from
    message["To"] = mail.to
    message["Subject"] = mail.subject
    message["Date"] = formatdate(usegmt=True)
    message["Message-ID"] = f"<{mail.id}@{MESSAGE_ID_DOMAIN}>"
    message.set_content(mail.body)
    return message


def _tls_context() -> ssl.SSLContext:
    ca_file = get_settings().smtp_ca_file
    return ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)


def transmit(message: EmailMessage) -> None:
    """Hand ``message`` to the relay; raises :class:`PermanentFailure` on a 5xx answer, and
    ``OSError`` or ``smtplib.SMTPException`` on anything worth another try."""
    settings = get_settings()
    timeout = settings.smtp_timeout_seconds
    client: smtplib.SMTP
    if settings.smtp_security == "tls":
        client = smtplib.SMTP_SSL(
            settings.smtp_host, settings.smtp_port, timeout=timeout, context=_tls_context()
        )
    else:
        client = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    try:
        with client:
            if settings.smtp_security == "starttls":
                # Raises SMTPNotSupportedError when the relay offers no STARTTLS: never send
                # credentials or mail in clear text because of a downgrade.
                client.starttls(context=_tls_context())
            if settings.smtp_username:
                password = settings.smtp_password
                client.login(
                    settings.smtp_username, password.get_secret_value() if password else ""
                )
            client.send_message(message)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        if codes and all(code >= 500 for code in codes):
            raise PermanentFailure(str(exc)) from exc
        raise
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500 and not isinstance(exc, smtplib.SMTPAuthenticationError):
            raise PermanentFailure(f"{exc.smtp_code} {exc.smtp_error!r}") from exc
        raise


def _backoff(attempts: int) -> timedelta:
    settings = get_settings()
    seconds = settings.smtp_retry_base_seconds * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, settings.smtp_retry_cap_seconds))


def _claim(mail_id: uuid.UUID) -> Outgoing | None:
    """Take a due message for one try: its attempt is counted and it is leased (not due again
    until the try has had its time), in a short transaction of its own."""
    settings = get_settings()
    now = datetime.now(UTC)
    lease = timedelta(seconds=settings.smtp_timeout_seconds * 4 + 5)
    with global_session() as session:
        row = session.scalars(
            select(OutgoingMail)
            .where(
                OutgoingMail.id == mail_id,
                OutgoingMail.status == "pending",
                OutgoingMail.next_attempt_at <= now,
            )
            .with_for_update(skip_locked=True)
        ).one_or_none()
        if row is None:
            return None
        row.attempts += 1
        row.next_attempt_at = now + lease
        return Outgoing(row.id, row.to_address, row.subject, row.body, row.attempts)


def _settle(mail: Outgoing, error: str | None, permanent: bool = False) -> str:
    settings = get_settings()
    now = datetime.now(UTC)
    values: dict[str, object]
    if error is None:
        values = {"status": "sent", "sent_at": now, "last_error": None}
    elif permanent or mail.attempts >= settings.smtp_max_attempts:
        values = {"status": "failed", "last_error": error[:2000]}
    else:
        values = {"next_attempt_at": now + _backoff(mail.attempts), "last_error": error[:2000]}
    with global_session() as session:
        session.execute(update(OutgoingMail).where(OutgoingMail.id == mail.id).values(**values))
    return str(values.get("status", "pending"))


def deliver(mail_id: uuid.UUID) -> str | None:
    """One try of one due message: its status afterwards, or None when it was not due (sent,
    failed, leased by another try, or waiting for its next attempt)."""
    mail = _claim(mail_id)
    if mail is None:
        return None
    try:
        transmit(build_message(mail))
    except PermanentFailure as exc:
        log.error("mail %s to %s refused for good: %s", mail.id, mail.to, exc)
        return _settle(mail, str(exc), permanent=True)
    except (OSError, smtplib.SMTPException) as exc:
        error = f"{type(exc).__name__}: {exc}"
        status = _settle(mail, error)
        log.warning(
            "mail %s to %s, attempt %d: %s (%s)", mail.id, mail.to, mail.attempts, error, status
        )
        return status
    log.info("mail %s sent to %s", mail.id, mail.to)
    return _settle(mail, None)


def deliver_due(limit: int = 100) -> dict[str, int]:
    """Try every message that is due (oldest first), at most ``limit``; counts by outcome."""
    now = datetime.now(UTC)
    with global_session() as session:
        ids = session.scalars(
            select(OutgoingMail.id)
            .where(OutgoingMail.status == "pending", OutgoingMail.next_attempt_at <= now)
            .order_by(OutgoingMail.next_attempt_at)
            .limit(limit)
        ).all()
    counts = {"sent": 0, "pending": 0, "failed": 0}
    for mail_id in ids:
        status = deliver(mail_id)
        if status is not None:
            counts[status] += 1
    return counts


class SmtpMailSender:
    """Stores the message in the outbox (its own transaction), then tries it at once."""

    async def send(self, mail: Mail) -> None:
        async with async_global_session() as session, session.begin():
            row = OutgoingMail(
                id=uuid.uuid4(),
                to_address=mail.to,
                subject=mail.subject,
                body=mail.body,
                kind=mail.kind,
                status="pending",
                attempts=0,
                next_attempt_at=datetime.now(UTC),
            )
            session.add(row)
        # Off the event loop: smtplib and the sync session block.
        await asyncio.to_thread(deliver, row.id)
