"""HTTP of quotas: the limits view, and sub-limits per member and per API key."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Path

from hiddenmodel.usage import service
from hiddenmodel.usage.schemas import LimitsRead, SubLimits, SubLimitsRead
from tenants.auth import KeyUsageRead, ManageMembers, UsageRead

router = APIRouter(prefix="/v1", tags=["usage"])

SubjectPath = Annotated[Literal["members", "api-keys"], Path(description="members | api-keys")]
_SUBJECT = {"members": "member", "api-keys": "api_key"}


@router.get("/usage/limits", operation_id="getUsageLimits", response_model=LimitsRead)
async def get_limits(scope: KeyUsageRead) -> LimitsRead:
    """Every limit on this API key's organization, the key and its creator: used, reserved,
    remaining and when monthly counters reset."""
    return await service.limits_view(scope)


@router.get(
    "/orgs/{org_id}/usage/limits", operation_id="getOrgUsageLimits", response_model=LimitsRead
)
async def get_org_limits(scope: UsageRead) -> LimitsRead:
    return await service.limits_view(scope)


@router.put(
    "/orgs/{org_id}/quota-limits/{subject}/{subject_id}",
    operation_id="setSubLimits",
    response_model=SubLimitsRead,
)
async def set_sub_limits(
    subject: SubjectPath, subject_id: uuid.UUID, limits: SubLimits, scope: ManageMembers
) -> SubLimitsRead:
    """Cap one member or one API key at or below the organization's limits (replaces earlier
    caps); a cap above one is refused with 422 `sub-limit-above-plan`."""
    return await service.set_sub_limits(scope, _SUBJECT[subject], subject_id, limits)


@router.get(
    "/orgs/{org_id}/quota-limits/{subject}/{subject_id}",
    operation_id="getSubLimits",
    response_model=SubLimitsRead,
)
async def get_sub_limits(
    subject: SubjectPath, subject_id: uuid.UUID, scope: ManageMembers
) -> SubLimitsRead:
    return await service.get_sub_limits(scope, _SUBJECT[subject], subject_id)
