"""The anatomical plausibility gate, rule by rule, on purpose-built label maps.

Each test starts from a sound adult column (C1..C7 stacked head to foot on a 2.5 mm grid,
bone inside, air outside, sizes inside the published ranges) and breaks one thing.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.inference.plausibility import (
    C1_TO_SKULL_BASE_MM,
    EXTENT_MM,
    AnatomyReason,
    AnatomyReport,
    assess,
    superior_in_grid,
)

SPACING = (2.5, 2.5, 2.5)
BONE = 400
SHAPE = (110, 48, 48)

# (top, bottom) in mm below the column's top; in-plane half-size in mm.
LEVELS: dict[str, tuple[float, float, float]] = {
    "C1": (0.0, 12.5, 12.5),
    "C2": (15.0, 45.0, 10.0),
    "C3": (50.0, 67.5, 8.75),
    "C4": (72.5, 90.0, 8.75),
    "C5": (95.0, 112.5, 8.75),
    "C6": (117.5, 135.0, 8.75),
    "C7": (140.0, 157.5, 10.0),
}
TOP_MM = 200.0
"""z (mm along the grid's first axis, head = larger) of the column's top."""


def _box(labels: np.ndarray, hu: np.ndarray, value: int, top: float, bottom: float,
         half: float, centre_yx: tuple[float, float] = (60.0, 60.0), bone: int = BONE,
         top_mm: float = TOP_MM) -> None:
    z0 = int(round((top_mm - bottom) / SPACING[0]))
    z1 = int(round((top_mm - top) / SPACING[0]))
    y0, y1 = (int(round((centre_yx[0] + s * half) / SPACING[1])) for s in (-1, 1))
    x0, x1 = (int(round((centre_yx[1] + s * half) / SPACING[2])) for s in (-1, 1))
    labels[max(z0, 0):z1, y0:y1, x0:x1] = value
    hu[max(z0, 0):z1, y0:y1, x0:x1] = bone


def column(levels: dict[str, tuple[float, float, float]] | None = None, *,
           shifts: dict[str, tuple[float, float]] | None = None,
           ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, hu) of a column; ``shifts`` moves a level in-plane (mm)."""
    labels = np.zeros(SHAPE, np.uint8)
    hu = np.zeros(SHAPE, np.float32)
    for name, (top, bottom, half) in (levels or LEVELS).items():
        dy, dx = (shifts or {}).get(name, (0.0, 0.0))
        _box(labels, hu, int(name[1]), top, bottom, half, (60.0 + dy, 60.0 + dx))
    return labels, hu


def codes(report: AnatomyReport) -> set[str]:
    return set(report.reason_codes)


def test_a_sound_column_passes_and_every_level_is_vouched_for() -> None:
    labels, hu = column()
    report = assess(labels, labels, hu, SPACING)
    assert report.failures == [], report.reason_codes
    assert [m.level for m in report.levels] == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert all(report.vouched(f"C{i}") for i in range(1, 8))
    c3 = report.levels[2]
    assert c3.extent_mm == pytest.approx(17.5, abs=2.6)
    assert 4000 < c3.volume_mm3 < 8000  # 17.5 mm tall, 17.5-20 mm square on the grid
    assert not report.vouched("T1")


def test_levels_out_of_order_along_the_spine() -> None:
    levels = dict(LEVELS)
    levels["C3"], levels["C5"] = LEVELS["C5"], LEVELS["C3"]
    labels, hu = column(levels)
    report = assess(labels, labels, hu, SPACING)
    assert "LEVELS_OUT_OF_ORDER" in codes(report)
    assert not report.column_ok
    assert not any(report.vouched(f"C{i}") for i in range(1, 8))  # a column rule: none vouched


def test_order_is_read_along_the_spines_own_axis_not_the_image_z_axis() -> None:
    """A neck bent 50 degrees in the image: levels are stacked along a slanted line whose
    every step also goes up in z, but the in-plane offset dominates; the gate follows the
    column, so a sound slanted column passes and a swapped one fails."""
    angle = np.radians(50)
    shifts = {name: (0.0, (i - 3) * 21.0 * np.sin(angle)) for i, name in enumerate(LEVELS)}
    levels = {name: (i * 21.0 * np.cos(angle), i * 21.0 * np.cos(angle) + 12.0, 7.5)
              for i, name in enumerate(LEVELS)}
    labels, hu = column(levels, shifts=shifts)
    sound = assess(labels, labels, hu, SPACING)
    assert "LEVELS_OUT_OF_ORDER" not in codes(sound)
    assert "COLUMN_NOT_CRANIOCAUDAL" not in codes(sound)
    swapped = np.where(labels == 3, 5, np.where(labels == 5, 3, labels)).astype(np.uint8)
    assert "LEVELS_OUT_OF_ORDER" in codes(assess(swapped, swapped, hu, SPACING))


def test_a_level_missing_between_two_in_view_is_a_sequence_gap() -> None:
    labels, hu = column()
    labels[labels == 4] = 0
    report = assess(labels, labels, hu, SPACING)
    assert "LEVEL_SEQUENCE_GAP" in codes(report)


def test_a_second_body_of_comparable_size_fragments_the_level() -> None:
    labels, hu = column()
    raw = labels.copy()
    # A C4-sized second "C4" beside the column (what the cleaned map would drop).
    _box(raw, hu, 4, 72.5, 90.0, 7.5, (60.0, 100.0))
    report = assess(labels, raw, hu, SPACING)
    assert "LEVEL_FRAGMENTED:C4" in codes(report)
    assert report.column_ok and not report.vouched("C4") and report.vouched("C5")
    # A small stray piece is dropped before classification and does not fail the level.
    raw_small = labels.copy()
    _box(raw_small, hu, 4, 80.0, 85.0, 5.0, (60.0, 100.0))
    assert "LEVEL_FRAGMENTED:C4" not in codes(assess(labels, raw_small, hu, SPACING))


def test_extent_out_of_the_adult_range() -> None:
    levels = dict(LEVELS)
    levels["C5"] = (95.0, 95.0 + EXTENT_MM["C5"].high + 20, 8.75)  # type: ignore[operator]
    levels.pop("C6"), levels.pop("C7")
    labels, hu = column(levels)
    report = assess(labels, labels, hu, SPACING)
    assert "LEVEL_EXTENT_OUT_OF_RANGE:C5" in codes(report)
    failure = next(f for f in report.failures if f.level == "C5"
                   and f.code is AnatomyReason.LEVEL_EXTENT_OUT_OF_RANGE)
    assert failure.measured is not None and failure.measured > 40
    assert failure.allowed == [9.0, 40.0] and failure.unit == "mm"
    assert "adult 9-40 mm" in failure.detail


def test_volume_out_of_the_adult_range() -> None:
    levels = dict(LEVELS)
    levels["C6"] = (117.5, 135.0, 2.5)  # a 5 x 5 mm sliver: 0.4 cm3
    labels, hu = column(levels)
    assert "LEVEL_VOLUME_OUT_OF_RANGE:C6" in codes(assess(labels, labels, hu, SPACING))
    levels["C6"] = (117.5, 135.0, 30.0)  # 60 x 60 x 17.5 mm: 63 cm3
    labels, hu = column(levels)
    assert "LEVEL_VOLUME_OUT_OF_RANGE:C6" in codes(assess(labels, labels, hu, SPACING))


def test_neighbours_too_close_and_overlapping() -> None:
    levels = dict(LEVELS)
    levels["C4"] = (45.0, 70.0, 8.75)  # over the whole of C3
    labels = np.zeros(SHAPE, np.uint8)
    hu = np.zeros(SHAPE, np.float32)
    for name, (top, bottom, half) in levels.items():
        # C4 sits beside C3 so both keep their voxels.
        _box(labels, hu, int(name[1]), top, bottom, half,
             (60.0, 60.0 + (8.0 if name == "C4" else 0.0)))
    report = assess(labels, labels, hu, SPACING)
    assert {"LEVELS_OVERLAP:C4", "LEVEL_SPACING_OUT_OF_RANGE:C4"} <= codes(report)


def test_a_break_in_the_column_is_discontinuous() -> None:
    levels = dict(LEVELS)
    levels["C7"] = (175.0, 192.5, 10.0)  # 17.5 mm of nothing below C6
    labels, hu = column(levels)
    report = assess(labels, labels, hu, SPACING)
    assert "COLUMN_DISCONTINUOUS" in codes(report)
    assert not report.column_ok
    labels, hu = column(shifts={"C5": (0.0, 30.0)})  # C5 30 mm to the side
    assert "COLUMN_DISCONTINUOUS" in codes(assess(labels, labels, hu, SPACING))


def test_a_level_without_bone_density() -> None:
    labels, hu = column()
    hu[labels == 3] = 40  # soft tissue
    report = assess(labels, labels, hu, SPACING)
    assert "LEVEL_NOT_BONE:C3" in codes(report)
    assert report.column_ok and not report.vouched("C3")


def _skull(hu: np.ndarray, base_mm_above_c1: float) -> None:
    """A slab of unlabelled bone around the column from the given height above C1 up."""
    z0 = int(round((TOP_MM + base_mm_above_c1) / SPACING[0]))
    hu[z0:, 8:40, 8:40] = 700


def test_c1_under_the_skull_base() -> None:
    labels, hu = column()
    _skull(hu, 5.0)
    report = assess(labels, labels, hu, SPACING)
    assert report.skull_base_mm is not None
    assert report.failures == [], report.reason_codes
    labels, hu = column()
    _skull(hu, C1_TO_SKULL_BASE_MM.high + 15)  # type: ignore[operator]
    assert "C1_NOT_UNDER_SKULL_BASE" in codes(assess(labels, labels, hu, SPACING))


def test_a_shifted_count_under_the_skull_base() -> None:
    """The top two levels unlabelled and the rest relabelled one up: "C1" sits where C3 is,
    40 mm under the skull base; and a top level that is not C1 right under the skull."""
    labels, hu = column()
    _skull(hu, 5.0)
    shifted = np.where(labels >= 3, labels - 2, 0).astype(np.uint8)
    assert "C1_NOT_UNDER_SKULL_BASE" in codes(assess(shifted, shifted, hu, SPACING))
    no_c1 = np.where(labels == 1, 0, labels).astype(np.uint8)
    report = assess(no_c1, no_c1, hu, SPACING)
    assert "C1_NOT_UNDER_SKULL_BASE" in codes(report)
    assert "C2 lies right under the skull base" in report.failures[-1].detail


def test_without_the_skull_in_view_the_skull_rule_does_not_apply() -> None:
    levels = {k: v for k, v in LEVELS.items() if k not in ("C1", "C2")}
    labels, hu = column(levels)  # a scan starting at C3: no skull, no C1
    report = assess(labels, labels, hu, SPACING)
    assert report.skull_base_mm is None and report.failures == []


def test_a_level_cut_by_the_scan_edge_is_not_held_to_the_lower_bounds() -> None:
    labels, hu = column()
    # The scan ends 5 mm into C7: 5 mm of C7 left, touching the edge.
    cut = int(round((TOP_MM - 145.0) / SPACING[0]))
    labels, hu = labels[cut:], hu[cut:]
    report = assess(labels, labels, hu, SPACING)
    c7 = next(m for m in report.levels if m.level == "C7")
    assert c7.cut and c7.extent_mm < 9.0
    assert report.failures == [], report.reason_codes


def test_superior_follows_the_affine() -> None:
    # z index increasing towards the feet (a series sorted head first).
    affine = np.array([[0, 0, 0.5, 0], [0, 0.5, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(superior_in_grid(affine), [-1.0, 0.0, 0.0])
    labels, hu = column()
    flipped_labels, flipped_hu = labels[::-1].copy(), hu[::-1].copy()
    assert assess(flipped_labels, flipped_labels, flipped_hu, SPACING,
                  superior_in_grid(affine)).failures == []
    assert "LEVELS_OUT_OF_ORDER" in codes(assess(flipped_labels, flipped_labels, flipped_hu,
                                                 SPACING))


def test_report_as_stored() -> None:
    labels, hu = column()
    hu[labels == 3] = 40
    stored = assess(labels, labels, hu, SPACING).as_dict()
    assert stored["passed"] is False and stored["column_ok"] is True
    (failure,) = stored["failures"]  # type: ignore[misc]
    assert failure["code"] == "LEVEL_NOT_BONE" and failure["level"] == "C3"
    assert failure["allowed"] == [0.3, None] and failure["unit"] == "fraction"


def test_the_docs_hold_the_rules_as_the_code_has_them() -> None:
    from pathlib import Path

    from service.inference.plausibility import rules_markdown

    page = Path(__file__).resolve().parents[3] / "docs" / "anatomy-gate.md"
    assert rules_markdown() in page.read_text(), \
        "regenerate the table: python -m service.inference.plausibility"
