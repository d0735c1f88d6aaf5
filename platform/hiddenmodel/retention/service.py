"""Rules of retention on the API side: what applies to an organization, and its own setting
(only ever shorter than the plan's)."""

from __future__ import annotations

from datetime import UTC, datetime

from hiddenmodel.errors import Problem
from hiddenmodel.retention import repository
from hiddenmodel.retention.models import OrgRetention
from hiddenmodel.retention.schemas import RetentionRead, RetentionSet
from tenants.auth import OrgScope
from tenants.service import audit


class RetentionAbovePlan(Problem):
    status, kind, title = 422, "retention-above-plan", "Retention longer than the plan's"


def effective_days(plan_days: int | None, days: int | None) -> int | None:
    """The shorter of the two; null (forever) only when both are."""
    kept = [d for d in (plan_days, days) if d is not None]
    return min(kept) if kept else None


async def get_retention(scope: OrgScope) -> RetentionRead:
    plan_days = await repository.plan_days(scope.session, scope.org_id)
    row = await repository.get_setting(scope.session)
    days = row.days if row else None
    return RetentionRead(
        plan_days=plan_days, days=days, effective_days=effective_days(plan_days, days)
    )


async def set_retention(scope: OrgScope, body: RetentionSet) -> RetentionRead:
    """Set (or, with null, clear) the organization's own retention. The objects of jobs
    already past the new limit go at the next sweep."""
    plan_days = await repository.plan_days(scope.session, scope.org_id)
    if body.days is not None and plan_days is not None and body.days > plan_days:
        raise RetentionAbovePlan(
            f"The plan keeps objects {plan_days} days; an organization can only shorten that.",
            days=body.days,
            plan_days=plan_days,
        )
    row = await repository.get_setting(scope.session, for_update=True)
    previous = row.days if row else None
    if body.days is None:
        if row is not None:
            await repository.delete_setting(scope.session, row)
    elif row is None:
        scope.session.add(OrgRetention(organization_id=scope.org_id, days=body.days))
    else:
        row.days = body.days
        row.updated_at = datetime.now(UTC)
    audit(
        scope.session,
        scope.org_id,
        scope.principal,
        "retention.set",
        "organization",
        scope.org_id,
        days=body.days,
        previous=previous,
    )
    await scope.session.flush()
    return RetentionRead(
        plan_days=plan_days, days=body.days, effective_days=effective_days(plan_days, body.days)
    )
