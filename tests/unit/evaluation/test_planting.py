"""Fractures planted into bone (service.evaluation.planting) on a small synthetic HU volume.

The volume holds one vertebra built from boxes (body with a cortex, pedicles, laminae closing
a canal, a spinous and two transverse processes) in soft tissue, on an axis-aligned LPS grid:
x = column (to the patient's left), y = row (posterior), z = slice (superior) in mm.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ImplicitVRLittleEndian

from service.evaluation import planting as pl
from service.evaluation.levels import pixel_sha256
from service.evaluation.rsna import RsnaDataset, study_dicom_paths
from service.imaging.volume import load_volume

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR DA")
"""The source series carries a Study Date that is not a date (a quirk of a real scan here)."""

SOFT, CANCELLOUS, CORTEX = 40, 300, 800
BODY_X, BODY_Y = (30, 51), (20, 38)
"""Body voxels x 30..50, y 20..37 (walls at 29.5 / 50.5 and 19.5 / 37.5 mm)."""
BODY_Z_MM = (9.5, 25.5)
"""Body from z 9.5 to 25.5 mm (endplates), 16 mm tall."""
CENTRE = np.array([40.0, 28.5, 17.5])
SHAPE_XY = 80


def _affine(dz: float) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [dz, 0.0, 0.0]]
    return affine


def _phantom(dz: float = 1.0, *, dens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(hu int16 (z, y, x), affine). Thick slices average the fine-grid anatomy. ``dens``:
    a C2-like peg (radius 5 mm) on the body up to z 38 mm."""
    fine_dz = 0.25
    depth_mm = 42.0
    # Slice k covers z (k - 1/2) dz .. (k + 1/2) dz (its centre at k dz, as the affine says).
    zf = np.arange(0.0, depth_mm, fine_dz) + fine_dz / 2 - dz / 2
    fine = np.full((len(zf), SHAPE_XY, SHAPE_XY), SOFT, dtype=np.float32)
    in_body_z = (zf >= BODY_Z_MM[0]) & (zf < BODY_Z_MM[1])
    cortex_z = in_body_z & ((zf < BODY_Z_MM[0] + 1) | (zf >= BODY_Z_MM[1] - 1))
    x0, x1 = BODY_X
    y0, y1 = BODY_Y
    body = np.zeros((SHAPE_XY, SHAPE_XY), bool)
    body[y0:y1, x0:x1] = True
    shell = body.copy()
    shell[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = False
    posterior = np.zeros_like(body)
    posterior[38:50, 31:36] = posterior[38:50, 45:50] = True      # pedicles
    posterior[50:54, 31:50] = True                                # laminae closing the canal
    posterior[54:72, 38:43] = True                                # spinous process
    posterior[26:36, 10:30] = posterior[26:36, 51:71] = True      # transverse processes
    for k in np.flatnonzero(in_body_z):
        fine[k][body] = CORTEX if cortex_z[k] else CANCELLOUS
        fine[k][shell] = CORTEX
        fine[k][posterior] = CORTEX - 150
    if dens:
        yy, xx = np.mgrid[0:SHAPE_XY, 0:SHAPE_XY]
        peg = np.hypot(xx - 40, yy - 28.5) <= 5.0
        for k in np.flatnonzero((zf >= BODY_Z_MM[1]) & (zf < 38.0)):
            fine[k][peg] = CANCELLOUS + 100
    n = int(round(dz / fine_dz))
    thick = fine.reshape(-1, n, SHAPE_XY, SHAPE_XY).mean(axis=1)
    rng = np.random.default_rng(7)
    thick += rng.normal(0.0, 4.0, size=thick.shape)
    return np.rint(thick).astype(np.int16), _affine(dz)


def _levels() -> list[dict[str, Any]]:
    return [{"name": "C4", "centre_lps": CENTRE.tolist(),
             "superior_endplate_lps": [40.0, 28.5, BODY_Z_MM[1]],
             "inferior_endplate_lps": [40.0, 28.5, BODY_Z_MM[0]], "cut": None}]


# --------------------------------------------------------------------------- geometry


def test_level_walls_canal_and_widths_are_measured() -> None:
    hu, affine = _phantom()
    geo = pl.measure_level(hu, affine, _levels(), "C4")
    assert geo.anterior_y == pytest.approx(19.5, abs=1.0)
    assert geo.posterior_y == pytest.approx(37.5, abs=1.0)
    assert geo.half_width == pytest.approx(10.5, abs=1.0)
    assert geo.canal_posterior_y == pytest.approx(50.0, abs=1.0)
    assert geo.canal_half_width == pytest.approx(5.0, abs=1.0)
    assert geo.height == pytest.approx(16.0)


def test_unknown_or_c1_level_is_refused() -> None:
    hu, affine = _phantom()
    with pytest.raises(pl.PlantingError, match="not in the reference"):
        pl.plant(hu, affine, _levels(), pl.PlantSpec("C5", pl.FractureKind.BODY))
    with pytest.raises(pl.PlantingError, match="dens"):
        pl.PlantSpec("C4", pl.FractureKind.DENS)
    with pytest.raises(pl.PlantingError, match="side"):
        pl.PlantSpec("C4", pl.FractureKind.LAMINA)


# --------------------------------------------------------------------------- what changes

ALL_KINDS = [pl.PlantSpec("C4", pl.FractureKind.BODY, orientation=o) for o in
             pl.BODY_ORIENTATIONS] + [
    pl.PlantSpec("C4", pl.FractureKind.PEDICLE, side="right"),
    pl.PlantSpec("C4", pl.FractureKind.LAMINA, side="left"),
    pl.PlantSpec("C4", pl.FractureKind.SPINOUS),
    pl.PlantSpec("C4", pl.FractureKind.TRANSVERSE, side="left"),
    pl.PlantSpec("C4", pl.FractureKind.COMPRESSION)]


@pytest.mark.parametrize("dz", [1.0, 3.0])
@pytest.mark.parametrize("spec", ALL_KINDS, ids=[f"{s.kind}-{s.orientation}-{s.side}"
                                                 for s in ALL_KINDS])
def test_only_bone_voxels_change(spec: pl.PlantSpec, dz: float) -> None:
    hu, affine = _phantom(dz)
    out, result = pl.plant(hu, affine, _levels(), spec, thickness_mm=dz)
    changed = out != hu
    assert changed.any()
    assert out.dtype == hu.dtype and out.shape == hu.shape
    assert (hu[changed] > pl.BONE_HU).all()
    assert result.changed_voxels >= pl.MIN_CHANGED_VOXELS
    visible = np.abs(out.astype(int) - hu) >= pl.VISIBLE_HU
    for z, (r0, c0, r1, c1) in result.slices.items():
        assert visible[z, r0:r1, c0:c1].any()
        outside = visible[z].copy()
        outside[r0:r1, c0:c1] = False
        assert not outside.any()
    assert set(result.slices) == set(np.flatnonzero(visible.any(axis=(1, 2))).tolist())


POSTERIOR_BOXES = {
    # (kind, side): (x range, y range) that holds every visible change
    (pl.FractureKind.PEDICLE, "right"): ((28, 40), (35, 52)),
    (pl.FractureKind.LAMINA, "left"): ((40, 52), (44, 60)),
    (pl.FractureKind.SPINOUS, None): ((35, 46), (52, 74)),
    (pl.FractureKind.TRANSVERSE, "left"): ((50, 72), (24, 38)),
}


@pytest.mark.parametrize(("kind", "side"), list(POSTERIOR_BOXES))
def test_posterior_sites_change_only_their_process(kind: pl.FractureKind,
                                                   side: str | None) -> None:
    hu, affine = _phantom()
    out, _ = pl.plant(hu, affine, _levels(), pl.PlantSpec("C4", kind, side=side))
    z, y, x = np.nonzero(np.abs(out.astype(int) - hu) >= pl.VISIBLE_HU)
    (xa, xb), (ya, yb) = POSTERIOR_BOXES[(kind, side)]
    assert x.min() >= xa and x.max() < xb
    assert y.min() >= ya and y.max() < yb


# --------------------------------------------------------------------------- the line


@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_lucent_line_lies_where_asked(offset: float) -> None:
    hu, affine = _phantom()
    spec = pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="sagittal", gap_mm=1.5,
                        gap_hu=60.0, displacement_mm=0.0, offset_mm=offset)
    out, result = pl.plant(hu, affine, _levels(), spec)
    # Mid-body slice, cancellous rows: the lowest column is the line's.
    z = 18
    profile = out[z, 24:34, 32:49].astype(float).mean(axis=0)
    x_line = 32 + int(np.argmin(profile))
    assert x_line == pytest.approx(40 + offset, abs=1)
    assert profile.min() < 160  # from ~300 towards 60 HU (partial volume over 1 mm pixels)
    far = 32 + int(np.argmax(np.abs(np.arange(32, 49) - (40 + offset))))
    assert np.abs(out[z, 24:34, far].astype(int) - hu[z, 24:34, far]).max() <= 1
    assert result.normal_lps[0] > 0.9


def test_line_crosses_the_cortex_at_the_walls() -> None:
    hu, affine = _phantom()
    spec = pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="sagittal",
                        displacement_mm=0.0, gap_mm=2.0)
    out, _ = pl.plant(hu, affine, _levels(), spec)
    # The anterior wall (row 20, cortex) is broken at the line's column.
    assert out[18, 20, 40] < hu[18, 20, 40] - 200


def test_displacement_moves_the_fragment() -> None:
    hu, affine = _phantom()
    marked = hu.copy()
    marked[17:20, 27:30, 44:47] = 1200   # a dense marker in the fragment (+x side)
    marked[17:20, 27:30, 34:37] = 1200   # and one on the other side of the line
    spec = pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="sagittal",
                        displacement_mm=2.0, gap_mm=1.0)
    out, result = pl.plant(marked, affine, _levels(), spec)
    shift = np.array(result.shift_lps)
    assert np.linalg.norm(shift) == pytest.approx(2.0, abs=0.01)
    assert abs(shift @ np.array(result.normal_lps)) < 0.01   # along the fracture plane

    def centroid(volume: np.ndarray, xs: slice) -> np.ndarray:
        block = volume[12:25, 22:35, xs].astype(float)
        weight = np.clip(block - 900, 0, None)
        index = np.argwhere(np.ones_like(block, bool)).reshape(*block.shape, 3)
        zyx = (index * weight[..., None]).sum(axis=(0, 1, 2)) / weight.sum()
        return np.array([zyx[2] + xs.start, zyx[1] + 22, zyx[0] + 12])  # x, y, z in mm

    moved = centroid(out, slice(41, 50)) - centroid(marked, slice(41, 50))
    assert moved == pytest.approx(shift, abs=0.4)
    still = centroid(out, slice(31, 39)) - centroid(marked, slice(31, 39))
    assert np.linalg.norm(still) < 0.2


def test_displacement_makes_a_cortical_step() -> None:
    hu, affine = _phantom()
    spec = pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="sagittal",
                        displacement_mm=2.0, gap_mm=1.0, shift_sign=1.0)
    out, result = pl.plant(hu, affine, _levels(), spec)
    shift = np.array(result.shift_lps)
    # The fragment (x > 40) moves anteriorly-inferiorly: its superior endplate cortex steps
    # down against the other fragment's, whose endplate stays.
    assert shift[2] < -0.5
    top = 25
    assert out[top, 28, 46] < hu[top, 28, 46] - 150
    assert abs(int(out[top, 28, 34]) - int(hu[top, 28, 34])) <= 1


def test_dens_line_lies_at_the_dens_base() -> None:
    hu, affine = _phantom(1.0, dens=True)
    levels = [dict(_levels()[0], name="C2", superior_endplate_lps=[40.0, 28.5, 38.0])]
    spec = pl.PlantSpec("C2", pl.FractureKind.DENS, gap_mm=1.5, displacement_mm=0.0,
                        tilt=(0.0, -0.2, 0.0))   # an axial line: normal straight up
    out, result = pl.plant(hu, affine, levels, spec, thickness_mm=1.0)
    assert result.point_lps[2] == pytest.approx(BODY_Z_MM[1])  # base = 2 centre - inferior
    z, y, x = np.nonzero(np.abs(out.astype(int) - hu) >= pl.VISIBLE_HU)
    # Within the dens region (7 mm about an axis 1 mm behind the body centre) and the PSF.
    assert np.hypot(x - 40, y - 29.5).max() <= 7.0 + 2.0
    assert z.min() >= BODY_Z_MM[1] - 2 and z.max() <= BODY_Z_MM[1] + 2
    # The line is lucent across the peg just at its base.
    assert out[int(BODY_Z_MM[1]) + 1, 26:32, 37:44].mean() < 200


# --------------------------------------------------------------------------- compression


def _height(volume: np.ndarray, row: int, col: int) -> float:
    return float((volume[:, row, col] > 170).sum())


@pytest.mark.parametrize("loss", [0.2, 0.3, 0.4])
def test_compression_shortens_the_anterior_body_by_the_fraction(loss: float) -> None:
    hu, affine = _phantom(1.0)
    spec = pl.PlantSpec("C4", pl.FractureKind.COMPRESSION, height_loss=loss, band_hu=250.0)
    out, _ = pl.plant(hu, affine, _levels(), spec, thickness_mm=1.0)
    before = _height(hu, 20, 40)
    assert before == pytest.approx(16, abs=0.5)
    after_anterior = _height(out, 20, 40)
    assert after_anterior == pytest.approx(before * (1 - loss), abs=1.2)
    # A wedge: the posterior wall keeps its height.
    assert _height(out, 37, 40) == pytest.approx(_height(hu, 37, 40), abs=1.0)
    # The impaction band: denser than the cancellous bone under the new anterior endplate.
    top = int(BODY_Z_MM[0] + before * (1 - loss))
    assert (out[top - 3:top + 1, 21, 35:46].astype(int) - hu[top - 3:top + 1, 21, 35:46]
            ).max(axis=0).min() > 100
    # The lower half of the body is untouched.
    assert np.array_equal(out[: int(BODY_Z_MM[0] + 7)], hu[: int(BODY_Z_MM[0] + 7)])


# --------------------------------------------------------------------------- DICOM output


def _write_source(hu: np.ndarray, affine: np.ndarray, folder: Path) -> dict[str, Any]:
    """A CT series of the phantom (12-bit unsigned, intercept -1024, a Study Date that is not
    a date, every InstanceNumber 1: the quirks of the real scans); returns a reference doc."""
    folder.mkdir(parents=True)
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    dz = float(affine[2, 0])
    for z in range(hu.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = UID(f"1.2.826.0.1.3680043.8.498.3.{z + 1}")
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4"
        ds.Modality = "CT"
        ds.StudyDate = "61d6b371-5759"
        ds.PatientID = "hashed"
        ds.InstanceNumber = 1
        ds.ImagePositionPatient = [0.0, 0.0, z * dz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (hu[z].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IMG_{z:03d}.dcm", enforce_file_format=True)
    return {"scans": {series: {"name": "phantom", "pixel_sha256": pixel_sha256(hu),
                               "levels": _levels()}}}


@pytest.fixture
def source(tmp_path: Path) -> tuple[pl.SourceScan, dict[str, Any], Path]:
    hu, affine = _phantom(2.0)
    data = tmp_path / "data"
    reference = _write_source(hu, affine, data / "phantom" / "ct")
    return pl.load_source(data / "phantom", reference), reference, data


SPECS = [pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="coronal"),
         pl.PlantSpec("C4", pl.FractureKind.SPINOUS)]


def test_written_studies_have_new_deterministic_uids_and_matching_labels(
        source: tuple[pl.SourceScan, dict[str, Any], Path], tmp_path: Path) -> None:
    scan, _, _ = source
    out = tmp_path / "out"
    negative = pl.write_study(scan, [], out, seed=3, variant="negative")
    planted = pl.write_study(scan, SPECS[:1], out, seed=3, variant="planted-0")
    pl.write_csvs(out, [negative, planted])
    # New, distinct, deterministic.
    uids = {negative.study_instance_uid, planted.study_instance_uid}
    assert len(uids) == 2 and scan.study_instance_uid not in uids
    assert all(u.startswith("2.25.") and len(u) <= 64 for u in uids)
    again = pl.write_study(scan, SPECS[:1], tmp_path / "again", seed=3, variant="planted-0")
    assert again.study_instance_uid == planted.study_instance_uid
    other_seed = pl.write_study(scan, SPECS[:1], tmp_path / "seed4", seed=4,
                                variant="planted-0")
    assert other_seed.study_instance_uid != planted.study_instance_uid
    other_spec = pl.write_study(scan, SPECS[1:], tmp_path / "spec", seed=3,
                                variant="planted-0")
    assert other_spec.study_instance_uid != planted.study_instance_uid

    dataset = RsnaDataset(out)
    labels = dataset.labels
    assert labels[planted.study_instance_uid].patient_overall == 1
    assert labels[planted.study_instance_uid].vertebrae == (0, 0, 0, 1, 0, 0, 0)
    assert labels[negative.study_instance_uid].patient_overall == 0
    assert sum(labels[negative.study_instance_uid].vertebrae) == 0
    assert dataset.boxes.get(negative.study_instance_uid, []) == []
    assert dataset.boxes[planted.study_instance_uid]

    sops: set[str] = set()
    series: set[str] = set()
    for study in dataset:
        paths = study.dicom_paths()
        assert [int(p.stem) for p in paths] == list(range(1, len(scan.paths) + 1))
        for path in paths:
            ds = dcmread(path)
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.StudyDate == "61d6b371-5759"       # the quirk is kept
            assert ds.InstanceNumber == 1
            assert ds.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.4"
            assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
            sops.add(str(ds.SOPInstanceUID))
            series.add(str(ds.SeriesInstanceUID))
    assert len(sops) == 2 * len(scan.paths) and len(series) == 2
    assert not sops & set(scan.sop_instance_uids)


def test_written_pixels_are_the_planted_volume_exactly(
        source: tuple[pl.SourceScan, dict[str, Any], Path], tmp_path: Path) -> None:
    scan, _, _ = source
    out = tmp_path / "out"
    written = pl.write_study(scan, SPECS, out, seed=1, variant="planted-0")
    negative = pl.write_study(scan, [], out, seed=1, variant="negative")
    expected = scan.hu
    for spec in SPECS:
        expected, _ = pl.plant(expected, scan.affine, scan.reference_levels, spec,
                               thickness_mm=scan.thickness_mm)
    volume = load_volume(study_dicom_paths(out / "train_images" / written.study_instance_uid))
    np.testing.assert_array_equal(volume.hu, expected)
    unplanted = load_volume(study_dicom_paths(out / "train_images"
                                              / negative.study_instance_uid))
    np.testing.assert_array_equal(unplanted.hu, scan.hu)
    # Boxes: slice numbers are file names (1 = most superior), boxes hold changed pixels.
    numbers = pl.slice_numbers(scan.affine, scan.hu.shape[0])
    z_of_number = {n: z for z, n in enumerate(numbers)}
    changed = np.abs(expected.astype(int) - scan.hu) >= pl.VISIBLE_HU
    for _, x, y, width, height, number in written.boxes:
        z = z_of_number[int(number)]  # type: ignore[call-overload]
        assert changed[z, int(y):int(y) + int(height),  # type: ignore[call-overload]
                       int(x):int(x) + int(width)].any()  # type: ignore[call-overload]
    assert numbers[-1] == 1 and numbers[0] == scan.hu.shape[0]
    assert {r[3] for r in written.planted} == {"C4"}
    assert [r[4] for r in written.planted] == ["body", "spinous"]


def test_cli_plants_variants_and_negatives(
        source: tuple[pl.SourceScan, dict[str, Any], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    _, reference, data = source
    ref_path = tmp_path / "reference.json"
    ref_path.write_text(json.dumps(reference))
    out = tmp_path / "planted"
    args = ["--data", str(data), "--out", str(out), "--per-scan", "3", "--seed", "5",
            "--reference", str(ref_path)]
    assert pl.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(out), "studies": 4, "planted": 3, "negatives": 1}
    with (out / "train.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    with (out / pl.PLANTED_CSV).open() as handle:
        plants = list(csv.DictReader(handle))
    assert len(rows) == 4
    for row in rows:
        mine = [p for p in plants if p["StudyInstanceUID"] == row["StudyInstanceUID"]]
        assert int(row["patient_overall"]) == int(bool(mine))
        for level in pl.VERTEBRA_COLUMNS:
            assert int(row[level]) == int(any(p["level"] == level for p in mine))
        assert 0 <= len(mine) <= 2
    first = sorted(r["StudyInstanceUID"] for r in rows)
    assert pl.main(args) == 0   # same seed: same studies
    with (out / "train.csv").open() as handle:
        assert sorted(r["StudyInstanceUID"] for r in csv.DictReader(handle)) == first
