"""Turnaround arithmetic on fixed timelines: stages, end to end, percentiles, breaches and the
stage that ate the time, studies in flight and missing acquisition times, filters."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pytest

from service.web.turnaround import (
    CSV_COLUMNS,
    STAGES,
    AcquisitionSource,
    Filters,
    Status,
    StudyTimes,
    csv_row,
    percentile,
    study_turnaround,
    summarize,
)

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)
TARGET = 480.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def timeline(uid: str, offsets: dict[str, float], **extra: object) -> StudyTimes:
    """A study whose milestones are ``offsets`` seconds after T0; first receipt = received
    unless given."""
    times = {k: at(v) for k, v in offsets.items()}
    times.setdefault("first_received", times.get("received", T0))
    return StudyTimes(study_instance_uid=uid, **times, **extra)  # type: ignore[arg-type]


FAST = timeline("1.fast", {"acquired": 0, "received": 60, "complete": 70, "queued": 71,
                           "analyzed": 101, "flagged": 102, "stored": 110, "sent": 118},
                calling_aes=("CT1",), priority="ROUTINE", model_version="1.5.0")
SLOW = timeline("2.slow", {"acquired": 0, "received": 100, "complete": 130, "queued": 131,
                           "analyzed": 600, "flagged": 601, "stored": 640},
                calling_aes=("CT2",), priority="STAT", model_version="1.5.0")
NO_ACQ = timeline("3.noacq", {"first_received": 0, "received": 20, "complete": 25,
                              "queued": 26, "analyzed": 56, "flagged": 57},
                  calling_aes=("CT1",), priority="ROUTINE", model_version="1.4.0")
LATE_IN_FLIGHT = timeline("4.stuck", {"acquired": 0, "received": 30, "complete": 35,
                                      "queued": 36}, calling_aes=("CT1",), priority="PENDING")
FRESH_IN_FLIGHT = timeline("5.fresh", {"acquired": 550, "received": 580},
                           calling_aes=("CT1",), priority="PENDING")
FAILED = timeline("6.failed", {"acquired": 0, "received": 40, "complete": 45, "queued": 46},
                  ended_unflagged=True, calling_aes=("CT1",), priority="PENDING",
                  model_version="1.5.0")
SKEWED = timeline("7.skew", {"acquired": 3600, "received": 60, "complete": 65, "queued": 66,
                             "analyzed": 96, "flagged": 97}, calling_aes=("CT1",),
                  priority="ROUTINE", model_version="1.5.0")
STUDY_START = timeline("8.studystart", {"acquired": 0, "received": 200, "complete": 205,
                                        "queued": 206, "analyzed": 236, "flagged": 237},
                       acquisition_source=AcquisitionSource.STUDY_START, calling_aes=("CT1",),
                       priority="ROUTINE", model_version="1.5.0")
ALL = (FAST, SLOW, NO_ACQ, LATE_IN_FLIGHT, FRESH_IN_FLIGHT, FAILED, SKEWED, STUDY_START)
NOW = at(600)


def test_stages_of_a_complete_timeline_and_their_sum() -> None:
    fast = study_turnaround(FAST, target_s=TARGET, now=NOW)
    assert fast.status is Status.FLAGGED
    assert fast.stages == {"received": 60, "complete": 10, "queued": 1, "analyzed": 30,
                           "flagged": 1, "stored": 9, "sent": 8}
    assert fast.end_to_end_s == 102 and fast.from_receipt_s == 42
    # The five stages on the path to the flag add up to the end to end time; the SR/SEG
    # stages after the flag do not count in it.
    assert sum(fast.stages[s.key] or 0 for s in STAGES if s.to_flag) == fast.end_to_end_s
    assert not fast.breach and fast.slowest_stage == "received"


def test_breach_names_the_stage_that_ate_the_time() -> None:
    slow = study_turnaround(SLOW, target_s=TARGET, now=NOW)
    assert slow.end_to_end_s == 601 and slow.breach
    assert slow.slowest_stage == "analyzed" and slow.stages["analyzed"] == 469
    assert slow.stages["sent"] is None  # not sent yet: unmeasured, not zero


def test_missing_acquisition_is_judged_from_receipt_and_kept_out_of_end_to_end() -> None:
    study = study_turnaround(NO_ACQ, target_s=TARGET, now=NOW)
    assert study.acquisition is AcquisitionSource.MISSING
    assert study.end_to_end_s is None and study.stages["received"] is None
    assert study.from_receipt_s == 57 and study.judged_s == 57
    assert study.stages["analyzed"] == 30


def test_acquisition_after_receipt_is_not_an_acquisition_time() -> None:
    study = study_turnaround(SKEWED, target_s=TARGET, now=NOW)
    assert study.acquisition is AcquisitionSource.AFTER_RECEIPT
    assert study.end_to_end_s is None and study.stages["received"] is None  # never negative


def test_in_flight_studies() -> None:
    stuck = study_turnaround(LATE_IN_FLIGHT, target_s=TARGET, now=NOW)
    assert stuck.status is Status.IN_FLIGHT and stuck.end_to_end_s is None
    assert stuck.judged_s == 600 and stuck.breach and stuck.slowest_stage == "analyzed"
    fresh = study_turnaround(FRESH_IN_FLIGHT, target_s=TARGET, now=NOW)
    assert fresh.judged_s == 50 and not fresh.breach and fresh.slowest_stage == "complete"
    failed = study_turnaround(FAILED, target_s=TARGET, now=NOW)
    assert failed.status is Status.NOT_FLAGGED and not failed.breach


def test_summary_counts_apart_and_percentiles_only_over_measured_flags() -> None:
    summary = summarize(ALL, target_s=TARGET, now=NOW)
    c = summary.counts
    assert (c["studies"], c["flagged"], c["in_flight"], c["not_flagged"]) == (8, 5, 2, 1)
    assert c["missing_acquisition"] == 1 and c["acquisition_after_receipt"] == 1
    assert c["acquisition_from_study_start"] == 1
    # End to end over FAST, SLOW, STUDY_START only (102, 601, 237).
    assert summary.end_to_end.count == 3
    assert summary.end_to_end.p50_s == 237
    assert summary.end_to_end.p90_s == pytest.approx(237 + 0.8 * (601 - 237))
    assert summary.end_to_end.p99_s == pytest.approx(237 + 0.98 * (601 - 237))
    # Receipt -> flag over every flagged study (5).
    assert summary.from_receipt.count == 5
    # A stage counts wherever both its ends are known, in flight included (queued: FAST 1,
    # SLOW 1, NO_ACQ 1, LATE 1, FAILED 1, SKEWED 1, STUDY_START 1).
    assert summary.stages["queued"].count == 7 and summary.stages["queued"].p50_s == 1
    assert summary.stages["received"].count == 6  # the two without an acquisition time out
    assert summary.stages["sent"].count == 1
    assert [b.times.study_instance_uid for b in summary.breaches] == ["2.slow", "4.stuck"]
    assert c["breaches"] == 2 and c["in_flight_over_target"] == 1


def test_target_is_a_parameter() -> None:
    summary = summarize(ALL, target_s=200, now=NOW)
    assert [b.times.study_instance_uid for b in summary.breaches] == [
        "2.slow", "4.stuck", "8.studystart"]


@pytest.mark.parametrize(("filters", "expected"), [
    (Filters(calling_ae="CT2"), {"2.slow"}),
    (Filters(priority="STAT"), {"2.slow"}),
    (Filters(model_version="1.4.0"), {"3.noacq"}),
    (Filters(date_from=date(2026, 12, 2)), set()),
    (Filters(date_to=date(2026, 11, 30)), set()),
    (Filters(date_from=date(2026, 12, 1), date_to=date(2026, 12, 1), calling_ae="CT1",
             priority="ROUTINE", model_version="1.5.0"), {"1.fast", "7.skew", "8.studystart"}),
])
def test_filters(filters: Filters, expected: set[str]) -> None:
    summary = summarize(ALL, target_s=TARGET, now=NOW, filters=filters)
    assert {s.times.study_instance_uid for s in summary.studies} == expected


def test_filter_window_is_utc_days_inclusive() -> None:
    start, end = Filters(date_from=date(2026, 12, 1), date_to=date(2026, 12, 3)).window()
    assert start == datetime(2026, 12, 1, tzinfo=UTC) and end == datetime(2026, 12, 4, tzinfo=UTC)


def test_percentile_matches_numpy_and_handles_small_samples() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    rng = random.Random(19)
    for n in (2, 3, 10, 101, 1000):
        values = [rng.expovariate(1 / 240) for _ in range(n)]
        for q in (50, 90, 99):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_csv_row_has_every_column() -> None:
    summary = summarize(ALL, target_s=TARGET, now=NOW)
    rows = {s.times.study_instance_uid: dict(zip(CSV_COLUMNS, csv_row(s), strict=True))
            for s in summary.studies}
    assert rows["2.slow"]["end_to_end_s"] == "601.000" and rows["2.slow"]["breach"] == "yes"
    assert rows["2.slow"]["slowest_stage"] == "analyzed"
    assert rows["3.noacq"]["acquisition_source"] == "missing"
    assert rows["3.noacq"]["end_to_end_s"] == "" and rows["3.noacq"]["from_receipt_s"] == "57.000"
    assert rows["1.fast"]["acquired_at"] == T0.isoformat()


def test_csv_text_cells_cannot_become_formulas() -> None:
    hostile = StudyTimes(study_instance_uid="1.2.3", calling_aes=("=HYPERLINK(1)",),
                         model_version="@x", first_received=T0, received=T0)
    row = dict(zip(CSV_COLUMNS, csv_row(study_turnaround(hostile, target_s=TARGET, now=NOW)),
                   strict=True))
    assert row["calling_aes"] == "'=HYPERLINK(1)" and row["model_version"] == "'@x"
    assert row["study_instance_uid"] == "1.2.3"
