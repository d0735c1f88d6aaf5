"""Bodies of the batches API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from hiddenmodel.batches.models import BatchStatus
from hiddenmodel.inputs import Name, RequestModel
from hiddenmodel.jobs.schemas import JobError, Price


class BatchCreate(RequestModel):
    operation: str = Field(max_length=64, examples=["resize"])
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Params for every item (see GET /v1/operations); a manifest row's own "
        "params are laid over them.",
    )
    name: Name | None = Field(default=None, max_length=200)
    webhook_tag: str | None = Field(
        default=None, max_length=200, description="Echoed in the batch.completed event."
    )


class Eta(BaseModel):
    seconds: float = Field(description="Seconds until the last item is expected to end")
    at: datetime
    basis: str = Field(
        description="`batch_throughput`: this batch's items ended so far; `recent_jobs`: the "
        "mean GPU (or CPU) seconds of the organization's recent jobs of the operation"
    )


class BatchCounts(BaseModel):
    items: int = Field(description="Every item added")
    rejected: int = Field(description="Items refused at intake (a damaged photo); no job")
    pending: int = Field(description="Items not yet submitted")
    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    expired: int = 0


class BatchRead(BaseModel):
    id: uuid.UUID
    name: str | None
    webhook_tag: str | None
    operation: str
    params: dict[str, Any]
    status: BatchStatus
    cancel_requested: bool
    counts: BatchCounts
    progress: float = Field(ge=0, le=1, description="Share of the submitted items' work done")
    gpu_seconds: float = Field(description="GPU seconds metered so far")
    compute_seconds: float = Field(description="Worker seconds so far (CPU operations)")
    eta: Eta | None
    created_at: datetime
    submitted_at: datetime | None
    finished_at: datetime | None


class ItemsAdded(BaseModel):
    added: int
    rejected: int
    batch: BatchRead


class BatchItemRead(BaseModel):
    id: uuid.UUID
    position: int
    name: str
    params: dict[str, Any]
    job_id: uuid.UUID | None = Field(description="Set once the batch is submitted")
    status: str = Field(
        description="`pending` (not submitted), `rejected` (refused at intake) or the job's status"
    )
    progress: float
    error: JobError | None
    report: dict[str, Any] | None


class BatchQuoteRead(BaseModel):
    """A dry run's answer for a whole batch: nothing was admitted."""

    dry_run: bool = True
    operation: str
    items: int
    estimate: dict[str, float | int]
    price: Price
    plan: str
