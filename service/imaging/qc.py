"""Quality-check outcomes of loading a series: refusals and recoveries.

A :class:`VolumeError` refuses a series with a :class:`~service.outcomes.SeriesReason` (the
one vocabulary of reasons, shared with the ingest rules; the worker turns it into
``NOT_ANALYZABLE(reason)``); a :class:`QcWarning` records that something was repaired and the
series was analyzed anyway (``Volume.warnings``). Warning values are stored and shown as
they are: never rename a member, only add new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from enum import StrEnum

from service.findings import VERTEBRAE
from service.outcomes import SeriesReason

logger = logging.getLogger(__name__)


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

    def __init__(self, reason: SeriesReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[VolumeError], tuple[SeriesReason, str]]:
        # Celery and multiprocessing pickle exceptions; keep both arguments.
        return (type(self), (self.reason, self.detail))


DEFAULT_MIN_CERVICAL_VERTEBRAE = 3
"""A study showing fewer distinct cervical vertebrae than this is not a cervical-spine study."""


def check_cervical_spine(
    vertebrae_in_view: Iterable[str], *, min_vertebrae: int = DEFAULT_MIN_CERVICAL_VERTEBRAE,
    skull_base_in_view: bool = False,
) -> None:
    """Raise ``VolumeError`` when segmentation found no or too few cervical vertebrae.

    ``NO_CERVICAL_SPINE`` when none is in view, ``TOO_LITTLE_CERVICAL_SPINE`` when some but
    fewer than ``min_vertebrae`` are. ``vertebrae_in_view`` holds names such as ``"C2"`` (as
    in :data:`service.findings.VERTEBRAE`, the one list of levels); other names (thoracic
    levels) are ignored.
    ``skull_base_in_view`` only words the detail (a head CT ending above the neck). Called
    by the worker after segmentation, before any flag: the loader cannot know it.
    """
    if min_vertebrae < 1:
        raise ValueError("min_vertebrae must be >= 1")
    found = sorted({v for v in vertebrae_in_view if v in VERTEBRAE})
    if len(found) < min_vertebrae:
        listed = ", ".join(found) if found else "none"
        where = ("; the skull base is in view: the scan ends at or above the upper neck"
                 if skull_base_in_view else "")
        raise VolumeError(
            SeriesReason.TOO_LITTLE_CERVICAL_SPINE if found else SeriesReason.NO_CERVICAL_SPINE,
            f"{len(found)} cervical vertebra(e) in view ({listed}); "
            f"at least {min_vertebrae} needed to clear or flag the cervical spine{where}",
        )
