"""Optional Secondary Capture key image: the most suspicious slice with the fracture marked.

For viewers that show neither SR nor SEG (setting ``secondary_capture``). The image is the
axial key slice of the vertebra with the highest suspected probability, in a bone window
(centre 400 HU, width 1800 HU), RGB, with the vertebra's bounding box drawn in red and a
short burned-in label (vertebra and probability; no patient data).
"""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from service.findings import Findings, VertebraFinding
from service.imaging.volume import Volume
from service.results import uids
from service.results.common import AlgorithmInfo, ResultBuildError, complete_type2
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)

KEY_IMAGE_SERIES_NUMBER = 9902
KEY_IMAGE_SERIES_DESCRIPTION = "AI key image (research, not for diagnosis)"
BONE_WINDOW_CENTER_HU = 400.0
BONE_WINDOW_WIDTH_HU = 1800.0
_MARK_RGB = (255, 0, 0)


def _key_finding(findings: Findings) -> VertebraFinding | None:
    suspected = [f for f in findings.vertebrae if f.suspected and f.in_view]
    if not suspected:
        return None
    return max(suspected, key=lambda f: f.probability or 0.0)


def _key_slice(finding: VertebraFinding) -> int:
    if finding.key_slices:
        return int(finding.key_slices[0])
    if finding.slice_range is not None:
        return (finding.slice_range[0] + finding.slice_range[1]) // 2
    if finding.bbox is not None:
        return (finding.bbox[0] + finding.bbox[3] - 1) // 2
    raise ResultBuildError(f"{finding.vertebra}: no key slice, range or box to show")


def render(volume: Volume, finding: VertebraFinding) -> np.ndarray:
    """RGB uint8 (rows, columns, 3) of the key slice with the box and label drawn."""
    z = _key_slice(finding)
    hu = volume.hu[z].astype(np.float32)
    low = BONE_WINDOW_CENTER_HU - BONE_WINDOW_WIDTH_HU / 2
    grey = np.clip((hu - low) / BONE_WINDOW_WIDTH_HU * 255.0, 0, 255).astype(np.uint8)
    image = Image.fromarray(grey, mode="L").convert("RGB")
    draw = ImageDraw.Draw(image)
    if finding.bbox is not None:
        _z0, y0, x0, _z1, y1, x1 = finding.bbox
        draw.rectangle([(x0, y0), (x1 - 1, y1 - 1)], outline=_MARK_RGB, width=2)
    probability = f" p={finding.probability:.2f}" if finding.probability is not None else ""
    draw.text((4, 4), f"{finding.vertebra} fracture?{probability} (AI, research)", fill=_MARK_RGB)
    return np.asarray(image, dtype=np.uint8)


def build_key_image(volume: Volume, findings: Findings, *, uid_root: str,
                    algorithm: AlgorithmInfo) -> hd.sc.SCImage | None:
    """The Secondary Capture key image, or ``None`` when no vertebra is suspected."""
    finding = _key_finding(findings)
    if finding is None:
        return None
    z = _key_slice(finding)
    if not 0 <= z < volume.shape[0]:
        raise ResultBuildError(f"key slice {z} outside the volume")
    source_uid = volume.sop_instance_uids[z]
    reference = next((ds for ds in volume.headers if str(ds.SOPInstanceUID) == source_uid), None)
    if reference is None:
        raise ResultBuildError(f"no header for key slice source {source_uid}")
    reference = complete_type2(reference)
    pixels = render(volume, finding)
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = reference.SOPClassUID
    source_item.ReferencedSOPInstanceUID = reference.SOPInstanceUID
    frame = volume.frame_numbers[z]
    if frame is not None:
        source_item.ReferencedFrameNumber = frame
    series_uid = findings.series_instance_uid
    kind = ObjectKind.KEY_IMAGE
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=uids.series_instance_uid(uid_root, findings.uid_source,
                                                     findings.model_version, kind),
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid(uid_root, findings.uid_source,
                                               findings.model_version, kind),
        instance_number=1,
        manufacturer=algorithm.manufacturer,
        pixel_spacing=None,
        patient_orientation=("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
    )
    # dciodvfy treats General Series Laterality (Type 2C, paired body parts) as required
    # when Body Part Examined is absent; the cervical spine is unpaired, so say what it is.
    image.BodyPartExamined = str(getattr(reference, "BodyPartExamined", "") or "CSPINE")
    image.BurnedInAnnotation = "YES"
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = "Key slice with suspected fracture marked by the algorithm"
    image.SourceImageSequence = [source_item]
    logger.info("series %s: key image for %s built", series_uid, finding.vertebra)
    return image
