"""Usage reports: totals by day, member, API key, operation or organization; statements.

Every number is summed in SQL over ``usage_daily``: the usage events rolled up per
organization, UTC day, operation, member and API key in the transaction that writes each
event (migration 0018), so a month's report reads at most a few thousand rows whatever the
number of jobs. The session decides what is visible: a tenant session (RLS) sees its own
organization, the operator's ops session sees them all, so the same queries serve tenants
and operators.

Periods are UTC calendar days and include both ends: ``from=2026-01-01&to=2026-01-31`` is
January. GPU-seconds and megapixels are summed as ``numeric`` so totals are exact decimals of
the stored values, whatever the number or order of the events.
"""

from __future__ import annotations

import calendar
import csv
import io
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Select, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from hiddenmodel.errors import Problem
from hiddenmodel.usage import quotas
from hiddenmodel.usage.models import UsageDaily
from hiddenmodel.usage.quantities import GPU_SECONDS_QUANTUM, GpuSeconds, Megapixels, exact
from tenants.models import ApiKey, Organization, User

MAX_PERIOD_DAYS = 366
# The first and last days a period may name; the end bound keeps ``end + 1 day`` representable.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(9998, 12, 31)

Dimension = Literal["day", "member", "api_key", "operation", "org"]
TenantGroupBy = Literal["day", "member", "api_key", "operation"]

# Labels of rows whose subject is absent: a job submitted with an API key has no member, one
# submitted by a signed-in member has no key; the user or key may also have been deleted.
NO_MEMBER = "(no member: an API key made by an operator)"
NO_API_KEY = "(submitted by a signed-in member)"
DELETED = "(deleted)"

# Stripe's zero-decimal currencies: amounts are whole units.
_ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }
)
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class InvalidPeriod(Problem):
    status, kind, title = 422, "invalid-period", "Invalid period"


# --- periods -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Period:
    """Calendar days ``start`` to ``end``, both included, in UTC."""

    start: date
    end: date

    @property
    def starts_at(self) -> datetime:
        return datetime.combine(self.start, time(), UTC)

    @property
    def ends_at(self) -> datetime:
        """The first instant after the period."""
        return datetime.combine(self.end + timedelta(days=1), time(), UTC)

    @property
    def days(self) -> int:
        return (self.end - self.start).days + 1


def _month_end(day: date) -> date:
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def report_period(start: date | None, end: date | None, *, today: date) -> Period:
    """The period a report covers: one calendar month unless both bounds are given.

    With neither bound it is the current month; with one, the month around that bound.
    """
    if start is None and end is None:
        start = today.replace(day=1)
    if start is None:
        assert end is not None
        start = end.replace(day=1)
    if end is None:
        end = _month_end(start)
    for name, day in (("from", start), ("to", end)):
        if not EARLIEST_DAY <= day <= LATEST_DAY:
            raise InvalidPeriod(
                f"`{name}` must lie between {EARLIEST_DAY} and {LATEST_DAY}.", parameter=name
            )
    if start > end:
        raise InvalidPeriod(f"`from` ({start}) is after `to` ({end}).", parameter="from")
    period = Period(start, end)
    if period.days > MAX_PERIOD_DAYS:
        raise InvalidPeriod(
            f"A report covers at most {MAX_PERIOD_DAYS} days; {start} to {end} is {period.days}.",
            parameter="to",
            max_days=MAX_PERIOD_DAYS,
        )
    return period


def month_period(month: str, *, today: date) -> Period:
    """The calendar month named ``YYYY-MM``; months that have not begun are refused."""
    match = _MONTH.match(month)
    if match is None or not 1 <= int(match.group(2)) <= 12:
        raise InvalidPeriod(f"'{month}' is not a month: write it as YYYY-MM.", parameter="month")
    first = date(int(match.group(1)), int(match.group(2)), 1)
    if first < EARLIEST_DAY:
        raise InvalidPeriod(f"There is no usage before {EARLIEST_DAY}.", parameter="month")
    if first > today:
        raise InvalidPeriod(f"{month} has not begun.", parameter="month")
    return Period(first, _month_end(first))


# --- bodies ------------------------------------------------------------------------------


class UsageTotals(BaseModel):
    jobs: int = Field(description="Billable finished jobs")
    gpu_seconds: GpuSeconds = Field(description="To the millisecond")
    images: int
    megapixels: Megapixels = Field(description="To the pixel (six decimals)")


class UsageRow(UsageTotals):
    key: str | None = Field(
        description="The group: a date (YYYY-MM-DD), a user id, an API key id, an operation "
        "or an organization id; null for jobs with no member or no API key"
    )
    label: str = Field(description="What a person reads: date, e-mail, key name, operation")


class UsageReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    group_by: str
    from_: date = Field(alias="from", description="First day, UTC, included")
    to: date = Field(description="Last day, UTC, included")
    rows: list[UsageRow]
    totals: UsageTotals


class StatementPlan(BaseModel):
    code: str
    name: str
    currency: str
    price_per_gpu_second: Decimal
    included_gpu_seconds: Decimal
    included_images: int


class StatementCharges(BaseModel):
    """The estimate, in exact decimals: GPU-seconds beyond the included amount, at the price."""

    gpu_seconds: Decimal
    included_gpu_seconds: Decimal
    billable_gpu_seconds: Decimal
    price_per_gpu_second: Decimal
    images: int
    included_images: int
    images_beyond_included: int
    estimated_charge: Decimal
    currency: str


class Statement(BaseModel):
    organization_id: uuid.UUID
    month: str = Field(description="YYYY-MM")
    period_start: datetime
    period_end: datetime = Field(description="The first instant after the month")
    final: bool = Field(description="False while the month is still running")
    plan: StatementPlan
    totals: UsageTotals
    by_operation: list[UsageRow]
    by_member: list[UsageRow]
    by_api_key: list[UsageRow]
    charges: StatementCharges


# --- SQL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sums:
    jobs: int
    gpu_seconds: Decimal
    images: int
    megapixels: Decimal

    @classmethod
    def of(cls, row: Any) -> Sums:
        return cls(
            jobs=row.jobs,
            gpu_seconds=Decimal(row.gpu_seconds),
            images=row.images,
            megapixels=Decimal(row.megapixels),
        )

    def totals(self) -> UsageTotals:
        return UsageTotals(
            jobs=self.jobs,
            gpu_seconds=float(self.gpu_seconds),
            images=self.images,
            megapixels=float(self.megapixels),
        )


def _sums() -> tuple[Any, ...]:
    # The roll-up's sums are numeric sums of the events' values: exact, in any order.
    return (
        func.coalesce(func.sum(UsageDaily.jobs), 0).label("jobs"),
        func.coalesce(func.sum(UsageDaily.gpu_seconds), 0).label("gpu_seconds"),
        func.coalesce(func.sum(UsageDaily.images), 0).label("images"),
        func.coalesce(func.sum(UsageDaily.megapixels), 0).label("megapixels"),
    )


def _in_period(stmt: Select[Any], period: Period) -> Select[Any]:
    # Periods are whole UTC days, the roll-up's unit: a range of uq_usage_daily_group.
    return stmt.where(UsageDaily.day >= period.start, UsageDaily.day <= period.end)


def _grouped(dimension: Dimension) -> Select[Any]:
    if dimension == "day":
        day = UsageDaily.day
        return (
            select(day.label("key"), literal(None).label("label"), *_sums())
            .group_by(day)
            .order_by(day)
        )
    if dimension == "operation":
        return (
            select(UsageDaily.operation.label("key"), literal(None).label("label"), *_sums())
            .group_by(UsageDaily.operation)
            .order_by(*_largest_first(UsageDaily.operation))
        )
    if dimension == "member":
        users = User.__table__.c
        email = users.email
        return (
            select(UsageDaily.user_id.label("key"), email.label("label"), *_sums())
            .outerjoin(User, users.id == UsageDaily.user_id)
            .group_by(UsageDaily.user_id, email)
            .order_by(*_largest_first(email))
        )
    if dimension == "api_key":
        name = ApiKey.name + " (" + ApiKey.prefix + ")"
        return (
            select(UsageDaily.api_key_id.label("key"), name.label("label"), *_sums())
            .outerjoin(ApiKey, ApiKey.id == UsageDaily.api_key_id)
            .group_by(UsageDaily.api_key_id, ApiKey.name, ApiKey.prefix)
            .order_by(*_largest_first(ApiKey.name))
        )
    return (
        select(UsageDaily.organization_id.label("key"), Organization.slug.label("label"), *_sums())
        .outerjoin(Organization, Organization.id == UsageDaily.organization_id)
        .group_by(UsageDaily.organization_id, Organization.slug)
        .order_by(*_largest_first(Organization.slug))
    )


def _largest_first(tiebreak: Any) -> tuple[Any, ...]:
    return (
        func.sum(UsageDaily.gpu_seconds).desc(),
        func.sum(UsageDaily.jobs).desc(),
        tiebreak.asc().nulls_last(),
    )


def _label(dimension: Dimension, key: Any, label: str | None) -> str:
    if dimension in ("day", "operation"):
        return str(key)
    if label is not None:
        return label
    if key is None:
        return NO_MEMBER if dimension == "member" else NO_API_KEY
    return DELETED


async def grouped_usage(
    session: AsyncSession, dimension: Dimension, period: Period
) -> list[UsageRow]:
    """One row per group with usage in ``period`` (groups without usage are left out)."""
    result = await session.execute(_in_period(_grouped(dimension), period))
    return [
        UsageRow(
            key=None if row.key is None else str(row.key),
            label=_label(dimension, row.key, row.label),
            jobs=row.jobs,
            gpu_seconds=float(row.gpu_seconds),
            images=row.images,
            megapixels=float(row.megapixels),
        )
        for row in result
    ]


async def usage_sums(session: AsyncSession, period: Period) -> Sums:
    """Totals of every visible usage event in ``period``."""
    return Sums.of((await session.execute(_in_period(select(*_sums()), period))).one())


async def usage_sums_by_org(
    session: AsyncSession, org_ids: list[uuid.UUID], period: Period
) -> dict[uuid.UUID, Sums]:
    """Totals per organization, for the ids given (operators' listings)."""
    if not org_ids:
        return {}
    stmt = (
        select(UsageDaily.organization_id, *_sums())
        .where(UsageDaily.organization_id.in_(org_ids))
        .group_by(UsageDaily.organization_id)
    )
    result = await session.execute(_in_period(stmt, period))
    return {row.organization_id: Sums.of(row) for row in result}


# --- services ----------------------------------------------------------------------------


async def usage_report(session: AsyncSession, group_by: Dimension, period: Period) -> UsageReport:
    """Usage in ``period`` grouped by ``group_by``, with totals, as the session may see it."""
    rows = await grouped_usage(session, group_by, period)
    totals = await usage_sums(session, period)
    return UsageReport(
        group_by=group_by, from_=period.start, to=period.end, rows=rows, totals=totals.totals()
    )


def _minor_unit(currency: str) -> Decimal:
    return Decimal(1) if currency.lower() in _ZERO_DECIMAL_CURRENCIES else Decimal("0.01")


def charges(sums: Sums, plan: StatementPlan) -> StatementCharges:
    """GPU-seconds beyond the plan's included amount, priced; GPU-seconds are rounded half
    up to the millisecond (the unit the meter counts), the charge to the currency's minor unit
    once, at the end."""
    gpu_seconds = sums.gpu_seconds.quantize(GPU_SECONDS_QUANTUM, ROUND_HALF_UP)
    billable = max(Decimal(0), gpu_seconds - plan.included_gpu_seconds)
    amount = (billable * plan.price_per_gpu_second).quantize(
        _minor_unit(plan.currency), ROUND_HALF_UP
    )
    return StatementCharges(
        gpu_seconds=gpu_seconds,
        included_gpu_seconds=plan.included_gpu_seconds,
        billable_gpu_seconds=billable,
        price_per_gpu_second=plan.price_per_gpu_second,
        images=sums.images,
        included_images=plan.included_images,
        images_beyond_included=max(0, sums.images - plan.included_images),
        estimated_charge=amount,
        currency=plan.currency,
    )


async def statement(
    session: AsyncSession, org_id: uuid.UUID, period: Period, *, now: datetime
) -> Statement:
    """The month's statement of the bound organization, priced on its current plan.

    Plans keep no history, so a past month is estimated at today's plan and price.
    """
    org_plan = await quotas.org_plan(session)
    plan = StatementPlan(
        code=org_plan.plan.code,
        name=org_plan.plan.name,
        currency=org_plan.plan.currency,
        price_per_gpu_second=org_plan.plan.price_per_gpu_second,
        # A float column: its shortest repr is the value an operator typed, in milliseconds.
        included_gpu_seconds=exact(org_plan.plan.included_gpu_seconds).quantize(
            GPU_SECONDS_QUANTUM, ROUND_HALF_UP
        ),
        included_images=org_plan.plan.included_images,
    )
    sums = await usage_sums(session, period)
    return Statement(
        organization_id=org_id,
        month=period.start.strftime("%Y-%m"),
        period_start=period.starts_at,
        period_end=period.ends_at,
        final=now >= period.ends_at,
        plan=plan,
        totals=sums.totals(),
        by_operation=await grouped_usage(session, "operation", period),
        by_member=await grouped_usage(session, "member", period),
        by_api_key=await grouped_usage(session, "api_key", period),
        charges=charges(sums, plan),
    )


# --- CSV ---------------------------------------------------------------------------------

CSV_COLUMNS = ("key", "label", "jobs", "gpu_seconds", "images", "megapixels")
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection); labels
# are tenant-chosen text (API key names), so such cells are prefixed with an apostrophe.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(text: str | None) -> str:
    if text is None:
        return ""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _number(value: float) -> str:
    # Plain positional notation (no 1e-05), exactly the value the JSON report carries.
    return format(Decimal(repr(value)), "f")


def render_csv(report: UsageReport) -> str:
    """The report's rows as CSV (RFC 4180 quoting, header row, CRLF line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in report.rows:
        writer.writerow(
            (
                _cell(row.key),
                _cell(row.label),
                row.jobs,
                _number(row.gpu_seconds),
                row.images,
                _number(row.megapixels),
            )
        )
    return out.getvalue()
