"""A spooled series as a volume in Hounsfield units, with its geometry and provenance.

Contract used by inference (``hu``, spacing) and results (``headers``, ``sop_instance_uids``,
``affine``). Array order is (z, y, x): z is the slice index after sorting along the slice
normal (ascending projection of ImagePositionPatient on the normal of
ImageOrientationPatient), y the row, x the column. ``affine`` maps a homogeneous voxel index
``(z, y, x, 1)`` to patient coordinates in millimetres, DICOM LPS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from pydicom import Dataset


@dataclass
class Volume:
    hu: np.ndarray
    """(z, y, x) Hounsfield units, int16 or float32."""
    spacing: tuple[float, float, float]
    """(z, y, x) voxel spacing in mm; z from IPP projections, never from SliceThickness."""
    affine: np.ndarray
    """4x4: (z, y, x, 1) voxel index -> LPS mm."""
    sop_instance_uids: list[str]
    """SOP Instance UID of the source of each z slice (for multi-frame: repeated per frame)."""
    frame_numbers: list[int | None]
    """1-based frame number within ``sop_instance_uids[z]`` for multi-frame sources, else None."""
    headers: list[Dataset]
    """One source dataset per distinct SOP instance, pixel data removed (for SR/SEG references)."""
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    acquired_at: datetime | None
    warnings: list[str] = field(default_factory=list)
    """Stable codes of recoveries made while loading (e.g. POSITIONS_FROM_SLICE_LOCATION)."""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)
