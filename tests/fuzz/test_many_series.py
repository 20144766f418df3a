"""Many one-slice series (issue 20 says 10 000; ``bench.fuzz --series 10000`` runs that many,
CI runs a few hundred): every one is recorded, each ends NOT_ANALYZABLE with
TOO_FEW_SLICES at qualification (no analysis created, nothing queued), in bounded memory."""

from __future__ import annotations

from pathlib import Path

from harness.fuzz import run_one_slice_series

COUNT = 300


def test_one_slice_series_are_recorded_and_refused_not_queued(tmp_path: Path) -> None:
    report = run_one_slice_series(COUNT, tmp_path)
    assert report.recorded == COUNT
    assert report.outcomes == {"NOT_ANALYZABLE:TOO_FEW_SLICES": COUNT}
    assert report.analyses == 0 and report.queued == 0
    assert report.peak_traced_mb < 64, report
