"""Bodies of the webhooks API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hiddenmodel.inputs import RequestModel
from hiddenmodel.webhooks.models import DeliveryStatus, EventType
from hiddenmodel.webhooks.urls import MAX_URL_LENGTH

URL_DESCRIPTION = "https URL that receives POSTed events. It must resolve to public addresses only."
EVENT_TYPES_DESCRIPTION = "Event types to send; empty means every type."


def _unique_sorted(values: list[EventType] | None) -> list[EventType] | None:
    return None if values is None else sorted(set(values))


class WebhookEndpointCreate(RequestModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "url": "https://example.com/hooks/hidden-model",
                    "description": "catalog pipeline",
                    "event_types": ["job.succeeded", "job.failed"],
                }
            ]
        },
    )

    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH, description=URL_DESCRIPTION)
    description: str = Field(default="", max_length=500)
    event_types: list[EventType] = Field(
        default_factory=list, max_length=len(EventType), description=EVENT_TYPES_DESCRIPTION
    )
    enabled: bool = True

    _event_types = field_validator("event_types")(_unique_sorted)


class WebhookEndpointUpdate(RequestModel):
    """Only the fields sent change."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None, min_length=1, max_length=MAX_URL_LENGTH, description=URL_DESCRIPTION
    )
    description: str | None = Field(default=None, max_length=500)
    event_types: list[EventType] | None = Field(
        default=None, max_length=len(EventType), description=EVENT_TYPES_DESCRIPTION
    )
    enabled: bool | None = None

    _event_types = field_validator("event_types")(_unique_sorted)

    @model_validator(mode="after")
    def _no_nulls(self) -> WebhookEndpointUpdate:
        nulls = sorted(f for f in self.model_fields_set if getattr(self, f) is None)
        if nulls:
            raise ValueError(f"{', '.join(nulls)} cannot be null")
        return self


class WebhookEndpointRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    description: str
    event_types: list[EventType]
    enabled: bool
    previous_secret_expires_at: datetime | None = Field(
        description="While set and in the future, the previous secret still signs messages."
    )
    created_at: datetime
    updated_at: datetime


class WebhookEndpointCreated(WebhookEndpointRead):
    secret: str = Field(
        description="The signing secret (`whsec_…`). Shown once: store it now.",
    )


class WebhookSecretRotated(WebhookEndpointRead):
    secret: str = Field(
        description="The new signing secret, shown once. Messages carry a signature by the "
        "previous secret too until `previous_secret_expires_at`.",
    )


class WebhookDeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_type: str
    message_id: str = Field(description="The `webhook-id` header; stable across retries.")
    status: DeliveryStatus
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    last_attempt_at: datetime | None
    delivered_at: datetime | None
    redelivery_of: uuid.UUID | None
    payload: dict[str, Any]
    created_at: datetime


class WebhookAttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    status_code: int | None
    error: str | None
    response_body: str | None = Field(description="The first bytes of the receiver's answer.")
    duration_ms: int
    created_at: datetime


class WebhookDeliveryDetail(WebhookDeliveryRead):
    attempt_log: list[WebhookAttemptRead]
