"""Bodies of the usage and quota API: limits, sub-limits, usage reports and statements."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hiddenmodel.inputs import RequestModel
from hiddenmodel.usage import quantities
from hiddenmodel.usage.quantities import GpuSeconds, Megapixels

# What a usage report groups by; tenants may not group by organization.
Dimension = Literal["day", "member", "api_key", "operation", "org"]
TenantGroupBy = Literal["day", "member", "api_key", "operation"]


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


# --- usage reports and statements ----------------------------------------------------------


class UsageTotals(BaseModel):
    jobs: int = Field(description="Billable finished jobs")
    gpu_seconds: GpuSeconds = Field(description="To the millisecond")
    images: int
    megapixels: Megapixels = Field(description="To the pixel (six decimals)")


class UsageRow(UsageTotals):
    key: str | None = Field(
        description="The group: a date (YYYY-MM-DD), a user id, an API key id, an operation "
        "or an organization id; null for jobs with no member or no API key"
    )
    label: str = Field(description="What a person reads: date, e-mail, key name, operation")


class UsageReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    group_by: str
    from_: date = Field(alias="from", description="First day, UTC, included")
    to: date = Field(description="Last day, UTC, included")
    rows: list[UsageRow]
    totals: UsageTotals


class StatementPlan(BaseModel):
    code: str
    name: str
    currency: str
    price_per_gpu_second: Decimal
    included_gpu_seconds: Decimal
    included_images: int


class StatementCharges(BaseModel):
    """The estimate, in exact decimals: GPU-seconds beyond the included amount, at the price."""

    gpu_seconds: Decimal
    included_gpu_seconds: Decimal
    billable_gpu_seconds: Decimal
    price_per_gpu_second: Decimal
    images: int
    included_images: int
    images_beyond_included: int
    estimated_charge: Decimal
    currency: str


class Statement(BaseModel):
    organization_id: uuid.UUID
    month: str = Field(description="YYYY-MM")
    period_start: datetime
    period_end: datetime = Field(description="The first instant after the month")
    final: bool = Field(description="False while the month is still running")
    plan: StatementPlan
    totals: UsageTotals
    by_operation: list[UsageRow]
    by_member: list[UsageRow]
    by_api_key: list[UsageRow]
    charges: StatementCharges
