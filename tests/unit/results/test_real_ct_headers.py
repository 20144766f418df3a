"""SEG and SR against a real scanner's headers (read-only reference data, skipped when absent).

The headers are read here with pydicom (pixel data not loaded) and sorted along the slice
normal, standing in for the imaging loader; the label map is a fake box per "vertebra".
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from service.findings import Findings, VertebraFinding
from service.imaging.volume import Volume
from service.results.common import AlgorithmInfo
from service.results.seg import build_segmentation
from service.results.sr import build_report
from tests.unit.results.dicom_tools import dciodvfy

ROOT = "1.2.826.0.1.3680043.10.1455."


@pytest.mark.parametrize("scan", ["real_ct_dir", "real_chest_ct_dir"])
def test_real_headers_make_valid_seg_and_sr(scan: str, request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    """Both scanners' headers, including the chest CT's de-identification by hashing (UUIDs
    in Patient's Birth Date, Sex, Study and Content Date), give valid SEG and SR."""
    directory: Path = request.getfixturevalue(scan)
    headers = [dcmread(p, stop_before_pixels=True)
               for p in sorted(q for q in directory.iterdir() if q.is_file())]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    first = headers[0]
    n, rows, cols = len(headers), int(first.Rows), int(first.Columns)
    spacing_z = float(headers[1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, spacing_z]
    affine[:3, 1] = [0, row_mm, 0]
    affine[:3, 2] = [col_mm, 0, 0]
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    volume = Volume(
        hu=np.zeros((n, rows, cols), np.int16), spacing=(spacing_z, row_mm, col_mm),
        affine=affine,
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers],
        frame_numbers=[None] * n, headers=headers,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID), acquired_at=None)
    label_map = np.zeros((n, rows, cols), np.uint8)
    vertebrae = []
    for i, name in enumerate(("C1", "C2", "C3")):
        z0 = 10 + 4 * (2 - i)
        label_map[z0:z0 + 3, 200:260, 230:290] = i + 1
        vertebrae.append(VertebraFinding(vertebra=name, in_view=True,
                                         probability=0.8 if name == "C2" else 0.1,
                                         suspected=name == "C2", slice_range=(z0, z0 + 2),
                                         key_slices=(z0 + 1,)))
    findings = Findings(series_instance_uid=volume.series_instance_uid, model_name="m",
                        model_version="1", vertebrae=vertebrae, patient_probability=0.8,
                        patient_suspected=True, vertebra_threshold=0.5, patient_threshold=0.5,
                        label_map=label_map)
    algorithm = AlgorithmInfo(name="m", version="1")
    seg = build_segmentation(volume, findings, uid_root=ROOT, algorithm=algorithm)
    assert seg is not None
    sr = build_report(volume, findings, uid_root=ROOT, algorithm=algorithm, segmentation=seg)
    for name, dataset in (("seg", seg.dataset), ("sr", sr)):
        path = tmp_path / f"{name}.dcm"
        dataset.save_as(path)
        report = dciodvfy(path)
        assert report.errors == [], report.output
    read = hd.seg.segread(tmp_path / "seg.dcm")
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=volume.sop_instance_uids, combine_segments=True,
        skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, label_map)
