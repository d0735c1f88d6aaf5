"""Usage reports as CSV: the rows of a report, for spreadsheets (API and portal downloads)."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from hiddenmodel.usage.schemas import UsageReport

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
