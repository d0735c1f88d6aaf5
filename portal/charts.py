"""Charts drawn on the server as SVG markup: no script, nothing fetched."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from markupsafe import Markup, escape


@dataclass(frozen=True)
class DayPoint:
    day: date
    gpu_seconds: float
    images: int


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = float(10 ** len(str(int(value))))
    for step in (0.1, 0.2, 0.25, 0.5, 1.0):
        if value <= magnitude * step:
            return magnitude * step
    return magnitude


def daily_usage_svg(points: list[DayPoint], *, width: int = 720, height: int = 220) -> Markup:
    """GPU-seconds per day as bars, images per day as a line on its own scale."""
    left, right, top, bottom = 48, 48, 12, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    n = max(len(points), 1)
    gpu_max = _nice_max(max((p.gpu_seconds for p in points), default=0.0))
    img_max = _nice_max(float(max((p.images for p in points), default=0)))
    slot = plot_w / n
    parts: list[str] = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-labelledby="chart-title" xmlns="http://www.w3.org/2000/svg">',
        '<title id="chart-title">GPU-seconds (bars) and images (line) per day</title>',
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" '
        f'y2="{top + plot_h}"/>',
        f'<text class="tick" x="{left - 6}" y="{top + 10}" text-anchor="end">{gpu_max:g}</text>',
        f'<text class="tick" x="{left - 6}" y="{top + plot_h}" text-anchor="end">0</text>',
        f'<text class="tick img" x="{left + plot_w + 6}" y="{top + 10}">{img_max:g}</text>',
    ]
    line: list[str] = []
    for i, p in enumerate(points):
        x = left + i * slot
        bar_h = plot_h * p.gpu_seconds / gpu_max
        label = escape(f"{p.day.isoformat()}: {p.gpu_seconds:g} GPU-s, {p.images} images")
        parts.append(
            f'<rect class="bar" x="{x + slot * 0.15:.1f}" y="{top + plot_h - bar_h:.1f}" '
            f'width="{slot * 0.7:.1f}" height="{bar_h:.1f}"><title>{label}</title></rect>'
        )
        line.append(f"{x + slot / 2:.1f},{top + plot_h - plot_h * p.images / img_max:.1f}")
        if (len(points) - 1 - i) % 7 == 0:  # weekly, ending on the last day
            parts.append(
                f'<text class="tick" x="{x + slot / 2:.1f}" y="{height - 8}" '
                f'text-anchor="middle">{p.day.strftime("%d %b")}</text>'
            )
    if line:
        parts.append(f'<polyline class="line" points="{" ".join(line)}"/>')
    parts.append("</svg>")
    # Every interpolated value above is a number or escaped text.
    return Markup("".join(parts))  # noqa: S704


def gauge_svg(used: float, limit: float | None, *, width: int = 160) -> Markup:
    """A horizontal bar: the share of a limit used (full and marked when over)."""
    share = 0.0 if not limit else min(used / limit, 1.0)
    state = "over" if limit and used >= limit else ("high" if share >= 0.8 else "ok")
    return Markup(  # noqa: S704 - numbers and a fixed word only
        f'<svg class="gauge {state}" viewBox="0 0 {width} 12" aria-hidden="true" '
        f'xmlns="http://www.w3.org/2000/svg"><rect class="track" width="{width}" height="12" '
        f'rx="3"/><rect class="fill" width="{width * share:.1f}" height="12" rx="3"/></svg>'
    )
