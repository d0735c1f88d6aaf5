"""Bodies of the jobs API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.usage.quantities import OptionalGpuSeconds


class InputRead(BaseModel):
    format: str
    width: int
    height: int
    bytes: int


class OutputRead(BaseModel):
    name: str = Field(description="`output`, `alpha`, or a debug layer name")
    format: str
    content_type: str
    width: int
    height: int
    bytes: int
    url: str | None = Field(
        description="Presigned download URL; expires at `url_expires_at`. Null once the job "
        "expired under the organization's retention (see `expired_at`)."
    )
    url_expires_at: datetime | None


class JobError(BaseModel):
    code: str
    message: str
    status: int = Field(
        description="The HTTP status a synchronous call would have answered: 422 when the "
        "input was refused (nothing is charged), 500 for a failure on our side"
    )


class Timings(BaseModel):
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queued_seconds: float | None
    run_seconds: float | None
    compute_seconds: float | None


class JobRead(BaseModel):
    id: uuid.UUID
    operation: str
    operation_version: str
    status: JobStatus
    stage: str | None
    progress: float = Field(ge=0, le=1)
    queue_position: int | None = Field(
        description="Jobs of your organization ahead of this one, while queued."
    )
    params: dict[str, Any]
    inputs: dict[str, InputRead]
    outputs: list[OutputRead]
    report: dict[str, Any] | None
    error: JobError | None
    gpu_seconds: OptionalGpuSeconds
    attempts: int
    cancel_after: datetime | None
    timings: Timings
    batch_id: uuid.UUID | None = Field(
        default=None, description="The batch the job belongs to, if it came with one"
    )
    created_at: datetime
    expired_at: datetime | None = Field(
        default=None,
        description="When the job's inputs and outputs were deleted under the organization's "
        "retention (`GET /v1/orgs/{org_id}/retention`); its downloads answer 410 since.",
    )


class OperationRead(BaseModel):
    name: str
    version: str
    summary: str
    queue: str
    inputs: list[str]
    min_input_side: int = Field(
        description="Images with a shorter side than this (px) are refused at submit"
    )
    params_schema: dict[str, Any]
    example_params: dict[str, Any]
    cost_estimate_1024px: dict[str, Any]


class Price(BaseModel):
    amount: str = Field(description="Decimal amount, in the currency's major unit")
    currency: str


class QuoteRead(BaseModel):
    """A dry run's answer: the estimate and its price; nothing was created."""

    dry_run: bool = True
    operation: str
    operation_version: str
    estimate: dict[str, float | int]
    price: Price
    plan: str

    @classmethod
    def from_quote(cls, quote: Any) -> QuoteRead:
        return cls(
            operation=quote.operation,
            operation_version=quote.operation_version,
            estimate={"gpu_seconds": quote.gpu_seconds, "images": quote.images},
            price=Price(amount=str(quote.amount), currency=quote.currency),
            plan=quote.plan,
        )
