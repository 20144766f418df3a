"""A fracture planted into the real head-and-neck CT (service.evaluation.planting).

The scan is not in the repository: it lives in ``../shared/data`` beside the checkout (or
where ``TEST_REAL_DATA_DIR`` points); the test skips, naming that path, when it is absent.
Output goes to a temporary directory only (it holds the scan's pixels).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.evaluation import planting as pl
from service.evaluation.rsna import RsnaDataset
from service.imaging.volume import load_volume

DATA_DIR = Path(os.environ.get(
    "TEST_REAL_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))
HEAD_NECK = DATA_DIR / "real-ct-head-neck"


@pytest.fixture(scope="module")
def scan() -> pl.SourceScan:
    if not (HEAD_NECK / "ct").is_dir():
        pytest.skip(f"real scan not found: {HEAD_NECK / 'ct'} (set TEST_REAL_DATA_DIR)")
    return pl.load_source(HEAD_NECK)


def test_body_fracture_in_c4_lies_between_its_endplates(scan: pl.SourceScan,
                                                        tmp_path: Path) -> None:
    spec = pl.PlantSpec("C4", pl.FractureKind.BODY, orientation="coronal", gap_mm=1.5,
                        gap_hu=60.0, displacement_mm=1.5)
    planted, result = pl.plant(scan.hu, scan.affine, scan.reference_levels, spec,
                               thickness_mm=scan.thickness_mm)
    changed = planted != scan.hu
    assert (scan.hu[changed] > pl.BONE_HU).all()
    level = {e["name"]: e for e in scan.reference_levels}["C4"]
    superior_z = level["superior_endplate_lps"][2]
    inferior_z = level["inferior_endplate_lps"][2]
    visible = np.argwhere(np.abs(planted.astype(np.int32) - scan.hu) >= pl.VISIBLE_HU)
    lps = visible @ scan.affine[:3, :3].T + scan.affine[:3, 3]
    half_slice = float(np.linalg.norm(scan.affine[:3, 0])) / 2
    # Every visible change within the endplates: a changed slice's centre at most half a
    # slice beyond them, plus the line's 1.5 mm margin past the endplate and up to 1.5 mm of
    # the body axis's tilt across the body; most of them strictly between.
    margin = half_slice + 3.0
    assert lps[:, 2].min() >= inferior_z - margin
    assert lps[:, 2].max() <= superior_z + margin
    between = (lps[:, 2] >= inferior_z) & (lps[:, 2] <= superior_z)
    assert between.mean() >= 0.75
    # In the body: in front of the canal, near the midline.
    centre = np.asarray(level["centre_lps"])
    assert np.abs(lps[:, 0] - centre[0]).max() <= 20.0
    assert np.abs(lps[:, 1] - centre[1]).max() <= 20.0
    assert result.changed_voxels >= 200

    study = pl.write_study(scan, [spec], tmp_path, seed=0, variant="test")
    pl.write_csvs(tmp_path, [study])
    dataset = RsnaDataset(tmp_path)
    assert dataset.labels[study.study_instance_uid].vertebrae == (0, 0, 0, 1, 0, 0, 0)
    written = load_volume(next(iter(dataset)).dicom_paths())
    np.testing.assert_array_equal(written.hu, planted)
    assert written.series_instance_uid != scan.series_instance_uid
