"""Level identification against a reference: purpose-built label maps on a small grid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.evaluation import levels as lv
from service.evaluation.cli import cmd_evaluate_real, register_real
from service.evaluation.real import ScanResult, render_markdown, summarize
from service.evaluation.scans import find_scans
from service.findings import VERTEBRAE, Findings
from service.imaging.volume import Volume

SPACING = (2.0, 1.0, 1.0)
ORIGIN = np.array([10.0, -50.0, -100.0])
"""LPS of voxel (0, 0, 0)."""
STEP = 10
"""Slices per level: 20 mm between level centres."""
SHAPE = (len(VERTEBRAE) * STEP + 4, 48, 32)


def _affine() -> np.ndarray:
    """(z, y, x, 1) -> LPS: x and y along the columns and rows, z index = patient superior
    decreasing (index 0 at the top), as in a head-first stack sorted the other way."""
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, SPACING[2]], [0.0, SPACING[1], 0.0], [-SPACING[0], 0.0, 0.0]]
    affine[:3, 3] = ORIGIN
    return affine


AFFINE = _affine()


def _to_lps(index: np.ndarray) -> np.ndarray:
    return np.asarray(index, dtype=np.float64) @ AFFINE[:3, :3].T + AFFINE[:3, 3]


def _level_box(k: int) -> tuple[slice, slice, slice, slice, slice, slice]:
    """Body (front, y 8..17) and posterior elements (y 24..39, narrower) of level ``k``."""
    z = slice(2 + k * STEP + 1, 2 + (k + 1) * STEP - 1)
    return z, slice(8, 18), slice(8, 24), z, slice(24, 40), slice(13, 19)


def _body_centre(k: int) -> np.ndarray:
    z, y, x, *_ = _level_box(k)
    index = np.array([(z.start + z.stop - 1) / 2, (y.start + y.stop - 1) / 2,
                      (x.start + x.stop - 1) / 2])
    return _to_lps(index)


def _mass_centre(k: int) -> np.ndarray:
    zb, yb, xb, zp, yp, xp = _level_box(k)
    grid = np.zeros(SHAPE, dtype=bool)
    grid[zb, yb, xb] = True
    grid[zp, yp, xp] = True
    return np.asarray(_to_lps(np.argwhere(grid)).mean(axis=0))


def _label_map(order: list[str | None]) -> np.ndarray:
    """Level slot k (from the top) carries the label named ``order[k]`` (None: nothing)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    for k, name in enumerate(order):
        if name is None:
            continue
        zb, yb, xb, zp, yp, xp = _level_box(k)
        value = VERTEBRAE.index(name) + 1
        labels[zb, yb, xb] = value
        labels[zp, yp, xp] = value
    return labels


def _reference(names: tuple[str, ...] = VERTEBRAE) -> list[dict[str, Any]]:
    out = []
    for k, name in enumerate(names):
        # C1 has no body: its reference centre is the centre of the ring (its whole mask).
        centre = _mass_centre(k) if name == "C1" else _body_centre(k)
        out.append({"name": name, "centre_lps": centre.tolist(),
                    "superior_endplate_lps": (centre + [0, 0, 8]).tolist(),
                    "inferior_endplate_lps": (centre - [0, 0, 8]).tolist(), "cut": None})
    return out


def _volume(uid: str = "1.2.3.4", seed: int = 0) -> Volume:
    hu = np.random.default_rng(seed).integers(-1000, 1500, SHAPE).astype(np.int16)
    return Volume(hu=hu, spacing=SPACING, affine=AFFINE, sop_instance_uids=[],
                  frame_numbers=[], headers=[], study_instance_uid="1.2",
                  series_instance_uid=uid, frame_of_reference_uid=None, acquired_at=None)


def _findings(labels: np.ndarray | None, uid: str = "1.2.3.4") -> Findings:
    return Findings(series_instance_uid=uid, model_name="m", model_version="0",
                    vertebrae=[], patient_probability=0.1, patient_suspected=False,
                    vertebra_threshold=0.5, patient_threshold=0.5, label_map=labels)


def _outcomes(results: list[lv.LevelResult]) -> dict[str, str]:
    return {r.name: r.outcome for r in results}


# --------------------------------------------------------------------------- centres


def test_body_centre_is_the_front_part_and_mass_centre_the_whole_mask() -> None:
    predicted = lv.predicted_centres(_label_map(list(VERTEBRAE)), AFFINE)
    assert set(predicted) == set(VERTEBRAE)
    c3 = predicted["C3"]
    np.testing.assert_allclose(c3.body_lps, _body_centre(2), atol=1e-9)
    # The posterior elements pull the centre of mass behind the body (LPS +y = posterior).
    assert c3.mass_lps[1] > c3.body_lps[1] + 5
    # C1 has no body: both centres are its centre of mass.
    assert predicted["C1"].body_lps == predicted["C1"].mass_lps
    assert predicted["C3"].voxels == int((_label_map(list(VERTEBRAE)) == 3).sum())


def test_centres_follow_the_affine_not_the_index_order() -> None:
    predicted = lv.predicted_centres(_label_map(list(VERTEBRAE)), AFFINE)
    # Index 0 is the top of this grid: C1's centre is the most superior (largest z).
    zs = [predicted[name].body_lps[2] for name in VERTEBRAE]
    assert zs == sorted(zs, reverse=True)
    assert zs[0] - zs[1] == pytest.approx(STEP * SPACING[0])


# --------------------------------------------------------------------------- matching


def test_all_levels_where_the_reference_puts_them_are_exact() -> None:
    predicted = lv.predicted_centres(_label_map(list(VERTEBRAE)), AFFINE)
    results, extra = lv.match_levels(predicted, _reference())
    assert _outcomes(results) == {name: lv.EXACT for name in VERTEBRAE}
    assert all(r.centre_error_mm == pytest.approx(0.0, abs=1e-9) for r in results)
    assert extra == {}


def test_swapped_neighbours_are_off_by_one_with_the_level_spacing_as_error() -> None:
    order: list[str | None] = list(VERTEBRAE)
    order[2], order[3] = "C4", "C3"
    results, _ = lv.match_levels(lv.predicted_centres(_label_map(order), AFFINE),
                                 _reference())
    by_name = {r.name: r for r in results}
    assert by_name["C3"].outcome == lv.OFF_BY_ONE and by_name["C3"].nearest_reference == "C4"
    assert by_name["C4"].outcome == lv.OFF_BY_ONE and by_name["C4"].nearest_reference == "C3"
    assert by_name["C3"].centre_error_mm == pytest.approx(STEP * SPACING[0])
    assert by_name["C5"].outcome == lv.EXACT


def test_a_level_two_away_is_worse_and_an_absent_one_missing() -> None:
    order: list[str | None] = list(VERTEBRAE)
    order[1] = None            # no C2 where C2 is
    order[3] = "C2"            # "C2" drawn where C4 is; C4 itself gone
    order[6] = None            # no C7
    results, _ = lv.match_levels(lv.predicted_centres(_label_map(order), AFFINE),
                                 _reference())
    outcomes = _outcomes(results)
    assert outcomes["C2"] == lv.WORSE
    assert outcomes["C4"] == lv.MISSING and outcomes["C7"] == lv.MISSING
    missing = next(r for r in results if r.name == "C7")
    assert missing.centre_error_mm is None and missing.predicted_centre_lps is None
    assert outcomes["C1"] == outcomes["C3"] == lv.EXACT


def test_a_label_far_from_every_level_read_is_worse_not_exact() -> None:
    # "C1" drawn 3 levels above the first reference level (e.g. inside the skull): C1 is
    # the nearest reference level, yet nowhere near it.
    reference = _reference(("C4", "C5", "C6", "C7"))
    labels = np.zeros(SHAPE, dtype=np.uint8)
    zb, yb, xb, *_ = _level_box(0)
    labels[zb, yb, xb] = 1
    shifted = [dict(r, centre_lps=_body_centre(k + 3).tolist())
               for k, r in enumerate(reference)]
    results, extra = lv.match_levels(lv.predicted_centres(labels, AFFINE), shifted)
    assert extra == {"C1": None}
    assert {r.name: r.outcome for r in results} == {
        "C4": lv.MISSING, "C5": lv.MISSING, "C6": lv.MISSING, "C7": lv.MISSING}
    reference_with_c1 = [dict(shifted[0], name="C1"), *shifted[1:]]
    results, _ = lv.match_levels(lv.predicted_centres(labels, AFFINE), reference_with_c1)
    c1 = next(r for r in results if r.name == "C1")
    assert c1.outcome == lv.WORSE and c1.nearest_reference is None
    assert c1.centre_error_mm == pytest.approx(3 * STEP * SPACING[0])


def test_thoracic_reference_levels_count_as_neighbours() -> None:
    # The scan shows C5..T2; the model calls C6, C7 what is really C7, T1.
    names = ("C5", "C6", "C7", "T1", "T2")
    order: list[str | None] = [None, "C6", "C7", None, None]
    labels = _label_map(order)
    reference = _reference(names)
    reference = [dict(r, centre_lps=_body_centre(k - 1).tolist()) if k >= 1 else r
                 for k, r in enumerate(reference)]  # reference shifted up by one slot
    results, _ = lv.match_levels(lv.predicted_centres(labels, AFFINE), reference)
    by_name = {r.name: r for r in results}
    assert set(by_name) == {"C5", "C6", "C7"}  # T1, T2 are not scored: the model has no T
    assert by_name["C6"].nearest_reference == "C7" and by_name["C6"].outcome == lv.OFF_BY_ONE
    assert by_name["C7"].nearest_reference == "T1" and by_name["C7"].outcome == lv.OFF_BY_ONE
    assert by_name["C5"].outcome == lv.MISSING


def test_report_and_pooled_figures() -> None:
    volume = _volume()
    order: list[str | None] = list(VERTEBRAE)
    order[2], order[3], order[6] = "C4", "C3", None
    entry = {"name": "synthetic", "levels": _reference()}
    report = lv.evaluate_levels(volume, _findings(_label_map(order)), entry)
    assert report.counts == {lv.EXACT: 4, lv.OFF_BY_ONE: 2, lv.WORSE: 0, lv.MISSING: 1}
    assert report.fraction_exact == pytest.approx(4 / 7)
    assert report.median_centre_error_mm == pytest.approx(0.0, abs=1e-9)
    as_dict = report.to_dict()
    assert as_dict["counts"][lv.MISSING] == 1 and as_dict["centre"] == "body"
    assert as_dict["predicted"]["C3"]["voxels"] > 0

    nothing = lv.evaluate_levels(volume, _findings(None), entry)
    assert nothing.counts[lv.MISSING] == 7 and nothing.median_centre_error_mm is None
    pooled = lv.pool([report, nothing])
    assert pooled["levels"] == 14 and pooled["counts"][lv.EXACT] == 4
    assert pooled["fraction_exact"] == pytest.approx(4 / 14)

    with pytest.raises(ValueError, match="volume grid"):
        lv.evaluate_levels(volume, _findings(np.zeros((2, 2, 2), np.uint8)), entry)
    with pytest.raises(ValueError, match="'body' or 'mass'"):
        lv.match_levels(lv.predicted_centres(_label_map(list(VERTEBRAE)), AFFINE),
                        _reference(), centre="middle")


# --------------------------------------------------------------------------- reference


def test_reference_entry_is_found_by_uid_and_verified_by_pixel_hash() -> None:
    volume = _volume()
    document = {"scans": {volume.series_instance_uid: {
        "name": "synthetic", "pixel_sha256": lv.pixel_sha256(volume.hu),
        "levels": _reference()}}}
    assert lv.reference_for(volume, document)["name"] == "synthetic"

    altered = _volume(seed=1)
    with pytest.raises(lv.LevelReferenceError, match="does not match"):
        lv.reference_for(altered, document)
    assert lv.reference_for(altered, document, verify_pixels=False)["name"] == "synthetic"
    with pytest.raises(lv.LevelReferenceError, match="no entry"):
        lv.reference_for(_volume(uid="9.9.9"), document)


def test_pixel_hash_is_over_int16_little_endian_hu() -> None:
    hu = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    assert lv.pixel_sha256(hu) == lv.pixel_sha256(hu.astype(np.float32))
    assert lv.pixel_sha256(hu) == lv.pixel_sha256(hu.astype(">i2"))
    assert lv.pixel_sha256(hu) != lv.pixel_sha256(hu[::-1])


def test_packaged_reference_describes_both_scans() -> None:
    document = lv.load_reference()
    assert "not by a radiologist" in document["reader"]
    names = {entry["name"] for entry in document["scans"].values()}
    assert names == {"real-ct-head-neck", "real-ct-chest-neck"}
    for entry in document["scans"].values():
        assert len(entry["pixel_sha256"]) == 64 and entry["method"]
        for level in entry["levels"]:
            assert level["name"] in lv.SPINE_ORDER
            assert level["cut"] in (None, "top", "bottom")


# --------------------------------------------------------------------------- run, report, CLI


def test_find_scans_takes_folders_with_a_ct_subfolder(tmp_path: Path) -> None:
    (tmp_path / "b-scan" / "ct").mkdir(parents=True)
    (tmp_path / "b-scan" / "ct" / "1.dcm").write_bytes(b"x")
    (tmp_path / "a-scan" / "ct").mkdir(parents=True)
    (tmp_path / "a-scan" / "ct" / "2.dcm").write_bytes(b"x")
    (tmp_path / "empty" / "ct").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    found = find_scans(tmp_path)
    assert [name for name, _ in found] == ["a-scan", "b-scan"]
    assert find_scans(tmp_path / "absent") == []


def test_report_markdown_shows_levels_probability_and_warnings() -> None:
    order: list[str | None] = list(VERTEBRAE)
    order[6] = None
    report = lv.evaluate_levels(_volume(), _findings(_label_map(order)),
                                {"name": "synthetic", "levels": _reference()})
    results = [
        ScanResult(name="synthetic", series_instance_uid="1.2.3.4", levels=report,
                   patient_probability=0.42, patient_suspected=False, patient_threshold=0.7,
                   suspected_vertebrae=["C3"], in_view=list(VERTEBRAE[:6]),
                   warnings=["LEVELS_OUT_OF_ORDER"]),
        ScanResult(name="broken", error="VolumeError: no slices"),
    ]
    summary = summarize(results, model={"model": "cspine", "version": "9"},
                        reference={"reader": "read here"})
    assert summary["pooled"]["counts"] == {"exact": 6, "off_by_one": 0, "worse": 0,
                                           "missing": 1}
    text = render_markdown(summary)
    assert "| C7 | missing |" in text and "0.420" in text and "LEVELS_OUT_OF_ORDER" in text
    assert "not scored: VolumeError" in text and "read here" in text


def test_evaluate_real_is_registered_and_refuses_a_missing_data_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register_real(parser.add_subparsers())
    args = parser.parse_args(["evaluate-real", "--data", str(tmp_path / "absent"),
                              "--out", str(tmp_path / "out")])
    assert args.handler is cmd_evaluate_real and args.centre == "body"
    from service.config import Settings

    assert args.handler(args, Settings()) == 2
    assert "not found" in capsys.readouterr().out


def test_figures_draw_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from service.evaluation.real_figures import draw_scan, reformats

    hu = np.full(SHAPE, -1000, dtype=np.int16)
    labels = _label_map(list(VERTEBRAE))
    hu[labels > 0] = 700
    entry = {"name": "synthetic", "levels": _reference()}
    views = reformats(hu, AFFINE, entry["levels"])
    assert views["sagittal"].max() > 300 and views["coronal"].max() > 300
    out = draw_scan(hu, AFFINE, entry, tmp_path / "levels.png", dpi=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_scan_scores_a_run_and_records_failures(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.config import Settings
    from service.evaluation import real
    from service.imaging.qc import VolumeError
    from service.inference import pipeline
    from service.outcomes import SeriesReason

    volume = _volume()
    document = {"reader": "read here", "scans": {volume.series_instance_uid: {
        "name": "synthetic", "pixel_sha256": lv.pixel_sha256(volume.hu),
        "levels": _reference()}}}

    def analysed(paths: object, settings: object, runtime: object = None,
                 ) -> tuple[Volume, Findings]:
        return volume, _findings(_label_map(list(VERTEBRAE)))

    monkeypatch.setattr(pipeline, "analyze_paths", analysed)
    result = real.evaluate_scan("synthetic", [tmp_path / "x.dcm"], Settings(), document,
                                runtime=object())  # type: ignore[arg-type]
    assert result.error is None and result.levels is not None
    assert result.levels.counts[lv.EXACT] == 7
    assert result.patient_probability == pytest.approx(0.1)

    other = _volume(uid="5.6.7")
    monkeypatch.setattr(pipeline, "analyze_paths",
                        lambda *a, **k: (other, _findings(None, uid="5.6.7")))
    result = real.evaluate_scan("other", [], Settings(), document, runtime=object())  # type: ignore[arg-type]
    assert result.levels is None and "no entry" in (result.error or "")

    def broken(*args: object, **kwargs: object) -> None:
        raise VolumeError(SeriesReason.TOO_FEW_SLICES, "1 slice")

    monkeypatch.setattr(pipeline, "analyze_paths", broken)
    result = real.evaluate_scan("broken", [], Settings(), document, runtime=object())  # type: ignore[arg-type]
    assert result.levels is None and "VolumeError" in (result.error or "")
    summary = real.summarize([result], reference=document)
    paths = real.write_report(summary, tmp_path / "out")
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert "not scored: VolumeError" in paths[1].read_text()


def test_evaluate_scan_draws_reference_and_predicted_centres(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from service.config import Settings
    from service.evaluation import real
    from service.inference import pipeline

    volume = _volume()
    labels = _label_map(list(VERTEBRAE))
    volume.hu[...] = np.where(labels > 0, 700, -1000).astype(np.int16)
    document = {"scans": {volume.series_instance_uid: {
        "name": "synthetic", "pixel_sha256": lv.pixel_sha256(volume.hu),
        "levels": _reference()}}}
    monkeypatch.setattr(pipeline, "analyze_paths",
                        lambda *a, **k: (volume, _findings(labels)))
    result = real.evaluate_scan("synthetic", [], Settings(), document,
                                runtime=object(), figures=tmp_path)  # type: ignore[arg-type]
    assert result.figure == "synthetic-predicted.png"
    assert (tmp_path / result.figure).read_bytes()[:4] == b"\x89PNG"
    text = real.render_markdown(real.summarize([result]))
    assert "(synthetic-predicted.png)" in text
