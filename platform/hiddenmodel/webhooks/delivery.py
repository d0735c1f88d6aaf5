"""Getting deliveries to receivers, in the worker: one attempt, signed, and retries with
backoff. The ``webhooks.deliver`` task (``workers.tasks.webhooks``) runs it.

The delivery row is the truth. A Celery message only names it, and every step is a
compare-and-set on the row, so a duplicated message is harmless and a lost one is found again
by :func:`hiddenmodel.webhooks.enqueue.sweep_due_deliveries`. No transaction stays open while
a receiver is called. The API never imports this module (it makes the outgoing requests):
it queues deliveries with :mod:`hiddenmodel.webhooks.enqueue`.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.orm import Session

from hiddenmodel.db import tenant_session
from hiddenmodel.settings import Settings, get_settings
from hiddenmodel.webhooks import enqueue, repository, signing, urls
from hiddenmodel.webhooks.models import (
    DeliveryStatus,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
)

log = logging.getLogger(__name__)

USER_AGENT = "HiddenModel-Webhooks/1"
RESPONSE_SNIPPET_BYTES = 1024
ERROR_MAX_CHARS = 500
MAX_COUNTDOWN_SECONDS = 600.0


def send_retry(org_id: uuid.UUID, delivery_id: uuid.UUID, delay: float) -> None:
    """Queue the next attempt with ``delay`` as countdown. A long delay is left to the
    sweeper: a message held that long by a worker would outlive the broker's visibility
    timeout and be delivered twice anyway."""
    if delay <= MAX_COUNTDOWN_SECONDS:
        enqueue.send_deliveries(org_id, [delivery_id], countdown=delay)


def backoff_seconds(attempt: int, settings: Settings | None = None) -> float:
    """Delay after failed attempt ``attempt`` (1-based): exponential, capped, and jittered
    down to half so receivers that failed together are not retried together."""
    settings = settings or get_settings()
    ceiling = min(
        settings.webhook_backoff_cap_seconds,
        settings.webhook_backoff_base_seconds * 2.0 ** (attempt - 1),
    )
    return ceiling * random.uniform(0.5, 1.0)


def endpoint_secrets(endpoint: WebhookEndpoint, now: datetime) -> list[str]:
    """The secrets that sign messages now: the current one, and the previous one during a
    rotation's overlap."""
    org, endpoint_id = endpoint.organization_id, endpoint.id
    active = [
        signing.decrypt_secret(endpoint.secret_ciphertext, org_id=org, endpoint_id=endpoint_id)
    ]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret_ciphertext is not None and expires is not None and expires > now:
        active.append(
            signing.decrypt_secret(
                endpoint.previous_secret_ciphertext, org_id=org, endpoint_id=endpoint_id
            )
        )
    return active


@dataclass(frozen=True)
class Outcome:
    """What one run of the task did; ``retry_in`` asks the caller to send it again later."""

    result: str
    retry_in: float | None = None


@dataclass(frozen=True)
class _Claimed:
    attempt: int
    message_id: str
    payload: dict[str, Any]
    url: str
    secrets: list[str]


@dataclass(frozen=True)
class _Response:
    status_code: int | None = None
    body: str | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _lease(settings: Settings) -> timedelta:
    # Connect, write and read may each take the whole timeout; the rest is slack.
    return timedelta(seconds=settings.webhook_timeout_seconds * 3 + 30)


def _not_claimed(session: Session, delivery_id: uuid.UUID, settings: Settings) -> Outcome:
    state = repository.delivery_state_sync(session, delivery_id)
    if state is None:
        return Outcome("gone")
    if DeliveryStatus(state.status).finished:
        return Outcome("done")
    due_in = state.due_in_seconds or 0.0
    if state.status == DeliveryStatus.DELIVERING.value and due_in > 0:
        return Outcome("in-flight")
    if not state.endpoint_enabled:
        repository.give_up_sync(
            session,
            delivery_id,
            state.attempts,
            state.status,
            "The endpoint is disabled; redeliver once it is enabled again.",
        )
        return Outcome("failed")
    if state.attempts >= settings.webhook_max_attempts:
        # The worker making the last attempt stopped before recording it.
        repository.give_up_sync(
            session,
            delivery_id,
            state.attempts,
            state.status,
            f"Gave up after {state.attempts} attempts.",
        )
        return Outcome("failed")
    if due_in > 0:
        # Early: a message sent with a countdown by a clock ahead of the database's.
        return Outcome("not-due", retry_in=due_in)
    return Outcome("skipped")


def _claim(org_id: uuid.UUID, delivery_id: uuid.UUID, settings: Settings) -> _Claimed | Outcome:
    with tenant_session(org_id) as session:
        row = repository.claim_sync(
            session, delivery_id, _lease(settings), settings.webhook_max_attempts
        )
        if row is None:
            return _not_claimed(session, delivery_id, settings)
        endpoint = repository.get_endpoint_sync(session, row.endpoint_id)
        if endpoint is None:
            return Outcome("gone")
        try:
            secrets = endpoint_secrets(endpoint, datetime.now(UTC))
        except signing.SecretUnreadable:
            log.exception("webhook delivery %s cannot be signed", delivery_id)
            repository.give_up_sync(
                session,
                delivery_id,
                row.attempts,
                DeliveryStatus.DELIVERING.value,
                "The endpoint's signing secret cannot be read; rotate it, then redeliver.",
            )
            return Outcome("failed")
        return _Claimed(
            attempt=row.attempts,
            message_id=row.message_id,
            payload=row.payload,
            url=endpoint.url,
            secrets=secrets,
        )


def _truncate(text: str, limit: int = ERROR_MAX_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _read_snippet(response: httpx.Response) -> str:
    """The first bytes of the body, for the log; the status alone decides the outcome."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= RESPONSE_SNIPPET_BYTES:
                break
    except httpx.HTTPError:
        pass
    return data[:RESPONSE_SNIPPET_BYTES].decode("utf-8", errors="replace")


def _post(
    target: urls.CheckedUrl, headers: dict[str, str], body: bytes, timeout: float
) -> _Response:
    """POST once, to an approved address; never follows redirects, never raises."""
    attempts: list[tuple[str, dict[str, str], dict[str, Any]]] = (
        [target.pinned(a) for a in target.addresses] if target.addresses else [(target.url, {}, {})]
    )
    error = "no address to connect to"
    # Proxies from the environment would bypass the address check.
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for url, extra_headers, extensions in attempts:
            try:
                with client.stream(
                    "POST",
                    url,
                    content=body,
                    headers={**headers, **extra_headers},
                    extensions=extensions,
                ) as response:
                    status = response.status_code
                    return _Response(status_code=status, body=_read_snippet(response))
            except httpx.ConnectError as exc:
                # Another of the host's approved addresses may answer.
                error = f"connection failed: {exc}"
            except httpx.TimeoutException as exc:
                return _Response(error=f"timed out: {type(exc).__name__}")
            except httpx.HTTPError as exc:
                return _Response(error=_truncate(f"{type(exc).__name__}: {exc}"))
            except Exception as exc:
                log.warning("webhook POST to %s failed unexpectedly", target.host, exc_info=True)
                return _Response(error=_truncate(f"unexpected error: {type(exc).__name__}"))
    return _Response(error=_truncate(error))


def _record(
    org_id: uuid.UUID,
    delivery_id: uuid.UUID,
    claimed: _Claimed,
    response: _Response,
    duration_ms: int,
    retry_in: float | None,
) -> bool:
    error = response.error
    if error is None and not response.succeeded:
        error = f"HTTP {response.status_code}"
    with tenant_session(org_id) as session:
        recorded = repository.finish_attempt_sync(
            session,
            delivery_id,
            claimed.attempt,
            succeeded=response.succeeded,
            retry_in=retry_in,
            status_code=response.status_code,
            error=error,
        )
        # A request that lost its lease still reached the receiver: log it unless the
        # delivery itself is gone (its endpoint deleted meanwhile).
        if recorded or repository.delivery_state_sync(session, delivery_id) is not None:
            repository.add_attempt_sync(
                session,
                WebhookDeliveryAttempt(
                    organization_id=org_id,
                    delivery_id=delivery_id,
                    attempt=claimed.attempt,
                    status_code=response.status_code,
                    error=error,
                    response_body=response.body,
                    duration_ms=duration_ms,
                ),
            )
        return recorded


def attempt_delivery(org_id: uuid.UUID, delivery_id: uuid.UUID) -> Outcome:
    """Claim a due delivery, check its URL again, POST it signed, and record the attempt.

    2xx succeeds. Anything else (status, timeout, refused connection) is retried with backoff
    until ``webhook_max_attempts``; a URL that is no longer allowed fails at once.
    """
    settings = get_settings()
    claimed = _claim(org_id, delivery_id, settings)
    if isinstance(claimed, Outcome):
        return claimed
    started = time.monotonic()
    try:
        target = urls.check_url(claimed.url, allow_private=settings.webhook_allow_private_urls)
    except urls.UrlUnresolvable as exc:
        response = _Response(error=exc.reason)
    except urls.UrlNotAllowed as exc:
        response = _Response(error=f"URL not allowed: {exc.reason}")
        _record(org_id, delivery_id, claimed, response, 0, retry_in=None)
        return Outcome("refused")
    else:
        body = json.dumps(claimed.payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **signing.webhook_headers(claimed.secrets, claimed.message_id, int(time.time()), body),
        }
        response = _post(target, headers, body, settings.webhook_timeout_seconds)
    duration_ms = round((time.monotonic() - started) * 1000)
    retry_in = None
    if not response.succeeded and claimed.attempt < settings.webhook_max_attempts:
        retry_in = backoff_seconds(claimed.attempt, settings)
    if not _record(org_id, delivery_id, claimed, response, duration_ms, retry_in):
        # The lease ran out and another attempt holds the delivery: its result counts.
        return Outcome("lost")
    if response.succeeded:
        return Outcome("succeeded")
    if retry_in is not None:
        return Outcome("retrying", retry_in=retry_in)
    return Outcome("failed")
