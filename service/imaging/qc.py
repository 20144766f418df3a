"""Stable reason codes for series that cannot be analyzed, and for recoveries made on load.

The values are what the dashboard shows and what ``Series.state_reason`` stores (at most 64
characters): never rename a member, only add new ones. A :class:`QcReason` refuses a series
(the worker turns a :class:`VolumeError` into ``NOT_ANALYZABLE(reason)``); a
:class:`QcWarning` records that something was repaired and the series was analyzed anyway
(``Volume.warnings``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum

logger = logging.getLogger(__name__)


class QcReason(StrEnum):
    """Why a series is not analyzable. Each member is a stable, dashboard-visible code."""

    NO_READABLE_INSTANCES = "NO_READABLE_INSTANCES"
    """No file of the series could be parsed as DICOM (unusable headers)."""
    NO_CT_IMAGES = "NO_CT_IMAGES"
    """Readable, but no instance is a CT image (CT, Enhanced CT, Legacy Converted Enhanced CT)."""
    MIXED_SERIES = "MIXED_SERIES"
    """Instances of more than one Series (or Study) Instance UID were handed over together."""
    UNSUPPORTED_PIXEL_FORMAT = "UNSUPPORTED_PIXEL_FORMAT"
    """Colour, float or otherwise non-monochrome integer pixel data."""
    INCONSISTENT_MATRIX = "INCONSISTENT_MATRIX"
    """Rows/Columns differ between slices."""
    INCONSISTENT_ORIENTATION = "INCONSISTENT_ORIENTATION"
    """Image Orientation (Patient) differs between slices."""
    NON_AXIAL = "NON_AXIAL"
    """The slice normal is further than 45 degrees from the patient's head-foot axis."""
    MISSING_PIXEL_SPACING = "MISSING_PIXEL_SPACING"
    """No Pixel Spacing and nothing to recover it from."""
    INCONSISTENT_PIXEL_SPACING = "INCONSISTENT_PIXEL_SPACING"
    """Pixel Spacing differs between slices."""
    INCONSISTENT_FRAME_OF_REFERENCE = "INCONSISTENT_FRAME_OF_REFERENCE"
    """Slices in different Frames of Reference: their positions cannot be combined."""
    MISSING_POSITIONS = "MISSING_POSITIONS"
    """Slice positions absent and not recoverable from Slice Location or Instance Number."""
    CONFLICTING_DUPLICATES = "CONFLICTING_DUPLICATES"
    """Two slices at the same position (or with the same SOP Instance UID) differ."""
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    """Fewer distinct axial slices than the configured minimum."""
    MISSING_SLICES = "MISSING_SLICES"
    """A gap between neighbouring slices exceeds 1.5 times the median spacing."""
    GANTRY_TILT_EXCESSIVE = "GANTRY_TILT_EXCESSIVE"
    """Gantry tilt beyond the configured limit (smaller tilts are resampled)."""
    UNDECODABLE_PIXEL_DATA = "UNDECODABLE_PIXEL_DATA"
    """Pixel data that no installed handler decodes, or of the wrong size."""
    NO_CERVICAL_SPINE = "NO_CERVICAL_SPINE"
    """Decided after segmentation: no cervical vertebra in view (a chest-only field of view,
    a head CT ending above C1): outside the service's scope, not a negative."""
    TOO_LITTLE_CERVICAL_SPINE = "TOO_LITTLE_CERVICAL_SPINE"
    """Decided after segmentation: some cervical vertebrae in view, fewer than the minimum:
    too little of the cervical spine to clear or flag; outside the service's scope."""


class QcWarning(StrEnum):
    """A recovery made while loading; the series is analyzed and the warning is recorded."""

    UNREADABLE_FILES_SKIPPED = "UNREADABLE_FILES_SKIPPED"
    UNSUPPORTED_INSTANCES_SKIPPED = "UNSUPPORTED_INSTANCES_SKIPPED"
    """Non-CT instances in the series (dose screens, SR, presentation states) were ignored."""
    LOCALIZER_DROPPED = "LOCALIZER_DROPPED"
    DUPLICATE_SLICES_DROPPED = "DUPLICATE_SLICES_DROPPED"
    ORIENTATION_FROM_OTHER_SLICES = "ORIENTATION_FROM_OTHER_SLICES"
    ORIENTATION_ASSUMED_AXIAL = "ORIENTATION_ASSUMED_AXIAL"
    """No slice carried Image Orientation (Patient); standard axial (1,0,0,0,1,0) assumed."""
    PIXEL_SPACING_RECOVERED = "PIXEL_SPACING_RECOVERED"
    """Pixel Spacing taken from other slices or from Reconstruction Diameter / Columns."""
    POSITIONS_FROM_SLICE_LOCATION = "POSITIONS_FROM_SLICE_LOCATION"
    POSITIONS_FROM_INSTANCE_NUMBER = "POSITIONS_FROM_INSTANCE_NUMBER"
    GANTRY_TILT_RESAMPLED = "GANTRY_TILT_RESAMPLED"
    """Sheared (tilted-gantry) stack resampled onto a regular axial grid."""
    IRREGULAR_SPACING_RESAMPLED = "IRREGULAR_SPACING_RESAMPLED"
    """Uneven slice spacing (below the missing-slice limit) resampled to uniform spacing."""


class VolumeError(Exception):
    """A series that cannot become a :class:`~service.imaging.volume.Volume`.

    ``reason`` is the stable code; ``detail`` is a short English explanation with slice
    indices, positions and UIDs, never patient identifiers.
    """

    def __init__(self, reason: QcReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[VolumeError], tuple[QcReason, str]]:
        # Celery and multiprocessing pickle exceptions; keep both arguments.
        return (type(self), (self.reason, self.detail))


CERVICAL_VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
DEFAULT_MIN_CERVICAL_VERTEBRAE = 3
"""A study showing fewer distinct cervical vertebrae than this is not a cervical-spine study."""


def check_cervical_spine(
    vertebrae_in_view: Iterable[str], *, min_vertebrae: int = DEFAULT_MIN_CERVICAL_VERTEBRAE,
    skull_base_in_view: bool = False,
) -> None:
    """Raise ``VolumeError`` when segmentation found no or too few cervical vertebrae.

    ``NO_CERVICAL_SPINE`` when none is in view, ``TOO_LITTLE_CERVICAL_SPINE`` when some but
    fewer than ``min_vertebrae`` are. ``vertebrae_in_view`` holds names such as ``"C2"`` (as
    in ``service.findings.VERTEBRAE``); other names (thoracic levels) are ignored.
    ``skull_base_in_view`` only words the detail (a head CT ending above the neck). Called
    by the worker after segmentation, before any flag: the loader cannot know it.
    """
    if min_vertebrae < 1:
        raise ValueError("min_vertebrae must be >= 1")
    found = sorted({v for v in vertebrae_in_view if v in CERVICAL_VERTEBRAE})
    if len(found) < min_vertebrae:
        listed = ", ".join(found) if found else "none"
        where = ("; the skull base is in view: the scan ends at or above the upper neck"
                 if skull_base_in_view else "")
        raise VolumeError(
            QcReason.TOO_LITTLE_CERVICAL_SPINE if found else QcReason.NO_CERVICAL_SPINE,
            f"{len(found)} cervical vertebra(e) in view ({listed}); "
            f"at least {min_vertebrae} needed to clear or flag the cervical spine{where}",
        )
