"""Chart geometry for server-rendered SVG (the pages' CSP allows no script from elsewhere and
no inline style, so the admin pages draw their charts as SVG with presentation attributes).

These functions only compute coordinates in the SVG's user units; the templates
(``_charts.html``) draw them, so every label passes through Jinja's escaping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 720.0, 240.0
LEFT, RIGHT, TOP, BOTTOM = 52.0, 14.0, 12.0, 34.0
_NICE_SECONDS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)


@dataclass(frozen=True)
class Tick:
    pos: float
    label: str


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    count: int
    label: str


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    late: bool


@dataclass(frozen=True)
class Band:
    """A shaded range (the 3-8 minute reference) in user units along the chart's value axis."""

    low: float
    high: float
    label: str


@dataclass
class Chart:
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    right: float = WIDTH - RIGHT
    top: float = TOP
    bottom: float = HEIGHT - BOTTOM
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    band: Band | None = None
    target: float | None = None
    """Position of the target line along the value axis (x for a histogram, y for a series)."""
    empty: bool = True


def minutes_label(seconds: float) -> str:
    if seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{int(seconds)} s"


def nice_step(span: float, parts: int) -> float:
    """A readable step (5 s ... 1 day) that splits ``span`` seconds into about ``parts``."""
    raw = span / max(parts, 1)
    return float(next((s for s in _NICE_SECONDS if s >= raw), _NICE_SECONDS[-1]))


def histogram(values: Sequence[float], *, band_s: tuple[float, float], target_s: float,
              bins: int = 24) -> Chart:
    """End to end seconds as a histogram on a 0..max axis with the band and target drawn."""
    chart = Chart()
    top_value = max([*values, band_s[1], target_s]) * 1.05
    width = nice_step(top_value, bins)
    n = max(1, math.ceil(top_value / width))
    axis_max = n * width
    counts = [0] * n
    for value in values:
        counts[min(n - 1, max(0, int(value // width)))] += 1
    peak = max(counts) or 1
    plot_w, plot_h = chart.right - chart.left, chart.bottom - chart.top

    def x(seconds: float) -> float:
        return chart.left + plot_w * seconds / axis_max

    for i, count in enumerate(counts):
        if count:
            h = plot_h * count / peak
            chart.bars.append(Bar(x=x(i * width) + 0.5, y=chart.bottom - h,
                                  w=max(plot_w / n - 1.0, 1.0), h=h, count=count,
                                  label=f"{minutes_label(i * width)}\u2013"
                                        f"{minutes_label((i + 1) * width)}: {count}"))
    tick = nice_step(axis_max, 8)
    chart.x_ticks = [Tick(x(s), minutes_label(s))
                     for s in _range(0.0, axis_max + 1e-9, tick)]
    y_step = max(1, math.ceil(peak / 4))
    chart.y_ticks = [Tick(chart.bottom - plot_h * c / peak, str(c))
                     for c in range(0, peak + 1, y_step)]
    chart.band = Band(x(band_s[0]), x(band_s[1]),
                      f"reference {minutes_label(band_s[0])}\u2013{minutes_label(band_s[1])}")
    chart.target = x(target_s)
    chart.empty = not values
    return chart


def time_series(points: Sequence[tuple[datetime, float, str]], *, band_s: tuple[float, float],
                target_s: float) -> Chart:
    """(start, seconds, label) per study over time, with the band as a horizontal stripe."""
    chart = Chart()
    chart.empty = not points
    top_value = max([*(p[1] for p in points), band_s[1], target_s]) * 1.05
    step = nice_step(top_value, 5)
    axis_max = math.ceil(top_value / step) * step
    plot_w, plot_h = chart.right - chart.left, chart.bottom - chart.top

    def y(seconds: float) -> float:
        return chart.bottom - plot_h * min(max(seconds, 0.0), axis_max) / axis_max

    chart.y_ticks = [Tick(y(s), minutes_label(s)) for s in _range(0.0, axis_max + 1e-9, step)]
    chart.band = Band(y(band_s[1]), y(band_s[0]),
                      f"reference {minutes_label(band_s[0])}\u2013{minutes_label(band_s[1])}")
    chart.target = y(target_s)
    if not points:
        return chart
    first = min(p[0] for p in points).timestamp()
    last = max(p[0] for p in points).timestamp()
    if last - first < 60.0:  # a burst acquired together: a minute around it, not a point
        middle = (first + last) / 2
        first, last = middle - 30.0, middle + 30.0
    pad = (last - first) * 0.03
    lo, hi = first - pad, last + pad

    def x(moment: float) -> float:
        return chart.left + plot_w * (moment - lo) / (hi - lo)

    for start, seconds, label in points:
        chart.points.append(Point(x(start.timestamp()), y(seconds), label,
                                  late=seconds > target_s))
    tick = nice_step(hi - lo, 6)
    fmt = ("%H:%M:%S" if hi - lo <= 600 else "%H:%M" if hi - lo <= 86400
           else "%m-%d %H:%M" if hi - lo <= 7 * 86400 else "%Y-%m-%d")
    first_tick = math.ceil(lo / tick) * tick
    chart.x_ticks = [Tick(x(t), datetime.fromtimestamp(t, UTC).strftime(fmt))
                     for t in _range(first_tick, hi, tick)]
    return chart


def _range(start: float, stop: float, step: float) -> list[float]:
    out: list[float] = []
    value = start
    while value < stop and len(out) < 64:
        out.append(value)
        value += step
    return out
