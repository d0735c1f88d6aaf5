"""Bodies of the operator API."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    model_validator,
)

from hiddenmodel.inputs import RequestModel, check_name
from hiddenmodel.retention.schemas import RetentionDays
from hiddenmodel.usage.quantities import GpuSeconds, LimitValues, OptionalGpuSeconds
from hiddenmodel.usage.schemas import UsageTotals

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
PLAN_CODE_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"

Code = Annotated[str, Field(pattern=PLAN_CODE_PATTERN, description="Lowercase, digits, - and _")]
Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(check_name)]
StripePriceId = Annotated[str, Field(pattern=r"^price_[A-Za-z0-9_]{1,249}$")]
Price = Annotated[Decimal, Field(ge=0, max_digits=12, decimal_places=6, allow_inf_nan=False)]
Currency = Annotated[
    str,
    Field(pattern=r"^[A-Za-z]{3}$", description="ISO 4217, stored lowercase as Stripe writes it"),
    AfterValidator(str.lower),
]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=INT32_MAX)]
PerMinute = Annotated[int, Field(ge=1, le=INT32_MAX)]
Bytes = Annotated[int, Field(ge=0, le=INT64_MAX)]

# Fields a plan must always have: PATCH may leave them out but not set them to null.
REQUIRED_PLAN_FIELDS = (
    "name",
    "price_per_gpu_second",
    "currency",
    "included_gpu_seconds",
    "included_images",
    "is_default",
)


class PlanLimits(RequestModel):
    """The limits a plan sets and an organization may override; null means unlimited.

    Its fields are exactly ``hiddenmodel.usage.service.ORG_LIMITS``.
    """

    model_config = ConfigDict(extra="forbid")

    monthly_gpu_seconds: Seconds | None = None
    monthly_images: Count | None = None
    max_running_jobs: Count | None = None
    max_queued_jobs: Count | None = None
    storage_bytes: Bytes | None = None
    requests_per_minute: PerMinute | None = None
    org_requests_per_minute: PerMinute | None = None


class PlanCreate(PlanLimits):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "code": "studio",
                    "name": "Studio",
                    "price_per_gpu_second": "0.003500",
                    "currency": "usd",
                    "included_gpu_seconds": 7200,
                    "included_images": 10000,
                    "monthly_gpu_seconds": 200000,
                    "monthly_images": 400000,
                    "max_running_jobs": 32,
                    "stripe_price_id": "price_1QStudio",
                }
            ]
        },
    )

    code: Code
    name: Name
    stripe_price_id: StripePriceId | None = None
    price_per_gpu_second: Price
    currency: Currency = "usd"
    included_gpu_seconds: Seconds = 0
    included_images: Count = 0
    retention_days: RetentionDays | None = Field(
        default=None,
        description="Days a finished job's inputs and outputs are kept; null keeps them forever",
    )
    is_default: bool = Field(
        default=False, description="Make this the plan of organizations without one"
    )


class PlanUpdate(PlanLimits):
    """Only the fields sent change; a limit sent as null becomes unlimited."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"price_per_gpu_second": "0.004500", "max_queued_jobs": None}]
        },
    )

    name: Name | None = None
    stripe_price_id: StripePriceId | None = None
    price_per_gpu_second: Price | None = None
    currency: Currency | None = None
    included_gpu_seconds: Seconds | None = None
    included_images: Count | None = None
    retention_days: RetentionDays | None = None
    is_default: bool | None = None

    @model_validator(mode="after")
    def _required_not_null(self) -> PlanUpdate:
        nulled = [
            f
            for f in REQUIRED_PLAN_FIELDS
            if f in self.model_fields_set and getattr(self, f) is None
        ]
        if nulled:
            raise ValueError(f"{', '.join(nulled)} cannot be null")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class PlanRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    code: str
    name: str
    stripe_price_id: str | None
    price_per_gpu_second: Decimal
    currency: str
    included_gpu_seconds: GpuSeconds
    included_images: int
    monthly_gpu_seconds: OptionalGpuSeconds
    monthly_images: int | None
    max_running_jobs: int | None
    max_queued_jobs: int | None
    storage_bytes: int | None
    requests_per_minute: int | None
    org_requests_per_minute: int | None
    retention_days: int | None
    is_default: bool
    created_at: datetime


LimitValue = StrictInt | StrictFloat | None


class OrgPlanSet(RequestModel):
    """An organization's plan and its overrides, replacing earlier ones."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"plan": "pro", "overrides": {"monthly_images": 500000, "storage_bytes": None}}
            ]
        },
    )

    plan: Code
    overrides: dict[str, LimitValue] = Field(
        default_factory=dict,
        description="Limit name → value, or null for unlimited. Limits left out follow the plan.",
    )


class OrgPlanRead(BaseModel):
    organization_id: uuid.UUID
    plan: str
    overrides: LimitValues
    limits: LimitValues = Field(description="Effective limits: plan and overrides")


class OrgUsage(UsageTotals):
    period_start: date = Field(description="First day of the current month (UTC)")


class AdminOrgRead(BaseModel):
    id: uuid.UUID
    slug: str
    name: str
    created_at: datetime
    plan: str
    plan_assigned: bool = Field(description="False: on the default plan for want of another")
    overrides: LimitValues
    limits: LimitValues = Field(description="Effective limits: plan and overrides")
    subscription_status: str | None
    usage: OrgUsage
    suspended_at: datetime | None = Field(
        default=None, description="Set while suspended: members and keys are refused"
    )


AdminGroupBy = Literal["org", "day", "operation"]
