"""Periods of usage: quota months and report periods, in UTC, in one place.

Quota counters count per calendar month (``period`` is its first day) and reset at the first
instant of the next; stored bytes count over the whole life of an organization (the
:data:`LIFETIME` period). Reports cover whole UTC calendar days and include both ends:
``from=2026-01-01&to=2026-01-31`` is January.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from hiddenmodel.errors import Problem

# The period of counters that never reset (stored bytes).
LIFETIME = date(1970, 1, 1)
MAX_PERIOD_DAYS = 366
# The first and last days a period may name; the end bound keeps ``end + 1 day`` representable.
EARLIEST_DAY = date(2000, 1, 1)
LATEST_DAY = date(9998, 12, 31)

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class InvalidPeriod(Problem):
    status, kind, title = 422, "invalid-period", "Invalid period"


# --- quota months --------------------------------------------------------------------------


def period_of(now: datetime) -> date:
    """The quota month ``now`` falls in, as its first day."""
    return date(now.year, now.month, 1)


def period_start(period: date) -> datetime:
    """The first instant of the quota month ``period``."""
    return datetime(period.year, period.month, 1, tzinfo=UTC)


def resets_at(period: date) -> datetime:
    """The first instant after the quota month ``period``: when its counters reset."""
    year, month = (period.year + 1, 1) if period.month == 12 else (period.year, period.month + 1)
    return datetime(year, month, 1, tzinfo=UTC)


# --- report periods ------------------------------------------------------------------------


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
