"""The study page's stage timeline against the 3-8 minute band (pure arithmetic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.db.tables import Analysis, AnalysisState, Series
from service.web.study_view import turnaround

T0 = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
BAND = (180.0, 480.0)


def _series(acquired: datetime | None = T0) -> Series:
    return Series(series_instance_uid="1.2", acquired_at=acquired,
                  first_received_at=T0 + timedelta(seconds=30),
                  last_received_at=T0 + timedelta(seconds=60),
                  completed_at=T0 + timedelta(seconds=65))


def _analysis(flagged_after_s: float | None) -> Analysis:
    done = flagged_after_s is not None
    return Analysis(state=AnalysisState.DONE if done else AnalysisState.RUNNING,
                    queued_at=T0 + timedelta(seconds=66),
                    inferred_at=T0 + timedelta(seconds=90) if done else None,
                    flagged_at=T0 + timedelta(seconds=flagged_after_s) if done else None,
                    results_stored_at=T0 + timedelta(seconds=flagged_after_s + 7) if done
                    else None,
                    finished_at=T0 + timedelta(seconds=flagged_after_s + 7) if done else None)


def test_steps_totals_and_band_verdicts() -> None:
    t = turnaround(_series(), _analysis(100), BAND)
    steps = {s.stage: (s.since_previous_s, s.since_start_s) for s in t.stages}
    assert steps["acquisition"] == (None, 0.0)
    assert steps["received"] == (60.0, 60.0)
    assert steps["queued"] == (1.0, 66.0)
    assert steps["flagged"] == (10.0, 100.0), "the flag follows the analysis"
    assert steps["results_stored"] == (7.0, 107.0), "the SR and SEG follow the flag"
    assert steps["sent"] == (None, None), "no export yet"
    assert [s.stage for s in t.stages].index("flagged") < [s.stage for s in t.stages].index(
        "results_stored")
    # The turnaround ends at the flag, not at the paperwork after it.
    assert (t.total_s, t.from_receipt_s, t.verdict) == (100.0, 70.0, "faster")
    assert turnaround(_series(), _analysis(300), BAND).verdict == "within"
    assert turnaround(_series(), _analysis(481), BAND).verdict == "slower"
    running = turnaround(_series(), _analysis(None), BAND)
    assert running.verdict == "in_progress" and running.total_s == 66.0


def test_without_acquisition_time_the_first_receipt_stands_in() -> None:
    t = turnaround(_series(acquired=None), _analysis(100), BAND)
    assert t.start_is_acquisition is False
    assert t.total_s == 70.0 and t.stages[0].at is None
