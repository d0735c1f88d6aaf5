"""HTTP of retention: how long an organization's inputs and outputs are kept."""

from __future__ import annotations

from fastapi import APIRouter

from hiddenmodel.retention import service
from hiddenmodel.retention.schemas import RetentionRead, RetentionSet
from tenants.auth import ManageOrg, ReadOrg

router = APIRouter(prefix="/v1", tags=["retention"])


@router.get("/orgs/{org_id}/retention", operation_id="getRetention", response_model=RetentionRead)
async def get_retention(scope: ReadOrg) -> RetentionRead:
    """How many days a finished job's inputs and outputs are kept: the plan's, the
    organization's own, and the one that applies."""
    return await service.get_retention(scope)


@router.put("/orgs/{org_id}/retention", operation_id="setRetention", response_model=RetentionRead)
async def set_retention(body: RetentionSet, scope: ManageOrg) -> RetentionRead:
    """Keep objects for fewer days than the plan (422 `retention-above-plan` above it); null
    follows the plan. Objects already past the new limit are deleted at the next sweep."""
    return await service.set_retention(scope, body)
