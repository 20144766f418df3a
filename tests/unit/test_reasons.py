"""One vocabulary of reasons: stable codes, two enums that never share a value."""

from __future__ import annotations

from service.imaging.qc import QcWarning
from service.outcomes import AnatomyReason, SeriesReason


def test_codes_are_their_own_names_and_fit_the_columns() -> None:
    for code in [*SeriesReason, *AnatomyReason, *QcWarning]:
        assert code.value == code.name
        assert len(code.value) <= 64  # series.state_reason, analysis.reason_code: String(64)


def test_the_vocabularies_never_share_a_value() -> None:
    series = {c.value for c in SeriesReason}
    anatomy = {c.value for c in AnatomyReason}
    warnings = {c.value for c in QcWarning}
    assert not series & anatomy and not series & warnings and not anatomy & warnings


def test_the_former_duplicates_are_one_code() -> None:
    names = {c.value for c in SeriesReason}
    assert {"NOT_CT", "NOT_AXIAL", "MIXED_ORIENTATION", "GANTRY_TILT",
            "NO_READABLE_IMAGES"} <= names
    assert not {"NO_CT_IMAGES", "NON_AXIAL", "INCONSISTENT_ORIENTATION",
                "GANTRY_TILT_EXCESSIVE", "NO_READABLE_INSTANCES"} & names


def test_the_gate_and_the_loader_speak_the_vocabulary() -> None:
    from service.imaging import qc
    from service.inference import plausibility
    from service.ingest import rules

    assert plausibility.AnatomyReason is AnatomyReason
    assert rules.SeriesReason is SeriesReason and qc.SeriesReason is SeriesReason
