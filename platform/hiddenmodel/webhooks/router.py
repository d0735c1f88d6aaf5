"""HTTP of webhooks: endpoints, their secrets and test events, the delivery log, redelivery."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status

from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from hiddenmodel.webhooks import service
from hiddenmodel.webhooks.models import DeliveryStatus
from hiddenmodel.webhooks.schemas import (
    WebhookAttemptRead,
    WebhookDeliveryDetail,
    WebhookDeliveryRead,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointRead,
    WebhookEndpointUpdate,
    WebhookSecretRotated,
)
from tenants.auth import OrgScope, requires

router = APIRouter(prefix="/v1/orgs/{org_id}", tags=["webhooks"])

Cursor = Annotated[str | None, Query(description="Opaque cursor from `next_cursor`.")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
ENDPOINT = "/webhook-endpoints/{endpoint_id}"

ManageWebhooks = Annotated[OrgScope, Depends(requires(service.MANAGE_WEBHOOKS))]


@router.post(
    "/webhook-endpoints",
    operation_id="createWebhookEndpoint",
    status_code=status.HTTP_201_CREATED,
    response_model=WebhookEndpointCreated,
)
async def create_webhook_endpoint(
    data: WebhookEndpointCreate, scope: ManageWebhooks, response: Response
) -> WebhookEndpointCreated:
    """Register a URL for this organization's events. The signing secret is returned once."""
    endpoint, secret = await service.create_endpoint(scope, data)
    response.headers["Location"] = f"/v1/orgs/{scope.org_id}/webhook-endpoints/{endpoint.id}"
    response.headers["Cache-Control"] = "no-store"
    read = WebhookEndpointRead.model_validate(endpoint)
    return WebhookEndpointCreated(**read.model_dump(), secret=secret)


@router.get(
    "/webhook-endpoints",
    operation_id="listWebhookEndpoints",
    response_model=Page[WebhookEndpointRead],
)
async def list_webhook_endpoints(
    scope: ManageWebhooks, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> Page[WebhookEndpointRead]:
    rows, next_cursor = await service.list_endpoints(scope, cursor, limit)
    return Page(
        items=[WebhookEndpointRead.model_validate(e) for e in rows], next_cursor=next_cursor
    )


@router.get(ENDPOINT, operation_id="getWebhookEndpoint", response_model=WebhookEndpointRead)
async def get_webhook_endpoint(
    endpoint_id: uuid.UUID, scope: ManageWebhooks
) -> WebhookEndpointRead:
    return WebhookEndpointRead.model_validate(await service.get_endpoint(scope, endpoint_id))


@router.patch(ENDPOINT, operation_id="updateWebhookEndpoint", response_model=WebhookEndpointRead)
async def update_webhook_endpoint(
    endpoint_id: uuid.UUID, data: WebhookEndpointUpdate, scope: ManageWebhooks
) -> WebhookEndpointRead:
    """Change the URL, description, event filter or enabled flag; only fields sent change."""
    endpoint = await service.update_endpoint(scope, endpoint_id, data)
    return WebhookEndpointRead.model_validate(endpoint)


@router.delete(
    ENDPOINT, operation_id="deleteWebhookEndpoint", status_code=status.HTTP_204_NO_CONTENT
)
async def delete_webhook_endpoint(endpoint_id: uuid.UUID, scope: ManageWebhooks) -> Response:
    """Delete the endpoint and its delivery log."""
    await service.delete_endpoint(scope, endpoint_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    ENDPOINT + "/rotate-secret",
    operation_id="rotateWebhookEndpointSecret",
    response_model=WebhookSecretRotated,
)
async def rotate_webhook_endpoint_secret(
    endpoint_id: uuid.UUID, scope: ManageWebhooks, response: Response
) -> WebhookSecretRotated:
    """A new signing secret, returned once; the previous one keeps signing for the overlap
    period, so receivers can switch without missing a message."""
    endpoint, secret = await service.rotate_secret(scope, endpoint_id)
    response.headers["Cache-Control"] = "no-store"
    read = WebhookEndpointRead.model_validate(endpoint)
    return WebhookSecretRotated(**read.model_dump(), secret=secret)


@router.post(
    ENDPOINT + "/test",
    operation_id="sendWebhookTestEvent",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookDeliveryRead,
)
async def send_webhook_test_event(
    endpoint_id: uuid.UUID, scope: ManageWebhooks
) -> WebhookDeliveryRead:
    """Queue a `webhook.test` event to this endpoint."""
    return WebhookDeliveryRead.model_validate(await service.send_test(scope, endpoint_id))


@router.get(
    ENDPOINT + "/deliveries",
    operation_id="listWebhookDeliveries",
    response_model=Page[WebhookDeliveryRead],
)
async def list_webhook_deliveries(
    endpoint_id: uuid.UUID,
    scope: ManageWebhooks,
    status_: Annotated[DeliveryStatus | None, Query(alias="status")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> Page[WebhookDeliveryRead]:
    """The endpoint's delivery log, newest first."""
    rows, next_cursor = await service.list_deliveries(scope, endpoint_id, status_, cursor, limit)
    return Page(
        items=[WebhookDeliveryRead.model_validate(d) for d in rows], next_cursor=next_cursor
    )


@router.get(
    "/webhook-deliveries/{delivery_id}",
    operation_id="getWebhookDelivery",
    response_model=WebhookDeliveryDetail,
)
async def get_webhook_delivery(
    delivery_id: uuid.UUID, scope: ManageWebhooks
) -> WebhookDeliveryDetail:
    """One delivery with each of its attempts."""
    found = await service.get_delivery(scope, delivery_id)
    attempts = await service.delivery_attempts(scope, delivery_id)
    read = WebhookDeliveryRead.model_validate(found)
    return WebhookDeliveryDetail(
        **read.model_dump(), attempt_log=[WebhookAttemptRead.model_validate(a) for a in attempts]
    )


@router.post(
    "/webhook-deliveries/{delivery_id}/redeliver",
    operation_id="redeliverWebhook",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=WebhookDeliveryRead,
)
async def redeliver_webhook(delivery_id: uuid.UUID, scope: ManageWebhooks) -> WebhookDeliveryRead:
    """Send a finished delivery's message again (same `webhook-id`), as a new delivery."""
    return WebhookDeliveryRead.model_validate(await service.redeliver(scope, delivery_id))
