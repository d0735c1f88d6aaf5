"""Rules of webhooks: endpoints and their secrets, job events, test events, redelivery.

No HTTP and no commit here. Deliveries created in a transaction are handed to the queue only
after it commits (:func:`hiddenmodel.webhooks.enqueue.send_after_commit` in the API; the job
runner calls :func:`hiddenmodel.webhooks.enqueue.send_deliveries` itself).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from hiddenmodel.errors import Conflict, NotFound, Problem
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.settings import get_settings
from hiddenmodel.webhooks import enqueue, repository, signing, urls
from hiddenmodel.webhooks.models import (
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookDeliveryAttempt,
    WebhookEndpoint,
)
from hiddenmodel.webhooks.schemas import WebhookEndpointCreate, WebhookEndpointUpdate
from tenants.auth import ADMINS, OrgScope, Permission
from tenants.models import Scope
from tenants.service import audit

MANAGE_WEBHOOKS = Permission("manage_webhooks", ADMINS, Scope.ADMIN)

# Each event fans out to every subscribed endpoint: a cap keeps one job from becoming
# thousands of requests.
MAX_ENDPOINTS_PER_ORGANIZATION = 20

JOB_EVENTS = {
    JobStatus.SUCCEEDED: EventType.JOB_SUCCEEDED,
    JobStatus.FAILED: EventType.JOB_FAILED,
    JobStatus.CANCELED: EventType.JOB_CANCELED,
    JobStatus.EXPIRED: EventType.JOB_EXPIRED,
}


class WebhookUrlNotAllowed(Problem):
    status, kind, title = 422, "webhook-url-not-allowed", "Webhook URL not allowed"


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


async def _check_url(url: str) -> None:
    allow_private = get_settings().webhook_allow_private_urls
    try:
        await run_in_threadpool(urls.check_url, url, allow_private=allow_private)
    except urls.UrlNotAllowed as exc:
        raise WebhookUrlNotAllowed(f"The URL is not allowed: {exc.reason}.", url=url) from exc


# --- endpoints ---------------------------------------------------------------------------


async def create_endpoint(
    scope: OrgScope, data: WebhookEndpointCreate
) -> tuple[WebhookEndpoint, str]:
    """Create an endpoint and its signing secret; the secret is returned here only."""
    if await repository.count_endpoints(scope.session) >= MAX_ENDPOINTS_PER_ORGANIZATION:
        raise Conflict(
            f"An organization can have at most {MAX_ENDPOINTS_PER_ORGANIZATION} webhook endpoints.",
            kind="webhook-endpoint-limit-reached",
        )
    await _check_url(data.url)
    endpoint_id = uuid.uuid4()
    secret = signing.generate_secret()
    endpoint = WebhookEndpoint(
        id=endpoint_id,
        organization_id=scope.org_id,
        url=data.url,
        description=data.description,
        event_types=[e.value for e in data.event_types],
        enabled=data.enabled,
        secret_ciphertext=signing.encrypt_secret(
            secret, org_id=scope.org_id, endpoint_id=endpoint_id
        ),
    )
    scope.session.add(endpoint)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_endpoint.created",
        "webhook_endpoint",
        endpoint.id,
        url=endpoint.url,
        event_types=endpoint.event_types,
        enabled=endpoint.enabled,
    )
    return await get_endpoint(scope, endpoint.id), secret


async def list_endpoints(
    scope: OrgScope, cursor: str | None, limit: int
) -> tuple[Sequence[WebhookEndpoint], str | None]:
    """The organization's endpoints, newest first (never with their secrets)."""
    return await repository.list_endpoints(scope.session, cursor, limit)


async def get_endpoint(scope: OrgScope, endpoint_id: uuid.UUID) -> WebhookEndpoint:
    """One endpoint of the organization; 404 for any other id, another tenant's included."""
    endpoint = await repository.get_endpoint(scope.session, endpoint_id)
    if endpoint is None:
        raise NotFound("No such webhook endpoint.", kind="webhook-endpoint-not-found")
    return endpoint


async def update_endpoint(
    scope: OrgScope, endpoint_id: uuid.UUID, data: WebhookEndpointUpdate
) -> WebhookEndpoint:
    """Change what was sent; a new URL is checked like a new endpoint's."""
    endpoint = await get_endpoint(scope, endpoint_id)
    changes: dict[str, Any] = {}
    if data.url is not None and data.url != endpoint.url:
        await _check_url(data.url)
        changes["url"] = data.url
    if data.description is not None and data.description != endpoint.description:
        changes["description"] = data.description
    if data.event_types is not None:
        event_types = [e.value for e in data.event_types]
        if event_types != sorted(endpoint.event_types):
            changes["event_types"] = event_types
    if data.enabled is not None and data.enabled != endpoint.enabled:
        changes["enabled"] = data.enabled
    if not changes:
        return endpoint
    for name, value in changes.items():
        setattr(endpoint, name, value)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_endpoint.updated",
        "webhook_endpoint",
        endpoint.id,
        changes=changes,
    )
    return await get_endpoint(scope, endpoint.id)


async def delete_endpoint(scope: OrgScope, endpoint_id: uuid.UUID) -> None:
    """Delete an endpoint with its delivery log; queued deliveries to it are dropped."""
    endpoint = await get_endpoint(scope, endpoint_id)
    await repository.delete_endpoint(scope.session, endpoint)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_endpoint.deleted",
        "webhook_endpoint",
        endpoint_id,
        url=endpoint.url,
    )


async def rotate_secret(scope: OrgScope, endpoint_id: uuid.UUID) -> tuple[WebhookEndpoint, str]:
    """A new signing secret, returned here only. The current one keeps signing alongside it
    for ``webhook_secret_rotation_overlap_hours``; one older than that is dropped."""
    endpoint = await get_endpoint(scope, endpoint_id)
    secret = signing.generate_secret()
    overlap = timedelta(hours=get_settings().webhook_secret_rotation_overlap_hours)
    endpoint.previous_secret_ciphertext = endpoint.secret_ciphertext
    endpoint.previous_secret_expires_at = datetime.now(UTC) + overlap
    endpoint.secret_ciphertext = signing.encrypt_secret(
        secret, org_id=scope.org_id, endpoint_id=endpoint.id
    )
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_endpoint.secret_rotated",
        "webhook_endpoint",
        endpoint.id,
        previous_secret_expires_at=endpoint.previous_secret_expires_at.isoformat(),
    )
    return await get_endpoint(scope, endpoint.id), secret


def _require_enabled(endpoint: WebhookEndpoint) -> None:
    if not endpoint.enabled:
        raise Conflict(
            "The endpoint is disabled; enable it first.", kind="webhook-endpoint-disabled"
        )


async def send_test(scope: OrgScope, endpoint_id: uuid.UUID) -> WebhookDelivery:
    """Queue a ``webhook.test`` event to one endpoint, whatever its event filter."""
    endpoint = await get_endpoint(scope, endpoint_id)
    _require_enabled(endpoint)
    now = datetime.now(UTC)
    test = WebhookDelivery(
        organization_id=scope.org_id,
        endpoint_id=endpoint.id,
        event_type=EventType.WEBHOOK_TEST.value,
        payload={
            "type": EventType.WEBHOOK_TEST.value,
            "timestamp": now.isoformat(),
            "data": {"endpoint_id": str(endpoint.id), "message": "A test event."},
        },
        message_id=new_message_id(),
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=now,
    )
    scope.session.add(test)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_endpoint.tested",
        "webhook_endpoint",
        endpoint.id,
        delivery_id=str(test.id),
    )
    enqueue.send_after_commit(scope.session, scope.org_id, [test.id])
    return await get_delivery(scope, test.id)


# --- deliveries --------------------------------------------------------------------------


async def list_deliveries(
    scope: OrgScope,
    endpoint_id: uuid.UUID,
    status: DeliveryStatus | None,
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[WebhookDelivery], str | None]:
    """An endpoint's delivery log, newest first, optionally of one status."""
    await get_endpoint(scope, endpoint_id)
    return await repository.list_deliveries(
        scope.session, endpoint_id, status.value if status else None, cursor, limit
    )


async def get_delivery(scope: OrgScope, delivery_id: uuid.UUID) -> WebhookDelivery:
    """One delivery of the organization; 404 otherwise."""
    found = await repository.get_delivery(scope.session, delivery_id)
    if found is None:
        raise NotFound("No such webhook delivery.", kind="webhook-delivery-not-found")
    return found


async def delivery_attempts(
    scope: OrgScope, delivery_id: uuid.UUID
) -> Sequence[WebhookDeliveryAttempt]:
    """The HTTP requests made for a delivery, first to last."""
    return await repository.list_attempts(scope.session, delivery_id)


async def redeliver(scope: OrgScope, delivery_id: uuid.UUID) -> WebhookDelivery:
    """Send a finished delivery's message again, as a new delivery with the same
    ``webhook-id`` (receivers deduplicate on it), signed with the endpoint's current secrets."""
    original = await get_delivery(scope, delivery_id)
    if not DeliveryStatus(original.status).finished:
        raise Conflict(
            "The delivery is still being attempted.", kind="webhook-delivery-in-progress"
        )
    endpoint = await get_endpoint(scope, original.endpoint_id)
    _require_enabled(endpoint)
    copy = WebhookDelivery(
        organization_id=scope.org_id,
        endpoint_id=endpoint.id,
        event_type=original.event_type,
        payload=original.payload,
        message_id=original.message_id,
        status=DeliveryStatus.PENDING.value,
        attempts=0,
        next_attempt_at=datetime.now(UTC),
        redelivery_of=original.id,
    )
    scope.session.add(copy)
    await scope.session.flush()
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "webhook_delivery.redelivered",
        "webhook_delivery",
        original.id,
        redelivery_id=str(copy.id),
        endpoint_id=str(endpoint.id),
    )
    enqueue.send_after_commit(scope.session, scope.org_id, [copy.id])
    return await get_delivery(scope, copy.id)


# --- job events --------------------------------------------------------------------------


def job_event_payload(job: Job, event_type: EventType) -> dict[str, Any]:
    """The body of a job event. No output URLs: presigned ones expire before a late retry;
    receivers fetch the job with their key."""
    when = job.finished_at or datetime.now(UTC)
    return {
        "type": event_type.value,
        "timestamp": when.isoformat(),
        "data": {
            "id": str(job.id),
            "status": job.status,
            "operation": job.operation,
            "outputs": [o["name"] for o in job.outputs],
            "error": {"code": job.error_code, "message": job.error_message or ""}
            if job.error_code
            else None,
            "gpu_seconds": job.gpu_seconds,
            "links": {"self": f"/v1/jobs/{job.id}"},
        },
    }


def _job_id(job: Job | uuid.UUID) -> uuid.UUID:
    return job if isinstance(job, uuid.UUID) else job.id


def _job_event_type(status: JobStatus | str) -> EventType:
    event = JOB_EVENTS.get(JobStatus(status))
    if event is None:
        raise ValueError(f"no webhook event for a job that is {status}")
    return event


def _deliveries(
    org_id: uuid.UUID,
    endpoints: Sequence[WebhookEndpoint],
    event: EventType,
    payload: dict[str, Any],
) -> list[WebhookDelivery]:
    message_id = new_message_id()
    now = datetime.now(UTC)
    return [
        WebhookDelivery(
            id=uuid.uuid4(),
            organization_id=org_id,
            endpoint_id=endpoint.id,
            event_type=event.value,
            payload=payload,
            message_id=message_id,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            next_attempt_at=now,
        )
        for endpoint in endpoints
    ]


def emit_job_event_sync(
    session: Session, job: Job | uuid.UUID, status: JobStatus | str
) -> list[uuid.UUID]:
    """Record one delivery of the job's terminal event per subscribed, enabled endpoint.

    Call inside the transaction that finishes the job, so the event exists exactly when the
    new state does; send the returned ids with ``enqueue.send_deliveries`` after the commit.
    ``job`` is a job or its id: the finished row is read here, so a stale copy will do.
    """
    event = _job_event_type(status)
    endpoints = repository.subscribed_endpoints_sync(session, event.value)
    if not endpoints:
        return []
    fresh = session.get(Job, _job_id(job), populate_existing=True)
    if fresh is None:
        return []
    rows = _deliveries(fresh.organization_id, endpoints, event, job_event_payload(fresh, event))
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]


def emit_event_sync(
    session: Session, org_id: uuid.UUID, event: EventType, payload: dict[str, Any]
) -> list[uuid.UUID]:
    """Record one delivery of ``payload`` per endpoint subscribed to ``event``, in the
    transaction that made the event true; send the ids after the commit."""
    endpoints = repository.subscribed_endpoints_sync(session, event.value)
    if not endpoints:
        return []
    rows = _deliveries(org_id, endpoints, event, payload)
    session.add_all(rows)
    session.flush()
    return [r.id for r in rows]
