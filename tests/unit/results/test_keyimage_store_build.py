from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from harness.data.results_inputs import make_case
from service.config import PacsDestination, SegFormat, Settings
from service.results.build import build_and_store, kinds_for, seg_formats_needed
from service.results.common import AlgorithmInfo
from service.results.keyimage import build_key_image
from service.results.store import ResultStore
from service.results.uids import ObjectKind
from tests.unit.results.dicom_tools import dciodvfy

ROOT = "1.2.826.0.1.3680043.10.1455."
ALGORITHM = AlgorithmInfo(name="cspine-synthetic", version="1.0.0")


def test_key_image_marks_the_most_suspicious_vertebra(tmp_path: Path) -> None:
    case = make_case(30, 64, 64, suspected={"C2": 0.7, "C4": 0.95})
    image = build_key_image(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert image is not None
    path = tmp_path / "sc.dcm"
    image.save_as(path)
    report = dciodvfy(path)
    assert report.errors == [], report.output
    ds = dcmread(path)
    c4 = next(f for f in case.findings.vertebrae if f.vertebra == "C4")
    assert c4.bbox is not None
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == \
        case.volume.sop_instance_uids[c4.key_slices[0]]
    pixels = ds.pixel_array
    assert pixels.shape == (64, 64, 3)
    _z0, y0, x0, _z1, _y1, x1 = c4.bbox
    # The box's top edge is pure red; the interior keeps the grey of the bone window.
    assert tuple(pixels[y0, (x0 + x1) // 2]) == (255, 0, 0)
    centre = pixels[(y0 + _y1) // 2, (x0 + x1) // 2]
    assert centre[0] == centre[1] == centre[2]


def test_no_key_image_without_suspicion() -> None:
    case = make_case(20, 32, 32)
    assert build_key_image(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM) is None


def test_store_layout_atomic_and_replacing(tmp_path: Path) -> None:
    case = make_case(12, 32, 32)
    store = ResultStore(tmp_path / "results")
    from service.results.sr import build_report

    sr = build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                      segmentation=None)
    first = store.write(sr, kind=ObjectKind.SR, source_series_uid=case.volume.series_instance_uid,
                        model_version="1.0.0")
    second = store.write(sr, kind=ObjectKind.SR,
                         source_series_uid=case.volume.series_instance_uid, model_version="1.0.0")
    assert first.path == second.path
    assert first.path == (tmp_path / "results" / case.volume.series_instance_uid / "1.0.0"
                          / "SR.dcm")
    assert [p.name for p in first.path.parent.iterdir()] == ["SR.dcm"]  # no temp files left
    assert dcmread(first.path).SOPInstanceUID == first.sop_instance_uid
    assert first.size_bytes == first.path.stat().st_size


def test_build_and_store_follows_destinations(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        secondary_capture=True,
        pacs_destinations=[
            PacsDestination(ae_title="A", host="127.0.0.1", port=104),
            PacsDestination(ae_title="B", host="127.0.0.1", port=105,
                            seg_format=SegFormat.LABELMAP),
        ],
    )
    assert seg_formats_needed(settings) == [SegFormat.BINARY, SegFormat.LABELMAP]
    case = make_case(24, 32, 32, suspected={"C3": 0.9})
    stored = build_and_store(case.volume, case.findings, settings)
    assert set(stored) == set(ObjectKind)
    for kind, obj in stored.items():
        assert obj.path.is_file() and obj.path.is_relative_to(settings.results_path)
        assert obj.study_instance_uid == case.volume.study_instance_uid
        assert obj.kind is kind
    # NATIVE encoding (the default): BINARY uncompressed, LABELMAP RLE Lossless.
    assert stored[ObjectKind.SEG].transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert stored[ObjectKind.SEG_LABELMAP].transfer_syntax_uid == "1.2.840.10008.1.2.5"
    # Same input, same UIDs: a rebuild rewrites the same objects.
    again = build_and_store(case.volume, case.findings, settings)
    assert {k: o.sop_instance_uid for k, o in again.items()} == \
        {k: o.sop_instance_uid for k, o in stored.items()}
    assert kinds_for(SegFormat.LABELMAP, secondary_capture=False) == [
        ObjectKind.SEG_LABELMAP, ObjectKind.SR_LABELMAP]


def test_label_map_values_beyond_c7_are_background() -> None:
    case = make_case(16, 32, 32)
    assert case.findings.label_map is not None
    case.findings.label_map[0, :4, :4] = 9
    from service.results.seg import build_segmentation

    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    assert "C9" not in result.segment_numbers
    assert np.max(case.findings.label_map) == 9  # input untouched


@pytest.mark.parametrize("manifest", [{"name": "m", "version": "2"},
                                      {"model_name": "m", "model_version": "2"}])
def test_algorithm_from_manifest(manifest: dict[str, str]) -> None:
    info = AlgorithmInfo.from_manifest(manifest)
    assert (info.name, info.version) == ("m", "2")


def test_algorithm_from_manifest_object() -> None:
    class Manifest:
        name = "cspine"
        version = "1.2.0"

    info = AlgorithmInfo.from_manifest(Manifest())
    assert (info.name, info.version, info.manufacturer) == ("cspine", "1.2.0", "cspine-triage")
