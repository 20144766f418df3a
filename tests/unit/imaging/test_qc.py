"""Reason and warning codes are stable strings; the cervical-spine check."""

from __future__ import annotations

import pytest

from service.findings import VERTEBRAE
from service.imaging.qc import (
    QcWarning,
    VolumeError,
    check_cervical_spine,
)
from service.outcomes import SeriesReason


def test_codes_are_their_own_names_and_fit_the_database_column() -> None:
    for code in [*SeriesReason, *QcWarning]:
        assert code.value == code.name
        assert len(code.value) <= 64  # Series.state_reason is String(64)
    assert not {c.value for c in SeriesReason} & {c.value for c in QcWarning}


def test_the_issue_codes_exist() -> None:
    # The dashboard and the worker refer to these by value: renaming one is a breaking change.
    for name in ("MISSING_SLICES", "MIXED_ORIENTATION", "INCONSISTENT_PIXEL_SPACING",
                 "INCONSISTENT_MATRIX", "GANTRY_TILT", "TOO_FEW_SLICES", "NOT_AXIAL",
                 "NO_CERVICAL_SPINE", "UNDECODABLE_PIXEL_DATA"):
        assert SeriesReason(name).value == name
    for name in ("GANTRY_TILT_RESAMPLED", "POSITIONS_FROM_SLICE_LOCATION",
                 "DUPLICATE_SLICES_DROPPED"):
        assert QcWarning(name).value == name


def test_cervical_spine_check() -> None:
    check_cervical_spine(["C2", "C3", "C4"])
    check_cervical_spine(VERTEBRAE)
    with pytest.raises(VolumeError) as info:
        check_cervical_spine(["C7", "T1", "T2", "T3"])
    assert info.value.reason is SeriesReason.TOO_LITTLE_CERVICAL_SPINE
    assert "1 cervical vertebra(e) in view (C7)" in info.value.detail
    with pytest.raises(VolumeError) as info:
        check_cervical_spine([], skull_base_in_view=True)
    assert info.value.reason is SeriesReason.NO_CERVICAL_SPINE
    assert "skull base is in view" in info.value.detail
    check_cervical_spine(["C1"], min_vertebrae=1)
    with pytest.raises(ValueError):
        check_cervical_spine(["C1"], min_vertebrae=0)
