"""Bodies of the usage and quota API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hiddenmodel.inputs import RequestModel
from hiddenmodel.usage import quantities


class LimitRead(BaseModel):
    """One limit of one subject. GPU-seconds are given to the millisecond; images, jobs, bytes
    and requests as whole numbers. ``remaining`` is worked out from the rounded amounts."""

    name: str
    subject: str = Field(description="`org`, `member` or `api_key`")
    limit: int | float | None = Field(description="null: unlimited")
    used: int | float
    reserved: int | float
    remaining: int | float | None = Field(description="null: unlimited")
    resets_at: datetime | None

    @model_validator(mode="before")
    @classmethod
    def _rounded(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "name" not in data:
            return data
        name = data["name"]
        limit, used, reserved = data.get("limit"), data.get("used", 0), data.get("reserved", 0)
        return {
            **data,
            "limit": None if limit is None else quantities.of_limit(name, limit),
            "used": quantities.of_limit(name, used),
            "reserved": quantities.of_limit(name, reserved),
            "remaining": quantities.remaining(name, limit, used, reserved),
        }


class LimitsRead(BaseModel):
    plan: str
    period_start: datetime
    limits: list[LimitRead]


class SubLimits(RequestModel):
    """Limits a tenant admin sets for one member or one API key (null or absent: none)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"monthly_images": 500, "max_queued_jobs": 20}]},
    )

    monthly_gpu_seconds: float | None = Field(default=None, ge=0)
    monthly_images: int | None = Field(default=None, ge=0)
    max_queued_jobs: int | None = Field(default=None, ge=0)
    requests_per_minute: int | None = Field(default=None, ge=1)


class SubLimitsRead(SubLimits):
    model_config = ConfigDict(extra="ignore")

    subject_type: str
    subject_id: uuid.UUID
