from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from harness.data.results_inputs import SyntheticCase, make_case
from service.config import SegFormat
from service.results import codes, uids
from service.results.common import AlgorithmInfo, ResultBuildError
from service.results.seg import build_segmentation
from service.results.uids import ObjectKind
from tests.unit.results.dicom_tools import dciodvfy

ROOT = "1.2.826.0.1.3680043.10.1455."
ALGORITHM = AlgorithmInfo(name="cspine-synthetic", version="1.0.0", manufacturer="Test Lab")


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return make_case(40, 64, 64, suspected={"C2": 0.91})


def _roundtrip(dataset: hd.seg.Segmentation) -> hd.seg.Segmentation:
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    buffer.seek(0)
    return hd.seg.segread(buffer)


def _expected_segments(case: SyntheticCase) -> np.ndarray:
    """The label map with labels remapped to the SEG's consecutive segment numbers."""
    assert case.findings.label_map is not None
    present = sorted(int(v) for v in np.unique(case.findings.label_map) if v)
    lut = np.zeros(256, np.uint8)
    for number, label in enumerate(present, start=1):
        lut[label] = number
    return lut[case.findings.label_map]


@pytest.mark.parametrize(
    ("seg_format", "transfer_syntax"),
    [(SegFormat.BINARY, JPEG2000Lossless), (SegFormat.BINARY, ExplicitVRLittleEndian),
     (SegFormat.LABELMAP, JPEG2000Lossless), (SegFormat.LABELMAP, RLELossless)],
)
def test_seg_round_trips(case: SyntheticCase, seg_format: SegFormat, transfer_syntax: str) -> None:
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                                seg_format=seg_format, transfer_syntax_uid=transfer_syntax)
    assert result is not None
    # C7 is out of view: six segments, numbered 1..6 in C1..C6 order.
    assert result.segment_numbers == {f"C{i}": i for i in range(1, 7)}
    seg = _roundtrip(result.dataset)
    assert seg.file_meta.TransferSyntaxUID == transfer_syntax
    assert seg.SegmentationType == seg_format.value
    assert seg.SOPInstanceUID == uids.sop_instance_uid(
        ROOT, case.volume.series_instance_uid, "1.0.0",
        ObjectKind.SEG_LABELMAP if seg_format is SegFormat.LABELMAP else ObjectKind.SEG)
    assert seg.StudyInstanceUID == case.volume.study_instance_uid
    assert seg.FrameOfReferenceUID == case.volume.frame_of_reference_uid
    assert seg.PatientID == "SYNTH-001"
    assert seg.get_segment_numbers() == [1, 2, 3, 4, 5, 6]
    for vertebra, number in result.segment_numbers.items():
        description = seg.get_segment_description(number)
        assert description.segment_label == f"{vertebra} vertebra"
        assert description.segmented_property_type == codes.vertebra_code(vertebra)
        assert description.segmented_property_category == codes.ANATOMICAL_STRUCTURE
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == "cspine-synthetic"
        assert algorithm[0].AlgorithmVersion == "1.0.0"
        assert algorithm[0].AlgorithmSource == "Test Lab"
    # The referenced source series is the CT series.
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == case.volume.series_instance_uid
    # Pixels: every voxel of the label map round-trips, frame-for-source-instance.
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=case.volume.sop_instance_uids, combine_segments=True,
        skip_overlap_checks=True)
    np.testing.assert_array_equal(pixels, _expected_segments(case))
    assert seg.Manufacturer == "Test Lab"
    assert seg.ManufacturerModelName == "cspine-synthetic"
    assert list(seg.SoftwareVersions)[0] == "1.0.0"


@pytest.mark.parametrize("transfer_syntax", [JPEG2000Lossless, ExplicitVRLittleEndian])
def test_binary_seg_validates_with_dciodvfy(case: SyntheticCase, tmp_path: Path,
                                            transfer_syntax: str) -> None:
    """BINARY only: Debian 12's dicom3tools (2022) predates the Label Map Segmentation IOD
    (2024) and answers "Information Object Not found" for LABELMAP."""
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                                transfer_syntax_uid=transfer_syntax)
    assert result is not None
    path = tmp_path / "seg.dcm"
    result.dataset.save_as(path)
    report = dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output


def test_pixel_stripped_headers_suffice(case: SyntheticCase) -> None:
    assert all("PixelData" not in ds for ds in case.volume.headers)
    assert build_segmentation(case.volume, case.findings, uid_root=ROOT,
                              algorithm=ALGORITHM) is not None


def test_missing_type2_attributes_are_tolerated() -> None:
    case = make_case(12, 32, 32)
    for ds in case.volume.headers:
        for keyword in ("AccessionNumber", "PatientBirthDate", "StudyID", "ReferringPhysicianName"):
            delattr(ds, keyword)
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    assert result.dataset.AccessionNumber == ""
    assert "AccessionNumber" not in case.volume.headers[0]  # the caller's headers are untouched


def test_deterministic_uids_across_rebuilds(case: SyntheticCase) -> None:
    a = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    b = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert a is not None and b is not None
    assert a.sop_instance_uid == b.sop_instance_uid
    assert a.dataset.SeriesInstanceUID == b.dataset.SeriesInstanceUID


def test_empty_or_missing_label_map_gives_no_seg() -> None:
    case = make_case(12, 32, 32, with_label_map=False)
    assert build_segmentation(case.volume, case.findings, uid_root=ROOT,
                              algorithm=ALGORITHM) is None
    case = make_case(12, 32, 32)
    assert case.findings.label_map is not None
    case.findings.label_map[:] = 0
    assert build_segmentation(case.volume, case.findings, uid_root=ROOT,
                              algorithm=ALGORITHM) is None


def test_label_map_of_wrong_shape_is_rejected(case: SyntheticCase) -> None:
    bad = make_case(12, 32, 32)
    bad.findings.label_map = np.zeros((5, 32, 32), np.uint8)
    with pytest.raises(ResultBuildError):
        build_segmentation(bad.volume, bad.findings, uid_root=ROOT, algorithm=ALGORITHM)


def test_sparse_labels_get_consecutive_segments() -> None:
    case = make_case(30, 32, 32, in_view=("C2", "C5"))
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    assert result.segment_numbers == {"C2": 1, "C5": 2}
    seg = _roundtrip(result.dataset)
    assert seg.get_segment_description(2).segmented_property_type == codes.C5_VERTEBRA


def test_multiframe_source_frames_follow_volume_order() -> None:
    """A multi-frame source whose frames are stored in reverse z order."""
    case = make_case(10, 32, 32)
    volume = case.volume
    header = volume.headers[0]
    header.NumberOfFrames = volume.shape[0]
    uid = str(header.SOPInstanceUID)
    volume.headers = [header]
    volume.sop_instance_uids = [uid] * volume.shape[0]
    volume.frame_numbers = list(range(volume.shape[0], 0, -1))
    from service.results.common import source_images

    sources = source_images(volume)
    assert sources.z_order == list(range(volume.shape[0] - 1, -1, -1))
    assert len(sources.datasets) == 1


def test_written_file_is_readable_by_pydicom(case: SyntheticCase, tmp_path: Path) -> None:
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    path = tmp_path / "seg.dcm"
    result.dataset.save_as(path)
    ds = dcmread(path)
    assert ds.Modality == "SEG" and int(ds.NumberOfFrames) > 0


def test_resampled_volume_gets_its_own_plane_positions(tmp_path: Path) -> None:
    """A volume on a corrected grid (here: half the slice spacing): frames are placed by the
    volume's affine, not by the source slices."""
    case = make_case(12, 32, 32)
    volume = case.volume
    fine = np.repeat(volume.hu, 2, axis=0)[:-1]
    labels = np.repeat(case.findings.label_map, 2, axis=0)[:-1]
    volume.hu = fine
    volume.affine = volume.affine.copy()
    volume.affine[:3, 0] /= 2
    volume.sop_instance_uids = [volume.sop_instance_uids[z // 2] for z in range(fine.shape[0])]
    volume.frame_numbers = [None] * fine.shape[0]
    volume.resampled = True
    case.findings.label_map = labels
    result = build_segmentation(volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    positions = sorted(float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                       for f in result.dataset.PerFrameFunctionalGroupsSequence)
    occupied = np.nonzero(labels.any(axis=(1, 2)))[0]
    expected = sorted(float(volume.affine[2, 3] + z * volume.affine[2, 0]) for z in occupied)
    assert positions == pytest.approx(expected)
    path = tmp_path / "seg.dcm"
    result.dataset.save_as(path)
    assert dciodvfy(path).errors == []


def test_an_inconclusive_seg_says_its_levels_are_not_plausible(case: SyntheticCase,
                                                               tmp_path: Path) -> None:
    import dataclasses

    from service.outcomes import AnalysisResult

    vertebrae = [dataclasses.replace(v, plausible=v.vertebra != "C3") if v.in_view else v
                 for v in case.findings.vertebrae]
    findings = dataclasses.replace(case.findings, vertebrae=vertebrae,
                                   result=AnalysisResult.INCONCLUSIVE)
    result = build_segmentation(case.volume, findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    path = tmp_path / "seg.dcm"
    result.dataset.save_as(path)
    report = dciodvfy(path)
    assert report.errors == [] and report.warnings == [], report.output
    seg = _roundtrip(result.dataset)
    assert seg.SeriesDescription == "AI vertebrae NOT PLAUSIBLE: review only (research)"
    labels = {d.segment_label for d in seg.SegmentSequence}
    assert "C3 vertebra (not plausible)" in labels and "C2 vertebra" in labels


def test_native_encoding_is_the_default() -> None:
    """NATIVE: BINARY uncompressed (every SCP accepts it), LABELMAP RLE; JPEG2000 on request."""
    from service.config import SegEncoding, Settings
    from service.results.seg import transfer_syntax_for

    assert Settings().seg_encoding is SegEncoding.NATIVE
    assert transfer_syntax_for(SegFormat.BINARY, SegEncoding.NATIVE) == ExplicitVRLittleEndian
    assert transfer_syntax_for(SegFormat.LABELMAP, SegEncoding.NATIVE) == RLELossless
    for seg_format in SegFormat:
        assert transfer_syntax_for(seg_format, SegEncoding.JPEG2000) == JPEG2000Lossless
    case = make_case(12, 32, 32)
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    assert result.dataset.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_memoized_iod_lookup_answers_as_highdicom() -> None:
    import highdicom._standard_utils as standard
    from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, SegmentationStorage

    from service.results import hdcache

    assert hdcache.install() and hdcache.install()  # idempotent
    memo = standard.is_attribute_in_iod
    original = memo.__wrapped__  # type: ignore[attr-defined]
    import highdicom.base
    import highdicom.sr.content

    assert highdicom.base.is_attribute_in_iod is memo
    assert highdicom.sr.content.is_attribute_in_iod is memo
    for sop_class in (CTImageStorage, EnhancedCTImageStorage, SegmentationStorage):
        for attribute in ("PerFrameFunctionalGroupsSequence", "ContentDate", "PixelData"):
            for exclude in (None, ["IconImageSequence"]):
                assert memo(attribute, sop_class, exclude) == original(attribute, sop_class,
                                                                       exclude)


def test_warm_loads_highdicom_tables_once() -> None:
    import highdicom._standard_utils as standard

    from service.results import hdcache

    hdcache.warm()
    hdcache.warm()
    assert standard.get_module_attribute_map.cache_info().currsize == 1
    assert getattr(standard.is_attribute_in_iod, "_cspine_memoized", False)
