from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.uid import Comprehensive3DSRStorage

from harness.data.results_inputs import SyntheticCase, make_case
from service.config import SegFormat
from service.results import codes, uids
from service.results.common import AlgorithmInfo, ResultBuildError
from service.results.seg import SegmentationResult, build_segmentation
from service.results.sr import build_report
from service.results.uids import ObjectKind
from tests.unit.results.dicom_tools import dciodvfy, dsrdump

ROOT = "1.2.826.0.1.3680043.10.1455."
ALGORITHM = AlgorithmInfo(name="cspine-synthetic", version="1.0.0", manufacturer="Test Lab")


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return make_case(40, 48, 48, suspected={"C2": 0.91, "C5": 0.62})


@pytest.fixture(scope="module")
def segmentation(case: SyntheticCase) -> SegmentationResult:
    result = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM)
    assert result is not None
    return result


def _reread(sr: hd.sr.Comprehensive3DSR) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    sr.save_as(buffer)
    buffer.seek(0)
    read = hd.sr.srread(buffer)
    assert isinstance(read, hd.sr.Comprehensive3DSR)
    return read


def test_sr_round_trips_every_vertebra(case: SyntheticCase,
                                       segmentation: SegmentationResult) -> None:
    sr = _reread(build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                              segmentation=segmentation))
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == case.volume.study_instance_uid
    assert sr.PatientID == "SYNTH-001"
    assert sr.SOPInstanceUID == uids.sop_instance_uid(
        ROOT, case.volume.series_instance_uid, "1.0.0", ObjectKind.SR)
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"

    groups = sr.content.get_volumetric_roi_measurement_groups()
    in_view = [f for f in case.findings.vertebrae if f.in_view]
    assert len(groups) == len(in_view) == 6
    by_site = {group.finding_sites[0].value.value: group for group in groups}
    for finding in in_view:
        group = by_site[codes.vertebra_code(finding.vertebra).value]
        assert group.finding_type == codes.FRACTURE
        assert group.tracking_uid == uids.tracking_uid(
            ROOT, case.volume.series_instance_uid, "1.0.0", finding.vertebra)
        (measurement,) = group.get_measurements(name=codes.PROBABILITY)
        assert measurement.value == pytest.approx(finding.probability)
        assert measurement.unit == codes.NO_UNITS
        # The probability references the key slices.
        key_uids = {case.volume.sop_instance_uids[z] for z in finding.key_slices}
        assert {ref.referenced_sop_instance_uid
                for ref in measurement.referenced_images} == key_uids
        (evaluation,) = group.get_qualitative_evaluations(name=codes.FRACTURE)
        assert evaluation.value == (codes.PRESENT if finding.suspected else codes.ABSENT)
        segment = group.referenced_segment
        assert segment is not None
        assert segment.referenced_sop_instance_uid == segmentation.sop_instance_uid
        assert segment.referenced_sop_class_uid == segmentation.sop_class_uid
        assert segment.referenced_segment_numbers == [
            segmentation.segment_numbers[finding.vertebra]]
        assert finding.slice_range is not None
        first, last = finding.slice_range
        assert [s.referenced_sop_instance_uid for s in segment.source_images_for_segmentation] \
            == case.volume.sop_instance_uids[first:last + 1]


def test_patient_level_finding_and_observer(case: SyntheticCase,
                                            segmentation: SegmentationResult) -> None:
    sr = _reread(build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                              segmentation=segmentation))
    (patient,) = sr.content.get_image_measurement_groups()
    assert patient.finding_sites[0].value.value == codes.CERVICAL_SPINE.value
    assert patient.tracking_identifier == "Cervical spine"
    (probability,) = patient.get_measurements(name=codes.PROBABILITY)
    assert probability.value == pytest.approx(case.findings.patient_probability)
    (evaluation,) = patient.get_qualitative_evaluations(name=codes.FRACTURE)
    assert evaluation.value == codes.PRESENT

    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_type == codes.DEVICE_OBSERVER
    device = observer.observer_identifying_attributes
    assert device.name == "cspine-synthetic"
    assert device.manufacturer_name == "Test Lab"
    assert device.uid == uids.device_uid(ROOT, "cspine-synthetic", "1.0.0")


def test_evidence_references_source_series_and_seg(case: SyntheticCase,
                                                   segmentation: SegmentationResult) -> None:
    sr = build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                      segmentation=segmentation)
    referenced: dict[str, set[str]] = {}
    for seq_name in ("CurrentRequestedProcedureEvidenceSequence",
                     "PertinentOtherEvidenceSequence"):
        for study in sr.get(seq_name, []):
            assert study.StudyInstanceUID == case.volume.study_instance_uid
            for series in study.ReferencedSeriesSequence:
                referenced.setdefault(series.SeriesInstanceUID, set()).update(
                    item.ReferencedSOPInstanceUID for item in series.ReferencedSOPSequence)
    assert referenced[case.volume.series_instance_uid] == set(case.volume.sop_instance_uids)
    assert referenced[segmentation.dataset.SeriesInstanceUID] == {segmentation.sop_instance_uid}


def test_sr_validates_and_dsrdump_renders_it(case: SyntheticCase,
                                             segmentation: SegmentationResult,
                                             tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                 segmentation=segmentation).save_as(path)
    report = dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output
    text = dsrdump(path)
    assert "Comprehensive 3D SR Document" in text
    assert '(72704001,SCT,"Fracture")' in text
    assert '(39976000,SCT,"C2 vertebra")' in text
    assert '(52101004,SCT,"Present")' in text
    assert '"Probability")="0.91"' in text
    assert '(122494005,SCT,"Cervical spine")' in text


def test_without_segmentation_groups_reference_source_images(tmp_path: Path) -> None:
    case = make_case(30, 32, 32, suspected={"C3": 0.8}, with_label_map=False)
    sr = _reread(build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                              segmentation=None))
    assert sr.content.get_volumetric_roi_measurement_groups() == []
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 7  # six vertebrae in view + the patient-level group
    c3 = next(g for g in groups if g.finding_sites[0].value.value == codes.C3_VERTEBRA.value)
    (evaluation,) = c3.get_qualitative_evaluations(name=codes.FRACTURE)
    assert evaluation.value == codes.PRESENT
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy(path).errors == []


def test_labelmap_variant_references_the_labelmap_seg(case: SyntheticCase) -> None:
    labelmap = build_segmentation(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                                  seg_format=SegFormat.LABELMAP)
    assert labelmap is not None
    sr = _reread(build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                              segmentation=labelmap, seg_format=SegFormat.LABELMAP))
    assert sr.SOPInstanceUID == uids.sop_instance_uid(
        ROOT, case.volume.series_instance_uid, "1.0.0", ObjectKind.SR_LABELMAP)
    segment = sr.content.get_volumetric_roi_measurement_groups()[0].referenced_segment
    assert segment is not None
    assert segment.referenced_sop_instance_uid == labelmap.sop_instance_uid
    assert segment.referenced_sop_class_uid == "1.2.840.10008.5.1.4.1.1.66.7"


def test_format_mismatch_and_wrong_series_rejected(case: SyntheticCase,
                                                   segmentation: SegmentationResult) -> None:
    with pytest.raises(ResultBuildError):
        build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                     segmentation=segmentation, seg_format=SegFormat.LABELMAP)
    other = make_case(12, 32, 32)
    with pytest.raises(ResultBuildError):
        build_report(other.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                     segmentation=None)


def test_no_fracture_reports_absent() -> None:
    case = make_case(20, 32, 32)
    sr = _reread(build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                              segmentation=None))
    (patient,) = [g for g in sr.content.get_image_measurement_groups()
                  if g.finding_sites[0].value.value == codes.CERVICAL_SPINE.value]
    (evaluation,) = patient.get_qualitative_evaluations(name=codes.FRACTURE)
    assert evaluation.value == codes.ABSENT


def test_result_uids_follow_the_instances_analysed(case: SyntheticCase,
                                                   segmentation: SegmentationResult) -> None:
    """Same instances, same UIDs (a re-run replaces); more instances, new UIDs (a reopened
    series must not reuse a UID for different content)."""
    from dataclasses import replace

    from service.findings import instances_fingerprint

    uids_now = case.volume.sop_instance_uids
    first = replace(case.findings, source_fingerprint=instances_fingerprint(uids_now))
    again = replace(case.findings,
                    source_fingerprint=instances_fingerprint(list(reversed(uids_now))))
    grown = replace(case.findings,
                    source_fingerprint=instances_fingerprint([*uids_now, "1.2.3.4.5"]))

    def sr_uid(findings: object) -> str:
        return str(build_report(case.volume, findings, uid_root=ROOT,  # type: ignore[arg-type]
                                algorithm=ALGORITHM, segmentation=segmentation).SOPInstanceUID)

    assert sr_uid(first) == sr_uid(again)
    assert sr_uid(grown) != sr_uid(first)
    assert first.uid_source.startswith(case.volume.series_instance_uid + "/")


def _inconclusive(case: SyntheticCase) -> SyntheticCase:
    """The case's findings as the pipeline gives them when the gate fails: C5 above
    threshold but not vouched for, the column out of order."""
    import dataclasses

    from service.outcomes import AnalysisResult

    reasons = ("LEVELS_OUT_OF_ORDER",)
    vertebrae = [dataclasses.replace(v, suspected=False, plausible=False,
                                     plausibility_reasons=reasons,
                                     above_threshold=bool(v.probability and v.probability >= .5))
                 if v.in_view else v for v in case.findings.vertebrae]
    anatomy = {"failures": [{"code": "LEVELS_OUT_OF_ORDER", "level": None,
                             "detail": "head to foot along the spine: C1, C3, C2"}]}
    findings = dataclasses.replace(case.findings, vertebrae=vertebrae, patient_suspected=False,
                                   result=AnalysisResult.INCONCLUSIVE, anatomy=anatomy)
    return SyntheticCase(datasets=case.datasets, volume=case.volume, findings=findings)


def test_inconclusive_is_indeterminate_with_the_failed_rules(case: SyntheticCase,
                                                             tmp_path: Path) -> None:
    inconclusive = _inconclusive(case)
    segmentation = build_segmentation(inconclusive.volume, inconclusive.findings,
                                      uid_root=ROOT, algorithm=ALGORITHM)
    sr = build_report(inconclusive.volume, inconclusive.findings, uid_root=ROOT,
                      algorithm=ALGORITHM, segmentation=segmentation)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    report = dciodvfy(path)
    assert report.errors == [], report.output
    assert report.warnings == [], report.output

    read = _reread(sr)
    (patient,) = read.content.get_image_measurement_groups()
    (evaluation,) = patient.get_qualitative_evaluations(name=codes.FRACTURE)
    assert evaluation.value == codes.INDETERMINATE  # neither present nor absent: not cleared
    comments = [item.TextValue for item in patient[0].ContentSequence
                if item.ValueType == "TEXT" and item.name == codes.COMMENT]
    assert comments[0].startswith("INCONCLUSIVE")
    assert "LEVELS_OUT_OF_ORDER (head to foot along the spine: C1, C3, C2)" in comments
    for group in read.content.get_volumetric_roi_measurement_groups():
        (evaluation,) = group.get_qualitative_evaluations(name=codes.FRACTURE)
        assert evaluation.value == codes.INDETERMINATE  # C2 at 0.91 is not a flag here
    text = dsrdump(path)
    assert '(82334004,SCT,"Indeterminate")' in text
    assert '"Comment")="Not vouched for by' in text  # dsrdump shortens long text values
    vertebra_comments = [item.TextValue
                         for group in read.content.get_volumetric_roi_measurement_groups()
                         for item in group[0].ContentSequence
                         if item.ValueType == "TEXT" and item.name == codes.COMMENT]
    assert vertebra_comments == [
        "Not vouched for by the anatomical plausibility gate: LEVELS_OUT_OF_ORDER"] * 6


def test_hashed_dates_in_the_source_do_not_stop_the_results(tmp_path: Path) -> None:
    """De-identification by hashing (the real chest CT): UUIDs in Patient Birth Date, Study
    Date and Content Date. highdicom would refuse to copy them; they are written empty."""
    case = make_case(20, 32, 32, suspected={"C2": 0.9})
    for ds in case.volume.headers:
        ds.PatientBirthDate = "ba6d74f4-8a35-38e8-b696-a8cb0d0d87f4"
        ds.StudyDate = "61d6b371-5759-36d4-a66b-402c0333d1a9"
        ds.ContentDate = "61d6b371-5759-36d4-a66b-402c0333d1a9"
        ds.PatientSex = "64a6a8cd-c69c-38"
    segmentation = build_segmentation(case.volume, case.findings, uid_root=ROOT,
                                      algorithm=ALGORITHM)
    assert segmentation is not None
    sr = build_report(case.volume, case.findings, uid_root=ROOT, algorithm=ALGORITHM,
                      segmentation=segmentation)
    assert sr.PatientBirthDate == "" and sr.StudyDate == "" and sr.PatientSex == ""
    assert segmentation.dataset.PatientBirthDate == ""
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy(path).errors == []
