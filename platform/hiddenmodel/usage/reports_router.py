"""HTTP of usage reports: grouped usage as JSON or CSV, and monthly statements.

Each report answers for an API key holding ``usage:read`` (in the key's organization) and for
members whose role may read usage (``/v1/orgs/{org_id}/…``).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response

from hiddenmodel.usage import export, periods, service
from hiddenmodel.usage.schemas import Statement, TenantGroupBy, UsageReport
from tenants.auth import KeyUsageRead, OrgScope, UsageRead

router = APIRouter(prefix="/v1", tags=["usage"])

CSV_MEDIA_TYPE = "text/csv"

GroupByQuery = Annotated[
    TenantGroupBy, Query(description="One row per day (UTC), member, API key or operation.")
]
FromQuery = Annotated[
    date | None,
    Query(
        alias="from",
        description="First day (UTC), included. Default: the first day of the month of `to`, "
        "or of the current month.",
    ),
]
ToQuery = Annotated[
    date | None,
    Query(
        description="Last day (UTC), included. Default: the last day of the month of `from`, "
        f"or of the current month. At most {periods.MAX_PERIOD_DAYS} days from `from`."
    ),
]
MonthPath = Annotated[str, Path(description="The month, YYYY-MM (UTC)", examples=["2026-01"])]

_CSV_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            CSV_MEDIA_TYPE: {
                "schema": {"type": "string"},
                "example": "key,label,jobs,gpu_seconds,images,megapixels\r\n"
                "resize,resize,12,0.0,12,3.1\r\n",
            }
        },
        "description": "The report's rows as CSV, with a header row",
    }
}
_NEGOTIATED_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {CSV_MEDIA_TYPE: {"schema": {"type": "string"}}},
        "description": "JSON, or CSV when `Accept` prefers `text/csv`",
    }
}


def _prefers_csv(accept: str | None) -> bool:
    """True when ``Accept`` ranks text/csv above application/json (JSON wins ties)."""
    ranks = {CSV_MEDIA_TYPE: 0.0, "application/json": 0.0}
    for part in (accept or "").split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        if media.lower() not in ranks:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        ranks[media.lower()] = max(ranks[media.lower()], q)
    return ranks[CSV_MEDIA_TYPE] > ranks["application/json"]


def _today() -> date:
    return datetime.now(UTC).date()


async def _report(
    scope: OrgScope, group_by: TenantGroupBy, start: date | None, end: date | None
) -> UsageReport:
    period = periods.report_period(start, end, today=_today())
    return await service.usage_report(scope.session, group_by, period)


def _csv(scope: OrgScope, report: UsageReport) -> Response:
    filename = f"usage-{scope.org.slug}-{report.group_by}-{report.from_}-{report.to}.csv"
    return Response(
        export.render_csv(report),
        media_type=f"{CSV_MEDIA_TYPE}; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Vary": "Accept"},
    )


async def _negotiated(
    request: Request,
    response: Response,
    scope: OrgScope,
    group_by: TenantGroupBy,
    start: date | None,
    end: date | None,
) -> UsageReport | Response:
    report = await _report(scope, group_by, start, end)
    if _prefers_csv(request.headers.get("accept")):
        return _csv(scope, report)
    response.headers["Vary"] = "Accept"
    return report


@router.get(
    "/usage",
    operation_id="getUsageReport",
    response_model=UsageReport,
    responses=_NEGOTIATED_RESPONSE,
)
async def get_usage(
    request: Request,
    response: Response,
    scope: KeyUsageRead,
    group_by: GroupByQuery = "day",
    start: FromQuery = None,
    to: ToQuery = None,
) -> UsageReport | Response:
    """This API key's organization's usage in a period, grouped, with totals."""
    return await _negotiated(request, response, scope, group_by, start, to)


@router.get(
    "/usage.csv",
    operation_id="getUsageReportCsv",
    response_class=Response,
    responses=_CSV_RESPONSE,
)
async def get_usage_csv(
    scope: KeyUsageRead,
    group_by: GroupByQuery = "day",
    start: FromQuery = None,
    to: ToQuery = None,
) -> Response:
    """The same report as a CSV attachment."""
    return _csv(scope, await _report(scope, group_by, start, to))


@router.get(
    "/orgs/{org_id}/usage",
    operation_id="getOrgUsageReport",
    response_model=UsageReport,
    responses=_NEGOTIATED_RESPONSE,
)
async def get_org_usage(
    request: Request,
    response: Response,
    scope: UsageRead,
    group_by: GroupByQuery = "day",
    start: FromQuery = None,
    to: ToQuery = None,
) -> UsageReport | Response:
    """The organization's usage in a period, grouped, with totals (owner, admin, billing)."""
    return await _negotiated(request, response, scope, group_by, start, to)


@router.get(
    "/orgs/{org_id}/usage.csv",
    operation_id="getOrgUsageReportCsv",
    response_class=Response,
    responses=_CSV_RESPONSE,
)
async def get_org_usage_csv(
    scope: UsageRead,
    group_by: GroupByQuery = "day",
    start: FromQuery = None,
    to: ToQuery = None,
) -> Response:
    """The same report as a CSV attachment."""
    return _csv(scope, await _report(scope, group_by, start, to))


async def _statement(scope: OrgScope, month: str) -> Statement:
    now = datetime.now(UTC)
    period = periods.month_period(month, today=now.date())
    return await service.statement(scope.session, scope.org_id, period, now=now)


@router.get("/usage/statements/{month}", operation_id="getUsageStatement", response_model=Statement)
async def get_statement(month: MonthPath, scope: KeyUsageRead) -> Statement:
    """The month's statement of this API key's organization: plan, usage, estimated charge."""
    return await _statement(scope, month)


@router.get(
    "/orgs/{org_id}/usage/statements/{month}",
    operation_id="getOrgUsageStatement",
    response_model=Statement,
)
async def get_org_statement(month: MonthPath, scope: UsageRead) -> Statement:
    """The organization's statement for a month: plan, included amounts, usage per operation
    and member, GPU-seconds beyond the included amount and the estimated charge."""
    return await _statement(scope, month)
