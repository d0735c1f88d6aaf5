"""Retention as the API shows and takes it."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from hiddenmodel.inputs import RequestModel

# A century: long enough for anything, short enough that date arithmetic never overflows.
RetentionDays = Annotated[StrictInt, Field(ge=1, le=36500)]


class RetentionRead(BaseModel):
    plan_days: int | None = Field(
        description="The plan's retention in days; null keeps inputs and outputs forever."
    )
    days: int | None = Field(
        description="The organization's own, shorter setting; null follows the plan."
    )
    effective_days: int | None = Field(
        description="What applies: the shorter of the two. A job's inputs and outputs are "
        "deleted this many days after it finished; the job stays, its downloads answer 410."
    )


class RetentionSet(RequestModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"days": 14}]})

    days: RetentionDays | None = Field(
        description="Days to keep a job's inputs and outputs after it finished, at most the "
        "plan's; null follows the plan."
    )
