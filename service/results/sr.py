"""Comprehensive 3D SR Measurement Report (TID 1500) of the per-vertebra fracture findings.

Content tree (built only through highdicom's template classes):

- observation context: the algorithm as device observer (name, version, manufacturer from
  the model manifest; Device Observer UID derived from model name and version);
- procedure reported: CT (CID 100 has no cervical-spine CT procedure code);
- one TID 1411 volumetric measurement group per vertebra in view: tracking identifier and
  UID, finding type Fracture (SCT 72704001), finding site C1..C7 (SNOMED CT), qualitative
  evaluation Fracture = Present/Absent, or Indeterminate (SCT 82334004) on a level the
  anatomical plausibility gate could not vouch for, with a TEXT Comment (DCM 121106) naming
  the failed rules; measurement Probability (DCM 122157, unit "1")
  referencing the key slices, and the region as a Referenced Segment of the SEG with its
  source images (the instances spanning the vertebra). Without a SEG (nothing segmented) the
  group is a TID 1501 group whose source images are those instances;
- one TID 1501 patient-level group: finding site Cervical spine, Fracture present/absent,
  or Indeterminate for an INCONCLUSIVE analysis (neither flagged nor cleared) with one
  Comment per failed rule; patient-level probability;
- evidence: the source series' instances and the SEG.

``ReferencedSegment`` is constructed directly: highdicom 0.28's
``ReferencedSegment.from_segmentation`` fails on one-segment BINARY and on LABELMAP SEGs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import highdicom as hd
from highdicom.sr.templates import Template
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID

from service.config import SegFormat
from service.findings import Findings, VertebraFinding
from service.imaging.volume import Volume
from service.outcomes import AnalysisResult
from service.results import codes, uids
from service.results.common import AlgorithmInfo, ResultBuildError, complete_type2
from service.results.seg import SegmentationResult
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9900
SR_SERIES_DESCRIPTION = "AI cervical spine fracture report (research, not for diagnosis)"
PATIENT_TRACKING_ID = "Cervical spine"
PATIENT_FINDING = "patient"
"""Finding name used to derive the patient-level group's tracking UID."""


def sr_kind(seg_format: SegFormat) -> ObjectKind:
    return ObjectKind.SR_LABELMAP if seg_format is SegFormat.LABELMAP else ObjectKind.SR


def _vertebra_evaluation(finding: VertebraFinding) -> Code:
    """Present when flagged; Indeterminate when the gate could not vouch for the level (the
    classifier's score there is not a finding either way); Absent otherwise."""
    if finding.suspected:
        return codes.PRESENT
    return codes.INDETERMINATE if finding.plausible is False else codes.ABSENT


def _patient_evaluation(findings: Findings) -> Code:
    if findings.patient_suspected or findings.suspected_vertebrae:
        return codes.PRESENT
    if findings.result is AnalysisResult.INCONCLUSIVE:
        return codes.INDETERMINATE
    return codes.ABSENT


def _add_comments(group: Template, texts: Sequence[str]) -> None:
    """Append TEXT "Comment" (DCM 121106) items to a measurement group's container.

    highdicom's group classes take no free text; the item itself is built by highdicom's
    ``TextContentItem`` and added to the group container's content (TID 1501 allows
    comments as TEXT).
    """
    if not texts:
        return
    container = group[0]
    for text in texts:
        container.ContentSequence.append(hd.sr.TextContentItem(
            name=codes.COMMENT, value=text[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _slice_references(volume: Volume,
                      z_indices: Sequence[int]) -> list[tuple[Dataset, list[int] | None]]:
    """(source header, 1-based frame numbers or None) for each distinct instance holding the
    given z slices, in z order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.headers}
    refs: dict[str, tuple[Dataset, list[int] | None]] = {}
    for z in sorted(set(z_indices)):
        if not 0 <= z < volume.shape[0]:
            raise ResultBuildError(f"slice index {z} outside the volume")
        uid = volume.sop_instance_uids[z]
        header = by_uid.get(uid)
        if header is None:
            raise ResultBuildError(f"no header for source instance {uid}")
        frame = volume.frame_numbers[z]
        if uid not in refs:
            refs[uid] = (header, [] if frame is not None else None)
        frames = refs[uid][1]
        if frames is not None and frame is not None:
            frames.append(frame)
    return list(refs.values())


def _vertebra_slices(finding: VertebraFinding) -> list[int]:
    if finding.slice_range is not None:
        first, last = finding.slice_range
        return list(range(first, last + 1))
    return list(finding.key_slices)


def _probability_measurement(value: float, key_refs: list[tuple[Dataset, list[int] | None]],
                             algorithm: AlgorithmInfo) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=codes.PROBABILITY,
        value=float(value),
        unit=codes.NO_UNITS,
        algorithm_id=algorithm.sr_algorithm(),
        referenced_images=[
            hd.sr.SourceImageForMeasurement(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=frames or None,
            )
            for ds, frames in key_refs
        ] or None,
    )


def _vertebra_group(
    volume: Volume,
    findings: Findings,
    finding: VertebraFinding,
    *,
    uid_root: str,
    algorithm: AlgorithmInfo,
    segmentation: SegmentationResult | None,
) -> (hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
      | hd.sr.MeasurementsAndQualitativeEvaluations):
    tracking = hd.sr.TrackingIdentifier(
        uid=uids.tracking_uid(uid_root, findings.uid_source, findings.model_version,
                              finding.vertebra),
        identifier=f"{finding.vertebra} vertebra",
    )
    region_refs = _slice_references(volume, _vertebra_slices(finding))
    key_refs = _slice_references(volume, finding.key_slices)
    measurements = (
        [_probability_measurement(finding.probability, key_refs, algorithm)]
        if finding.probability is not None else None
    )
    common: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": codes.FRACTURE,
        "algorithm_id": algorithm.sr_algorithm(),
        "finding_sites": [hd.sr.FindingSite(codes.vertebra_code(finding.vertebra))],
        "measurements": measurements,
        "qualitative_evaluations": [
            hd.sr.QualitativeEvaluation(codes.FRACTURE, _vertebra_evaluation(finding))
        ],
    }
    comments = ([f"Not vouched for by the anatomical plausibility gate: "
                 f"{', '.join(finding.plausibility_reasons)}"]
                if finding.plausible is False and finding.plausibility_reasons else [])
    segment_number = (segmentation.segment_numbers.get(finding.vertebra)
                      if segmentation is not None else None)
    if segmentation is not None and segment_number is not None:
        source_images = [
            hd.sr.SourceImageForSegmentation(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=frames or None,
            )
            for ds, frames in region_refs
        ]
        referenced_segment = hd.sr.ReferencedSegment(
            sop_class_uid=segmentation.sop_class_uid,
            sop_instance_uid=segmentation.sop_instance_uid,
            segment_number=segment_number,
            source_images=source_images or None,
            source_series=None if source_images else hd.sr.SourceSeriesForSegmentation(
                volume.series_instance_uid),
        )
        volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=referenced_segment, **common)
        _add_comments(volumetric, comments)
        return volumetric
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                referenced_frame_numbers=frames or None,
            )
            for ds, frames in region_refs
        ] or None,
        **common,
    )
    _add_comments(group, comments)
    return group


def _patient_group(volume: Volume, findings: Findings, *, uid_root: str,
                   algorithm: AlgorithmInfo) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    key_slices = [z for f in findings.vertebrae if f.suspected for z in f.key_slices]
    key_refs = _slice_references(volume, key_slices)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(uid_root, findings.uid_source,
                                  findings.model_version, PATIENT_FINDING),
            identifier=PATIENT_TRACKING_ID,
        ),
        finding_type=codes.FRACTURE,
        algorithm_id=algorithm.sr_algorithm(),
        finding_sites=[hd.sr.FindingSite(codes.CERVICAL_SPINE)],
        measurements=[_probability_measurement(findings.patient_probability, key_refs, algorithm)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.FRACTURE, _patient_evaluation(findings))
        ],
    )
    if findings.result is AnalysisResult.INCONCLUSIVE:
        _add_comments(group, [
            "INCONCLUSIVE: the model ran but the anatomy it found is not plausible; the study "
            "is neither flagged nor cleared.", *findings.inconclusive_text])
    return group


def build_report(
    volume: Volume,
    findings: Findings,
    *,
    uid_root: str,
    algorithm: AlgorithmInfo,
    segmentation: SegmentationResult | None,
    seg_format: SegFormat = SegFormat.BINARY,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 report; ``segmentation`` is the SEG the same destination receives
    (its format decides the SR's object kind and thus its UIDs)."""
    if findings.series_instance_uid != volume.series_instance_uid:
        raise ResultBuildError("findings and volume are from different series")
    if segmentation is not None and segmentation.kind is not (
            ObjectKind.SEG_LABELMAP if seg_format is SegFormat.LABELMAP else ObjectKind.SEG):
        raise ResultBuildError(f"SEG of kind {segmentation.kind} does not match {seg_format}")

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device_uid(uid_root, algorithm.name, algorithm.version),
        name=algorithm.name,
        manufacturer_name=algorithm.manufacturer,
        model_name=f"{algorithm.name} {algorithm.version}",
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE_OBSERVER),
            observer_identifying_attributes=device),
    )
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = [
        _vertebra_group(volume, findings, finding, uid_root=uid_root, algorithm=algorithm,
                        segmentation=segmentation)
        for finding in findings.vertebrae if finding.in_view
    ]
    groups.append(_patient_group(volume, findings, uid_root=uid_root, algorithm=algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.CT_UNSPECIFIED_BODY_REGION,
        imaging_measurements=groups,
        title=codes.IMAGING_MEASUREMENT_REPORT,
    )

    evidence: list[Dataset] = [complete_type2(ds) for ds in volume.headers]
    if segmentation is not None:
        evidence.append(segmentation.dataset)
    kind = sr_kind(seg_format)
    series_uid = findings.series_instance_uid
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid(uid_root, findings.uid_source,
                                                     findings.model_version, kind),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid(uid_root, findings.uid_source,
                                               findings.model_version, kind),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        series_description=SR_SERIES_DESCRIPTION,
    )
    logger.info("series %s: SR %s built, %d vertebra groups, patient suspected=%s",
                series_uid, kind, len(groups) - 1, findings.patient_suspected)
    return sr


def report_uid(uid_root: str, findings: Findings, seg_format: SegFormat) -> UID:
    """The SOP Instance UID :func:`build_report` gives (for lookups without building)."""
    return uids.sop_instance_uid(uid_root, findings.uid_source, findings.model_version,
                                 sr_kind(seg_format))
