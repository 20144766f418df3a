"""DICOM Segmentation of the cervical vertebrae (C1..C7), built with highdicom.

Default: BINARY, the form most PACS store and display, with uncompressed (bit-packed) frames.
LABELMAP (Label Map Segmentation Storage, a 2023 SOP class few PACS accept yet) is chosen per
destination (``PacsDestination.seg_format``). Frame encoding (:func:`transfer_syntax_for`,
``TRIAGE_SEG_ENCODING``): NATIVE = BINARY uncompressed, LABELMAP RLE Lossless; JPEG2000 =
both JPEG 2000 lossless. Measured with ``python -m bench.results`` (300 slices of 512x512):
JPEG 2000 encoding was two thirds of a BINARY build; highdicom's per-source-image IOD lookups
most of the rest (memoized by :mod:`service.results.hdcache`). highdicom accepts only
uncompressed or JPEG 2000 for BINARY (RLE and JPEG-LS only for LABELMAP/FRACTIONAL).

Segment numbers are consecutive from 1 over the vertebrae that the label map actually
contains, in C1..C7 order (a vertebra outside the field of view gets no segment); the
mapping is returned with the dataset so the SR can reference the right segment.
Frames follow the source images one-for-one (pixel-stripped headers suffice); when the
volume was resampled (``Volume.resampled``) the frames carry the volume's own geometry
instead. Empty frames are omitted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from service.config import SegEncoding, SegFormat
from service.findings import VERTEBRAE, Findings
from service.imaging.volume import Volume
from service.outcomes import AnalysisResult
from service.results import codes, hdcache, uids
from service.results.common import AlgorithmInfo, ResultBuildError, source_images
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)
hdcache.install()

SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "AI cervical vertebrae (research, not for diagnosis)"
SEG_CONTENT_LABEL = "CSPINE_VERTEBRAE"
SEG_CONTENT_DESCRIPTION = "Cervical vertebrae C1-C7, automatic (research software)"
SEG_SERIES_DESCRIPTION_INCONCLUSIVE = "AI vertebrae NOT PLAUSIBLE: review only (research)"
"""An INCONCLUSIVE analysis still sends its SEG: the radiologist (and the site's admin) can see
in the PACS what the model found and why the gate refused it (a "C5" running down the
thoracic spine); the series description and the per-segment labels say the levels are not
vouched for, so nobody reads them as anatomy. The SR carries the answer."""
UNVERIFIED_SUFFIX = " (not plausible)"

# Segment display colours (CIELab is derived by highdicom); one per vertebra, colour-blind safe.
_VERTEBRA_RGB: dict[str, tuple[int, int, int]] = {
    "C1": (230, 159, 0),
    "C2": (86, 180, 233),
    "C3": (0, 158, 115),
    "C4": (240, 228, 66),
    "C5": (0, 114, 178),
    "C6": (213, 94, 0),
    "C7": (204, 121, 167),
}


def transfer_syntax_for(seg_format: SegFormat, encoding: SegEncoding) -> UID:
    """The SEG's transfer syntax: see the module docstring and :class:`SegEncoding`."""
    if encoding is SegEncoding.JPEG2000:
        return JPEG2000Lossless
    return RLELossless if seg_format is SegFormat.LABELMAP else ExplicitVRLittleEndian


def seg_kind(seg_format: SegFormat) -> ObjectKind:
    return ObjectKind.SEG_LABELMAP if seg_format is SegFormat.LABELMAP else ObjectKind.SEG


@dataclass(frozen=True)
class SegmentationResult:
    """A built SEG and what the SR needs to reference it."""

    dataset: hd.seg.Segmentation
    kind: ObjectKind
    segment_numbers: dict[str, int]
    """Vertebra name -> segment number in ``dataset`` (only vertebrae with voxels)."""

    @property
    def sop_instance_uid(self) -> UID:
        return UID(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> UID:
        return UID(self.dataset.SOPClassUID)


def build_segmentation(
    volume: Volume,
    findings: Findings,
    *,
    uid_root: str,
    algorithm: AlgorithmInfo,
    seg_format: SegFormat = SegFormat.BINARY,
    transfer_syntax_uid: str | None = None,
) -> SegmentationResult | None:
    """Build the SEG from ``findings.label_map`` (uint8 (z, y, x), 0 background, i = C<i>).

    ``transfer_syntax_uid`` defaults to the NATIVE encoding of ``seg_format``.
    Returns ``None`` when the label map is absent or holds no vertebra: there is nothing to
    segment, and the SR then reports without a segment reference.
    Raises :class:`ResultBuildError` when the label map does not match the volume.
    """
    label_map = findings.label_map
    if label_map is None:
        logger.info("series %s: no label map, no SEG", findings.series_instance_uid)
        return None
    if label_map.shape != volume.shape:
        raise ResultBuildError(f"label map {label_map.shape} does not match volume {volume.shape}")
    if label_map.dtype != np.uint8:
        label_map = label_map.astype(np.uint8)

    if transfer_syntax_uid is None:
        transfer_syntax_uid = transfer_syntax_for(seg_format, SegEncoding.NATIVE)
    # Which labels occur, read only from the slices that hold any (a per-slice max is one
    # fast reduction): np.unique or np.bincount over all 78 M voxels cost seconds.
    occupied = np.flatnonzero(label_map.reshape(label_map.shape[0], -1).max(axis=1))
    occupied_labels = label_map[occupied]
    seen = np.zeros(256, dtype=bool)
    seen[occupied_labels.ravel()] = True
    present = [v for v in range(1, len(VERTEBRAE) + 1) if seen[v]]
    if not present:
        logger.info("series %s: label map holds no vertebra, no SEG", findings.series_instance_uid)
        return None

    # Remap label values to consecutive segment numbers; anything outside 1..7 is background.
    lut = np.zeros(256, dtype=np.uint8)
    segment_numbers: dict[str, int] = {}
    for number, label in enumerate(present, start=1):
        lut[label] = number
        segment_numbers[VERTEBRAE[label - 1]] = number
    # Remapped on the occupied slices only; the rest stays zero (np.zeros is lazily zeroed).
    segments = np.zeros(label_map.shape, dtype=np.uint8)
    segments[occupied] = lut[occupied_labels]

    sources = source_images(volume)
    pixel_array: np.ndarray | hd.Volume
    if volume.resampled:
        # The label map is on a corrected grid (gantry tilt, uneven spacing), not the source
        # slices: give highdicom the geometry (our affine maps (z, y, x) to LPS, its Volume
        # convention too) so every frame carries its own plane position; frames that happen
        # to coincide with a source slice still get a derivation reference.
        if volume.frame_of_reference_uid is None:
            raise ResultBuildError("resampled volume without a Frame of Reference UID")
        pixel_array = hd.Volume(array=segments, affine=volume.affine,
                                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                                frame_of_reference_uid=volume.frame_of_reference_uid)
    elif sources.z_order is not None:
        pixel_array = segments[sources.z_order]
    else:
        pixel_array = segments

    algorithm_id = algorithm.segmentation_algorithm()
    plausible = {v.vertebra: v.plausible for v in findings.vertebrae}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"{vertebra} vertebra" + (
                UNVERIFIED_SUFFIX if plausible.get(vertebra) is False else ""),
            segmented_property_category=codes.ANATOMICAL_STRUCTURE,
            segmented_property_type=codes.vertebra_code(vertebra),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=uids.tracking_uid(uid_root, findings.uid_source,
                                           findings.model_version, vertebra),
            tracking_id=f"{vertebra} vertebra",
            display_color=hd.color.CIELabColor.from_rgb(*_VERTEBRA_RGB[vertebra]),
        )
        for vertebra, number in segment_numbers.items()
    ]

    kind = seg_kind(seg_format)
    series_uid = findings.series_instance_uid
    dataset = hd.seg.Segmentation(
        source_images=sources.datasets,
        pixel_array=pixel_array,
        segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP
                           if seg_format is SegFormat.LABELMAP
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=uids.series_instance_uid(uid_root, findings.uid_source,
                                                     findings.model_version, kind),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid(uid_root, findings.uid_source,
                                               findings.model_version, kind),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        manufacturer_model_name=algorithm.name,
        software_versions=algorithm.software_versions,
        device_serial_number=algorithm.version,
        content_label=SEG_CONTENT_LABEL,
        content_description=SEG_CONTENT_DESCRIPTION,
        series_description=(SEG_SERIES_DESCRIPTION_INCONCLUSIVE
                            if findings.result is AnalysisResult.INCONCLUSIVE
                            else SEG_SERIES_DESCRIPTION),
        transfer_syntax_uid=transfer_syntax_uid,
        omit_empty_frames=True,
    )
    logger.info("series %s: SEG %s built, %d segments, %d frames, %s",
                series_uid, kind, len(segment_numbers), int(dataset.NumberOfFrames),
                UID(transfer_syntax_uid).name)
    return SegmentationResult(dataset=dataset, kind=kind, segment_numbers=segment_numbers)
