"""Chart geometry: values land inside the plot, the band and target where they belong, and
a burst acquired at one instant still gets a readable time axis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.web.charts import histogram, time_series

T = datetime(2026, 12, 3, 18, 30, tzinfo=UTC)
BAND = (180.0, 480.0)


def test_histogram_counts_every_value_once_and_places_band_and_target() -> None:
    values = [30.0, 95.0, 100.0, 240.0, 900.0]
    chart = histogram(values, band_s=BAND, target_s=480.0)
    assert sum(bar.count for bar in chart.bars) == len(values)
    assert all(chart.left <= bar.x and bar.x + bar.w <= chart.right + 1 for bar in chart.bars)
    assert chart.band is not None and chart.target is not None
    assert chart.band.low < chart.band.high == chart.target  # the band ends at the target
    assert not chart.empty and histogram([], band_s=BAND, target_s=480.0).empty


def test_time_series_marks_late_points_and_draws_the_band_as_a_stripe() -> None:
    chart = time_series([(T, 90.0, "a"), (T + timedelta(hours=3), 600.0, "b")],
                        band_s=BAND, target_s=480.0)
    early, late = chart.points
    assert early.x < late.x and early.y > late.y  # later and slower: right and higher
    assert late.late and not early.late
    assert chart.band is not None and chart.band.low < chart.band.high  # y grows downwards
    assert all(chart.left <= t.pos <= chart.right for t in chart.x_ticks)


def test_a_burst_at_one_instant_still_has_time_ticks() -> None:
    chart = time_series([(T, 87.0, "a"), (T, 100.0, "b"), (T, 120.0, "c")], band_s=BAND,
                        target_s=480.0)
    assert len(chart.x_ticks) >= 3
    assert len({round(p.x) for p in chart.points}) == 1
    assert chart.left < chart.points[0].x < chart.right
