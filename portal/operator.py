"""Platform operators' pages (superusers): tenants, plans and overrides, suspension, queues
and workers, usage across tenants. Every read and write goes through the audited ops door."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from hiddenmodel.admin import service as admin_service
from hiddenmodel.admin.auth import Operator
from hiddenmodel.admin.schemas import OrgPlanSet
from hiddenmodel.billing import service as billing_service
from hiddenmodel.db import ops_session
from hiddenmodel.errors import NotFound, Problem
from hiddenmodel.usage import ratelimits
from hiddenmodel.usage import service as usage_service
from portal.security import (
    PREFIX,
    checked_form,
)
from portal.web import (
    PAGE_SIZE,
    WORKER_WINDOW_MINUTES,
    form_field,
    number,
    parse_day,
    problem_message,
    render,
    require_user,
    router,
    see_other,
    today,
    validation_message,
)

# --- platform operators ------------------------------------------------------------------


async def require_operator(request: Request) -> Operator:
    """A signed-in superuser; anyone else is told the page does not exist."""
    user = await require_user(request)
    if not user.is_superuser:
        raise NotFound("No such page.")
    return Operator(user_id=user.id, email=user.email)


def _audited(operator: Operator, purpose: str, **detail: Any) -> Any:
    # The same door and audit record as the operator API.
    return ops_session(
        actor=operator.email,
        purpose=purpose,
        detail={"operator_id": str(operator.user_id), "via": "portal", **detail},
    )


@router.get("/operator", response_class=HTMLResponse)
async def operator_orgs(request: Request, q: str = "", cursor: str | None = None) -> Response:
    operator = await require_operator(request)
    query = q[:100] or None
    async with _audited(operator, "admin.orgs.list", q=query, cursor=cursor) as session:
        page = await admin_service.list_orgs(
            session, query=query, cursor=cursor, limit=PAGE_SIZE, today=today()
        )
    more = urlencode({"q": q[:100], "cursor": page.next_cursor}) if page.next_cursor else None
    return render(
        request, "operator_orgs.html", {"orgs": page.items, "q": q, "more": more, "user": operator}
    )


async def _operator_org_context(operator: Operator, org_id: uuid.UUID) -> dict[str, Any]:
    async with _audited(operator, "admin.orgs.read", org_id=str(org_id)) as session:
        org = await admin_service.get_org(session, org_id, today())
        plans = await admin_service.list_plans(session)
    return {"o": org, "plans": plans, "user": operator}


@router.get("/operator/orgs/{org_id}", response_class=HTMLResponse)
async def operator_org(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    return render(request, "operator_org.html", await _operator_org_context(operator, org_id))


@router.get("/operator/queues", response_class=HTMLResponse)
async def operator_queues(request: Request) -> Response:
    operator = await require_operator(request)
    now = datetime.now(UTC)
    async with _audited(operator, "admin.queues.read") as session:
        queued, workers = await admin_service.queues_and_workers(
            session, now, timedelta(minutes=WORKER_WINDOW_MINUTES)
        )
    by_queue: dict[str, int] = {}
    for row in queued:
        by_queue[row.queue] = by_queue.get(row.queue, 0) + int(row.jobs)
    return render(
        request,
        "operator_queues.html",
        {
            "queued": queued,
            "by_queue": sorted(by_queue.items()),
            "workers": workers,
            "now": now,
            "window": WORKER_WINDOW_MINUTES,
            "user": operator,
        },
    )


_OPERATOR_GROUPS = ("org", "day", "operation")


@router.get("/operator/usage", response_class=HTMLResponse)
async def operator_usage(
    request: Request, group_by: str = "org", start: str = "", end: str = ""
) -> Response:
    """Usage across tenants, and Stripe's meter compared with what was sent."""
    operator = await require_operator(request)
    group = group_by if group_by in _OPERATOR_GROUPS else "org"
    first, last = parse_day(start), parse_day(end)
    error: str | None = None
    async with _audited(
        operator,
        "admin.usage.report",
        group_by=group,
        start=first.isoformat() if first else None,
        to=last.isoformat() if last else None,
    ) as session:
        try:
            report = await admin_service.usage_report(session, group, first, last, today())  # type: ignore[arg-type]
        except Problem as exc:
            error = problem_message(exc)
            report = await admin_service.usage_report(session, group, None, None, today())  # type: ignore[arg-type]
    reconciliations = await billing_service.list_reconciliations(operator, None, None, PAGE_SIZE)
    return render(
        request,
        "operator_usage.html",
        {
            "report": report,
            "group": group,
            "groups": _OPERATOR_GROUPS,
            "reconciliations": reconciliations,
            "error": error,
            "user": operator,
        },
    )


@router.post("/operator/orgs/{org_id}/suspension", response_class=HTMLResponse)
async def operator_suspension(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    form = await checked_form(request)
    suspend = form_field(form, "action") == "suspend"
    purpose = "admin.orgs.suspend" if suspend else "admin.orgs.unsuspend"
    async with _audited(operator, purpose, org_id=str(org_id)) as session:
        await admin_service.set_suspended(session, operator, org_id, suspend, today())
    return see_other(f"{PREFIX}/operator/orgs/{org_id}")


@router.post("/operator/orgs/{org_id}/plan", response_class=HTMLResponse)
async def operator_plan(request: Request, org_id: uuid.UUID) -> Response:
    operator = await require_operator(request)
    form = await checked_form(request)
    overrides: dict[str, Any] = {}
    for name in usage_service.ORG_LIMITS:
        raw = form_field(form, f"override_{name}")
        if raw == "unlimited":
            overrides[name] = None
        elif raw:
            overrides[name] = number(raw)
    try:
        body = OrgPlanSet.model_validate({"plan": form_field(form, "plan"), "overrides": overrides})
        async with _audited(
            operator, "admin.orgs.set_plan", org_id=str(org_id), **body.model_dump(mode="json")
        ) as session:
            await admin_service.set_org_plan(session, operator, org_id, body)
    except (ValidationError, Problem) as exc:
        context = await _operator_org_context(operator, org_id)
        context["error"] = (
            validation_message(exc) if isinstance(exc, ValidationError) else problem_message(exc)
        )
        status = exc.status if isinstance(exc, Problem) else 422
        return render(request, "operator_org.html", context, status_code=status)
    ratelimits.forget(org_id)
    return see_other(f"{PREFIX}/operator/orgs/{org_id}")
