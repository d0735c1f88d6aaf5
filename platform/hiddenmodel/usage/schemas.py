"""Bodies of the usage and quota API."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class LimitRead(BaseModel):
    name: str
    subject: str = Field(description="`org`, `member` or `api_key`")
    limit: float | None = Field(description="null: unlimited")
    used: float
    reserved: float
    remaining: float | None
    resets_at: datetime | None


class LimitsRead(BaseModel):
    plan: str
    period_start: datetime
    limits: list[LimitRead]


class SubLimits(BaseModel):
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
