"""An organization's pages: dashboard, jobs, members, API keys, quotas, webhooks, usage,
billing and audit log. Each enters the organization with :func:`portal.web.org_page`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError

from hiddenmodel import storage
from hiddenmodel.admin import service as admin_service
from hiddenmodel.billing import service as billing_service
from hiddenmodel.db import async_global_session, commit
from hiddenmodel.errors import NotFound, Problem
from hiddenmodel.jobs import repository as jobs_repository
from hiddenmodel.jobs import service as jobs_service
from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.jobs.router import event_stream_response
from hiddenmodel.usage import export, periods
from hiddenmodel.usage import service as usage_service
from hiddenmodel.usage.schemas import SubLimits, UsageReport
from hiddenmodel.webhooks import service as webhooks_service
from hiddenmodel.webhooks.models import EventType
from hiddenmodel.webhooks.schemas import WebhookEndpointCreate, WebhookEndpointUpdate
from portal.charts import DayPoint, daily_usage_svg, gauge_svg
from portal.security import (
    checked_form,
    first_submission,
)
from portal.web import (
    CHART_DAYS,
    OPERATE,
    PAGE_SIZE,
    attempt,
    error_field,
    form_field,
    org_page,
    org_url,
    parse_day,
    problem_message,
    render,
    router,
    see_other,
    today,
    validation_message,
)
from tenants import repository as tenants_repository
from tenants import service as tenants_service
from tenants.auth import (
    MANAGE_API_KEYS,
    MANAGE_MEMBERS,
    READ_AUDIT,
    USAGE_READ,
    OrgScope,
)
from tenants.models import Role, Scope
from tenants.schemas import ApiKeyCreate, InvitationCreate, OrganizationUpdate

# --- dashboard ---------------------------------------------------------------------------


async def _daily(scope: OrgScope, days: int) -> list[DayPoint]:
    day = today()
    period = periods.report_period(day - timedelta(days=days - 1), day, today=day)
    report = await usage_service.usage_report(scope.session, "day", period)
    by_day = {row.key: row for row in report.rows}
    points = []
    for i in range(days):
        day = period.start + timedelta(days=i)
        row = by_day.get(day.isoformat())
        points.append(
            DayPoint(day, float(row.gpu_seconds) if row else 0.0, int(row.images) if row else 0)
        )
    return points


@router.get("/orgs/{org_id}", response_class=HTMLResponse)
async def dashboard(request: Request, org_id: uuid.UUID) -> HTMLResponse:
    async with org_page(request, org_id, OPERATE) as scope:
        points = await _daily(scope, CHART_DAYS)
        counts = await jobs_repository.status_counts(scope.session)
        oldest = await jobs_repository.oldest_queued_at(scope.session)
        limits = await usage_service.limits_view(scope)
        gauges = [
            (lim, gauge_svg(float(lim.used), None if lim.limit is None else float(lim.limit)))
            for lim in limits.limits
            if lim.subject == "org"
        ]
        wait = (datetime.now(UTC) - oldest).total_seconds() if oldest else None
        return render(
            request,
            "dashboard.html",
            {
                "chart": daily_usage_svg(points),
                "totals": (sum(p.gpu_seconds for p in points), sum(p.images for p in points)),
                "counts": [(s.value, counts.get(s.value, 0)) for s in JobStatus],
                "oldest_wait": wait,
                "limits": limits,
                "gauges": gauges,
            },
            scope=scope,
        )


# --- members and invitations -------------------------------------------------------------


async def _members_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    members, next_cursor = await tenants_service.list_members(scope, cursor, PAGE_SIZE)
    invitations, _ = await tenants_repository.list_invitations(scope.session, None, PAGE_SIZE)
    return {
        "members": members,
        "next_cursor": next_cursor,
        "invitations": [
            (i, tenants_service.invitation_status(i))
            for i in invitations
            if tenants_service.invitation_status(i) == "pending"
        ],
        "roles": [r.value for r in Role],
        "locks": await tenants_service.sign_in_locks(scope),
        "is_owner": scope.role == Role.OWNER,
    }


@router.get("/orgs/{org_id}/members", response_class=HTMLResponse)
async def members_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        return render(request, "members.html", await _members_context(scope, cursor), scope=scope)


async def _members_error(
    request: Request, scope: OrgScope, message: str, status: int, **extra: Any
) -> HTMLResponse:
    context = await _members_context(scope, None)
    context.update(error=message, **extra)
    return render(request, "members.html", context, status_code=status, scope=scope)


@router.post("/orgs/{org_id}/two-factor", response_class=HTMLResponse)
async def require_two_factor(request: Request, org_id: uuid.UUID) -> Response:
    """The owner's switch: whether members must sign in with two-factor."""
    form = await checked_form(request)
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        try:
            async with attempt(scope):
                await tenants_service.update_organization(
                    scope,
                    OrganizationUpdate(require_two_factor=form_field(form, "require") == "on"),
                )
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
    return see_other(org_url(org_id, "members") + "#two-factor")


@router.post("/orgs/{org_id}/members/invite", response_class=HTMLResponse)
async def invite(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        try:
            data = InvitationCreate.model_validate(
                {"email": form_field(form, "email"), "role": form_field(form, "role")}
            )
            async with attempt(scope):
                invitation, _ = await tenants_service.create_invitation(scope, data)
        except ValidationError as exc:
            return await _members_error(
                request,
                scope,
                validation_message(exc),
                422,
                invite_email=form_field(form, "email"),
                error_field=error_field(exc),
            )
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
        return see_other(org_url(org_id, "members") + f"?invited={quote(invitation.email)}")


@router.post("/orgs/{org_id}/members/{user_id}/role", response_class=HTMLResponse)
async def change_role(request: Request, org_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.change_role(scope, user_id, Role(form_field(form, "role")))
        except ValueError:
            return await _members_error(request, scope, "Choose one of the roles.", 422)
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
        return see_other(org_url(org_id, "members"))


@router.post("/orgs/{org_id}/members/{user_id}/remove", response_class=HTMLResponse)
async def remove_member(request: Request, org_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.remove_member(scope, user_id)
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
        return see_other(org_url(org_id, "members"))


@router.post("/orgs/{org_id}/members/{user_id}/unlock", response_class=HTMLResponse)
async def unlock_member(request: Request, org_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.clear_sign_in_lock(scope, user_id)
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
        return see_other(org_url(org_id, "members"))


@router.post("/orgs/{org_id}/invitations/{invitation_id}/revoke", response_class=HTMLResponse)
async def revoke_invitation(
    request: Request, org_id: uuid.UUID, invitation_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        await checked_form(request)
        try:
            async with attempt(scope):
                await tenants_service.revoke_invitation(scope, invitation_id)
        except Problem as exc:
            return await _members_error(request, scope, problem_message(exc), exc.status)
        return see_other(org_url(org_id, "members"))


# --- API keys ----------------------------------------------------------------------------


async def _keys_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    keys, next_cursor = await tenants_repository.list_api_keys(scope.session, cursor, PAGE_SIZE)
    return {
        "keys": keys,
        "next_cursor": next_cursor,
        "scopes": [s.value for s in Scope],
        "now": datetime.now(UTC),
    }


@router.get("/orgs/{org_id}/api-keys", response_class=HTMLResponse)
async def keys_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        return render(request, "keys.html", await _keys_context(scope, cursor), scope=scope)


@router.post("/orgs/{org_id}/api-keys", response_class=HTMLResponse)
async def create_key(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        form = await checked_form(request)
        if not await first_submission(form):
            return see_other(org_url(org_id, "api-keys"))  # created already; shown then
        expires = form_field(form, "expires_at")
        try:
            data = ApiKeyCreate(
                name=form_field(form, "name"),
                scopes=[s for s in form.getlist("scopes") if isinstance(s, str)],
                expires_at=datetime.fromisoformat(expires).replace(tzinfo=UTC) if expires else None,
            )
            async with attempt(scope):
                key, token = await tenants_service.create_api_key(scope, data)
        except (ValidationError, ValueError, Problem) as exc:
            if isinstance(exc, ValidationError):
                message = validation_message(exc)
            elif isinstance(exc, Problem):
                message = problem_message(exc)
            else:
                message = "The expiry must be a date and time."
            context = await _keys_context(scope, None)
            context.update(
                error=message,
                error_field=error_field(exc) or "expires_at",
                form_name=form_field(form, "name"),
            )
            return render(request, "keys.html", context, status_code=422, scope=scope)
        context = await _keys_context(scope, None)
        # The secret is shown in this answer only; it is never stored or shown again.
        context.update(created=key, secret=token)
        return render(request, "keys.html", context, status_code=201, scope=scope)


@router.post("/orgs/{org_id}/api-keys/{key_id}/revoke", response_class=HTMLResponse)
async def revoke_key(request: Request, org_id: uuid.UUID, key_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, MANAGE_API_KEYS) as scope:
        await checked_form(request)
        await tenants_service.revoke_api_key(scope, key_id)
        return see_other(org_url(org_id, "api-keys"))


# --- quotas per member and per key -------------------------------------------------------

_SUBJECTS = {"members": "member", "api-keys": "api_key"}
_LIMIT_FIELDS = ("monthly_gpu_seconds", "monthly_images", "max_queued_jobs", "requests_per_minute")


async def _quota_context(scope: OrgScope, subject: str, subject_id: uuid.UUID) -> dict[str, Any]:
    if subject not in _SUBJECTS:
        raise NotFound("No such page.")
    current = await usage_service.get_sub_limits(scope, _SUBJECTS[subject], subject_id)
    plan = await usage_service.org_plan(scope.session, scope.org_id)
    if subject == "members":
        user = (await tenants_repository.users_by_id(scope.session, [subject_id])).get(subject_id)
        label = user.email if user else str(subject_id)
    else:
        key = await tenants_repository.get_api_key(scope.session, subject_id)
        label = key.name if key else str(subject_id)
    return {
        "subject": subject,
        "subject_id": subject_id,
        "label": label,
        "current": current.model_dump(),
        "org_limits": plan.limits,
        "fields": _LIMIT_FIELDS,
    }


@router.get("/orgs/{org_id}/quotas/{subject}/{subject_id}", response_class=HTMLResponse)
async def quota_page(
    request: Request, org_id: uuid.UUID, subject: str, subject_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        context = await _quota_context(scope, subject, subject_id)
        return render(request, "quota.html", context, scope=scope)


@router.post("/orgs/{org_id}/quotas/{subject}/{subject_id}", response_class=HTMLResponse)
async def set_quota(
    request: Request, org_id: uuid.UUID, subject: str, subject_id: uuid.UUID
) -> Response:
    async with org_page(request, org_id, MANAGE_MEMBERS) as scope:
        form = await checked_form(request)
        if subject not in _SUBJECTS:
            raise NotFound("No such page.")
        values = {name: form_field(form, name) or None for name in _LIMIT_FIELDS}
        try:
            limits = SubLimits.model_validate(values)
            async with attempt(scope):
                await usage_service.set_sub_limits(scope, _SUBJECTS[subject], subject_id, limits)
        except (ValidationError, Problem) as exc:
            context = await _quota_context(scope, subject, subject_id)
            message = (
                validation_message(exc)
                if isinstance(exc, ValidationError)
                else problem_message(exc)
            )
            if isinstance(exc, Problem):
                field = exc.extra.get("field") or exc.extra.get("limit")
            else:
                field = str(exc.errors()[0]["loc"][0]) if exc.errors()[0]["loc"] else None
            context.update(error=message, error_field=field, current=values)
            status = exc.status if isinstance(exc, Problem) else 422
            return render(request, "quota.html", context, status_code=status, scope=scope)
        return see_other(org_url(org_id, "quotas", subject, str(subject_id)) + "?saved=1")


# --- jobs --------------------------------------------------------------------------------


@router.get("/orgs/{org_id}/jobs", response_class=HTMLResponse)
async def jobs_page(
    request: Request,
    org_id: uuid.UUID,
    status: str = "",
    operation: str = "",
    start: str = "",
    end: str = "",
    cursor: str | None = None,
) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        valid_status = status if status in {s.value for s in JobStatus} else None
        first, last = parse_day(start), parse_day(end)
        rows, next_cursor = await jobs_repository.list_jobs(
            scope.session,
            status=valid_status,
            operation=operation[:64] or None,
            # Days in UTC, both included.
            created_after=datetime.combine(first, time(), UTC) if first else None,
            created_before=datetime.combine(last + timedelta(days=1), time(), UTC)
            if last
            else None,
            cursor=cursor,
            limit=PAGE_SIZE,
        )
        jobs = [await jobs_service.view(scope, j) for j in rows]
        filters = {
            "status": valid_status or "",
            "operation": operation[:64],
            "start": first.isoformat() if first else "",
            "end": last.isoformat() if last else "",
        }
        more = urlencode({**filters, "cursor": next_cursor}) if next_cursor else None
        return render(
            request,
            "jobs.html",
            {
                "jobs": jobs,
                "filters": filters,
                "statuses": [s.value for s in JobStatus],
                "more": more,
            },
            scope=scope,
        )


@router.get("/orgs/{org_id}/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        row = await jobs_service.get(scope, job_id)
        job = await jobs_service.view(scope, row)
        # The API gives no input URLs; the page shows the inputs beside the outputs.
        input_urls = {
            name: storage.presigned_get_url(meta["key"], row.organization_id)
            for name, meta in row.inputs.items()
        }
        return render(
            request,
            "job.html",
            {"job": job, "terminal": job.status.terminal, "input_urls": input_urls},
            scope=scope,
        )


@router.get("/orgs/{org_id}/jobs/{job_id}/events")
async def job_events(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    """The job's event stream (the API's own), for the detail page's progress bar."""
    async with org_page(request, org_id, OPERATE) as scope:
        await jobs_service.get(scope, job_id)  # 404 before any stream opens
    return event_stream_response(scope, job_id)


@router.post("/orgs/{org_id}/jobs/{job_id}/cancel")
async def cancel_job(request: Request, org_id: uuid.UUID, job_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        await checked_form(request)
        await jobs_service.cancel(scope, job_id)
        return see_other(org_url(org_id, "jobs", str(job_id)))


# --- webhooks ----------------------------------------------------------------------------


async def _webhooks_context(scope: OrgScope, cursor: str | None) -> dict[str, Any]:
    rows, next_cursor = await webhooks_service.list_endpoints(scope, cursor, PAGE_SIZE)
    return {
        "endpoints": rows,
        "next_cursor": next_cursor,
        "event_types": [e.value for e in EventType],
    }


@router.get("/orgs/{org_id}/webhooks", response_class=HTMLResponse)
async def webhooks_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        context = await _webhooks_context(scope, cursor)
        return render(request, "webhooks.html", context, scope=scope)


@router.post("/orgs/{org_id}/webhooks", response_class=HTMLResponse)
async def create_webhook(request: Request, org_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        form = await checked_form(request)
        if not await first_submission(form):
            return see_other(org_url(org_id, "webhooks"))
        try:
            data = WebhookEndpointCreate.model_validate(
                {
                    "url": form_field(form, "url"),
                    "description": form_field(form, "description"),
                    "event_types": [e for e in form.getlist("event_types") if isinstance(e, str)],
                }
            )
            async with attempt(scope):
                endpoint, secret = await webhooks_service.create_endpoint(scope, data)
        except (ValidationError, Problem) as exc:
            context = await _webhooks_context(scope, None)
            context.update(
                error=validation_message(exc)
                if isinstance(exc, ValidationError)
                else problem_message(exc),
                # The service refuses only the URL (not allowed, not reachable).
                error_field=error_field(exc) or "url",
                form_url=form_field(form, "url"),
            )
            status = exc.status if isinstance(exc, Problem) else 422
            return render(request, "webhooks.html", context, status_code=status, scope=scope)
        context = await _webhooks_context(scope, None)
        context.update(created=endpoint, secret=secret)
        return render(request, "webhooks.html", context, status_code=201, scope=scope)


async def _endpoint_context(
    scope: OrgScope, endpoint_id: uuid.UUID, cursor: str | None
) -> dict[str, Any]:
    endpoint = await webhooks_service.get_endpoint(scope, endpoint_id)
    deliveries, next_cursor = await webhooks_service.list_deliveries(
        scope, endpoint_id, None, cursor, PAGE_SIZE
    )
    return {"endpoint": endpoint, "deliveries": deliveries, "next_cursor": next_cursor}


@router.get("/orgs/{org_id}/webhooks/{endpoint_id}", response_class=HTMLResponse)
async def webhook_page(
    request: Request, org_id: uuid.UUID, endpoint_id: uuid.UUID, cursor: str | None = None
) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        context = await _endpoint_context(scope, endpoint_id, cursor)
        return render(request, "webhook.html", context, scope=scope)


@router.post("/orgs/{org_id}/webhooks/{endpoint_id}/{action}", response_class=HTMLResponse)
async def webhook_action(
    request: Request, org_id: uuid.UUID, endpoint_id: uuid.UUID, action: str
) -> Response:
    """rotate (the new secret shown once), test, enable, disable, delete."""
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        form = await checked_form(request)
        here = org_url(org_id, "webhooks", str(endpoint_id))
        if action == "rotate":
            if not await first_submission(form):
                return see_other(here)
            _, secret = await webhooks_service.rotate_secret(scope, endpoint_id)
            context = await _endpoint_context(scope, endpoint_id, None)
            context["secret"] = secret
            return render(request, "webhook.html", context, scope=scope)
        if action == "test":
            await webhooks_service.send_test(scope, endpoint_id)
        elif action in ("enable", "disable"):
            update = WebhookEndpointUpdate(enabled=action == "enable")
            await webhooks_service.update_endpoint(scope, endpoint_id, update)
        elif action == "delete":
            await webhooks_service.delete_endpoint(scope, endpoint_id)
            return see_other(org_url(org_id, "webhooks"))
        else:
            raise NotFound("No such page.")
        return see_other(here)


@router.post("/orgs/{org_id}/webhook-deliveries/{delivery_id}/redeliver")
async def redeliver(request: Request, org_id: uuid.UUID, delivery_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, webhooks_service.MANAGE_WEBHOOKS) as scope:
        await checked_form(request)
        original = await webhooks_service.get_delivery(scope, delivery_id)
        try:
            async with attempt(scope):
                await webhooks_service.redeliver(scope, delivery_id)
        except Problem as exc:
            context = await _endpoint_context(scope, original.endpoint_id, None)
            context["error"] = problem_message(exc)
            return render(request, "webhook.html", context, status_code=exc.status, scope=scope)
        return see_other(org_url(org_id, "webhooks", str(original.endpoint_id)))


# --- usage and billing -------------------------------------------------------------------

_GROUPS = ("day", "member", "api_key", "operation")


async def _usage_report(
    scope: OrgScope, group_by: str, start: str, end: str
) -> tuple[UsageReport, str]:
    group = group_by if group_by in _GROUPS else "day"
    period = periods.report_period(parse_day(start), parse_day(end), today=today())
    return await usage_service.usage_report(scope.session, group, period), group  # type: ignore[arg-type]


@router.get("/orgs/{org_id}/usage", response_class=HTMLResponse)
async def usage_page(
    request: Request,
    org_id: uuid.UUID,
    group_by: str = "day",
    start: str = "",
    end: str = "",
) -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        try:
            report, group = await _usage_report(scope, group_by, start, end)
        except Problem as exc:
            report, group = await _usage_report(scope, group_by, "", "")
            error: str | None = problem_message(exc)
        else:
            error = None
        query = urlencode({"group_by": group, "start": report.from_, "end": report.to})
        return render(
            request,
            "usage.html",
            {
                "report": report,
                "group": group,
                "groups": _GROUPS,
                "csv_url": org_url(org_id, "usage.csv") + "?" + query,
                "chart": daily_usage_svg(await _daily(scope, CHART_DAYS)),
                "error": error,
            },
            scope=scope,
        )


@router.get("/orgs/{org_id}/usage.csv")
async def usage_csv(
    request: Request, org_id: uuid.UUID, group_by: str = "day", start: str = "", end: str = ""
) -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        report, group = await _usage_report(scope, group_by, start, end)
        filename = f"usage-{scope.org.slug}-{group}-{report.from_}-{report.to}.csv"
        return Response(
            export.render_csv(report),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )


async def _billing_context(scope: OrgScope, month: str) -> dict[str, Any]:
    now = datetime.now(UTC)
    try:
        period = periods.month_period(month or now.strftime("%Y-%m"), today=now.date())
    except Problem:
        period = periods.month_period(now.strftime("%Y-%m"), today=now.date())
    statement = await usage_service.statement(scope.session, scope.org_id, period, now=now)
    plan = await usage_service.org_plan(scope.session, scope.org_id)
    manage = scope.allows(billing_service.MANAGE_BILLING)
    async with async_global_session() as session:
        # Plans are platform data; the same list the operator API shows, buyable ones only.
        plans = [p for p in await admin_service.list_plans(session) if p.stripe_price_id]
        await commit(session)
    return {
        "statement": statement,
        "plan": plan.plan,
        "billing": await billing_service.view(scope) if manage else None,
        "manage": manage,
        "plans": plans,
    }


@router.get("/orgs/{org_id}/billing", response_class=HTMLResponse)
async def billing_page(request: Request, org_id: uuid.UUID, month: str = "") -> Response:
    async with org_page(request, org_id, USAGE_READ) as scope:
        context = await _billing_context(scope, month)
        return render(request, "billing.html", context, scope=scope)


@router.post("/orgs/{org_id}/billing/{action}", response_class=HTMLResponse)
async def billing_action(request: Request, org_id: uuid.UUID, action: str) -> Response:
    """Off to Stripe: Checkout for a plan, or the customer portal."""
    async with org_page(request, org_id, billing_service.MANAGE_BILLING) as scope:
        form = await checked_form(request)
        try:
            async with attempt(scope):
                if action == "checkout":
                    url = (
                        await billing_service.start_checkout(scope, form_field(form, "plan"))
                    ).url
                elif action == "portal":
                    url = (await billing_service.open_portal(scope)).url
                else:
                    raise NotFound("No such page.")
        except Problem as exc:
            if exc.status == 404:
                raise
            context = await _billing_context(scope, "")
            context["error"] = problem_message(exc)
            return render(request, "billing.html", context, status_code=exc.status, scope=scope)
        return see_other(url)


# --- audit log ---------------------------------------------------------------------------


@router.get("/orgs/{org_id}/audit", response_class=HTMLResponse)
async def audit_page(
    request: Request, org_id: uuid.UUID, action: str = "", cursor: str | None = None
) -> Response:
    async with org_page(request, org_id, READ_AUDIT) as scope:
        rows, next_cursor = await tenants_repository.list_audit_events(
            scope.session, cursor, PAGE_SIZE, action[:64] or None
        )
        more = urlencode({"action": action[:64], "cursor": next_cursor}) if next_cursor else None
        return render(
            request, "audit.html", {"events": rows, "action": action, "more": more}, scope=scope
        )
