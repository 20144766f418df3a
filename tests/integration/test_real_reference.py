"""The level reference of the real scans (``service/evaluation/real_reference.json``).

The scans themselves are not in the repository: they live in ``../shared/data`` beside the
checkout (or where ``TEST_REAL_DATA_DIR`` points). The tests that need their pixels skip,
naming that path, when it is absent; the checks of the reference's own geometry always run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.config import Settings
from service.evaluation.levels import load_reference, pixel_sha256, reference_for
from service.evaluation.scans import find_scans, load_scan

DATA_DIR = Path(os.environ.get(
    "TEST_REAL_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
MIN_SPACING_MM, MAX_SPACING_MM = 12.0, 40.0
"""Distance between the centres of neighbouring levels, cervical to lumbar."""

REFERENCE = load_reference()
ENTRIES = sorted(REFERENCE["scans"].items(), key=lambda item: item[1]["name"])


def _scans() -> list[tuple[str, list[Path]]]:
    scans = find_scans(DATA_DIR)
    if not scans:
        pytest.skip(f"real scans not found under {DATA_DIR} (set TEST_REAL_DATA_DIR)")
    return scans


def test_every_real_scan_on_disk_has_an_entry_with_its_pixel_hash() -> None:
    seen = set()
    for name, paths in _scans():
        volume = load_scan(paths, Settings())
        entry = reference_for(volume, REFERENCE)  # raises on a missing entry or other pixels
        assert entry["name"] == name
        assert entry["pixel_sha256"] == pixel_sha256(volume.hu)
        assert list(volume.shape) == entry["shape_zyx"]
        z = volume.index_to_lps(np.array([[0, 0, 0], [volume.shape[0] - 1, 0, 0]]))[:, 2]
        assert sorted(z.tolist()) == pytest.approx(entry["slice_z_range_mm"])
        # Every level read lies inside the scan (up to half a slice beyond the outer slices).
        half = volume.spacing[0] / 2 + 0.01
        for level in entry["levels"]:
            for key in ("centre_lps", "superior_endplate_lps", "inferior_endplate_lps"):
                index = volume.lps_to_index(np.array(level[key]))
                assert -half <= index[0] * volume.spacing[0] <= (
                    volume.shape[0] - 1) * volume.spacing[0] + half, (name, level["name"], key)
                assert 0 <= index[1] < volume.shape[1] and 0 <= index[2] < volume.shape[2]
        seen.add(volume.series_instance_uid)
    assert seen == set(REFERENCE["scans"])


@pytest.mark.parametrize(("uid", "entry"), ENTRIES, ids=[e["name"] for _, e in ENTRIES])
def test_levels_are_ordered_and_spaced_like_vertebrae(uid: str, entry: dict[str, Any]) -> None:
    from service.evaluation.levels import SPINE_ORDER

    levels = entry["levels"]
    names = [level["name"] for level in levels]
    order = [SPINE_ORDER.index(n) for n in names]
    assert order == list(range(order[0], order[0] + len(order))), "levels must be contiguous"
    for level in levels:
        top, centre, bottom = (level[k][2] for k in (
            "superior_endplate_lps", "centre_lps", "inferior_endplate_lps"))
        assert top > centre > bottom, level["name"]
        assert level["confidence"] in ("high", "moderate", "low")
    cut = [level["cut"] for level in levels]
    assert all(c in (None, "top") for c in cut[:2]) and all(c in (None, "bottom") for c in cut[-2:])
    assert all(c is None for c in cut[2:-2])
    for upper, lower in zip(levels, levels[1:], strict=False):
        assert upper["centre_lps"][2] > lower["centre_lps"][2]
        if upper["name"] != "C1":  # the dens (C2's superior point) rises into the atlas
            assert upper["inferior_endplate_lps"][2] > lower["superior_endplate_lps"][2]
        if upper["cut"] or lower["cut"]:
            continue  # a level cut by the scan's edge has no full centre to space
        spacing = float(np.linalg.norm(np.subtract(upper["centre_lps"], lower["centre_lps"])))
        assert MIN_SPACING_MM <= spacing <= MAX_SPACING_MM, (upper["name"], lower["name"])
