"""The three answers of a finished analysis: one vocabulary for inference, database and web.

A bottom-layer module (no imports from the rest of the service) so that the database tables,
the inference contract (``service.findings``), the results and the web app name the
answer the same way without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class AnalysisResult(StrEnum):
    """The answer of a DONE analysis: three answers, shown apart everywhere."""

    FRACTURE_SUSPECTED = "FRACTURE_SUSPECTED"
    """A vertebra that passed the anatomical gate, in an in-order column, is above threshold."""
    NO_FRACTURE_FOUND = "NO_FRACTURE_FOUND"
    """Every level in view passed the gate and none is above threshold."""
    INCONCLUSIVE = "INCONCLUSIVE"
    """The model ran but the anatomy it found fails the plausibility rules
    (``service.inference.plausibility``): the study is neither flagged nor cleared."""


class SeriesReason(StrEnum):
    """Why a series is or is not analyzed (``NOT_ANALYZABLE(reason)``, ``FAILED``).

    Who says it: *rules* is the header check at ingest before queueing
    (:func:`service.ingest.rules.evaluate`), *load* the volume loader in the worker
    (:func:`service.imaging.volume.load_volume`), *scope* the worker after segmentation
    (:func:`service.imaging.qc.check_cervical_spine`). A code said by both rules and load
    means the same thing in both.
    """

    QUALIFIED = "QUALIFIED"
    """rules: an analyzable cervical-spine CT series (``qualification_reason`` only)."""
    NOT_SELECTED = "NOT_SELECTED"
    """rules: qualifies, but another series of the same study was preferred."""
    NO_READABLE_IMAGES = "NO_READABLE_IMAGES"
    """rules, load: no instance of the series could be parsed as DICOM (unusable headers)."""
    NOT_CT = "NOT_CT"
    """rules: the modality is not CT; load: readable, but no instance is a CT image (CT,
    Enhanced CT, Legacy Converted Enhanced CT)."""
    UNSUPPORTED_SOP_CLASS = "UNSUPPORTED_SOP_CLASS"
    """rules: a SOP class that is not a CT image the model reads."""
    LOCALIZER = "LOCALIZER"
    """rules: only localizer (scout) images."""
    DERIVED_IMAGE = "DERIVED_IMAGE"
    """rules: only derived or secondary images (reformats, screen captures)."""
    EXCLUDED_DESCRIPTION = "EXCLUDED_DESCRIPTION"
    """rules: the description names a non-diagnostic stack (the rules file's exclude words)."""
    NOT_CERVICAL = "NOT_CERVICAL"
    """rules: no cervical-spine keyword in the described fields (and not a partial-coverage
    or undescribed series, which the anatomy decides)."""
    CONFLICTING_DUPLICATES = "CONFLICTING_DUPLICATES"
    """rules: the same SOP Instance UID arrived with different content; load: two slices at
    the same position (or with the same SOP Instance UID) differ. Which one is right?"""
    MISSING_GEOMETRY = "MISSING_GEOMETRY"
    """rules: Image Orientation/Position (Patient) missing on some images."""
    MIXED_ORIENTATION = "MIXED_ORIENTATION"
    """rules, load: Image Orientation (Patient) differs between slices beyond the tolerance."""
    GANTRY_TILT = "GANTRY_TILT"
    """rules, load: gantry tilt beyond the configured limit (smaller tilts are resampled)."""
    NOT_AXIAL = "NOT_AXIAL"
    """rules, load: the slice normal is too far from the patient's head-foot axis (rules:
    the rules file's axial tolerance; load: 45 degrees)."""
    SLICE_TOO_THICK = "SLICE_TOO_THICK"
    """rules: slice thickness above the configured maximum."""
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    """rules, load: fewer distinct axial slices than the configured minimum."""
    INCONSISTENT_GEOMETRY = "INCONSISTENT_GEOMETRY"
    """rules: images differ in matrix or pixel spacing, or share a slice position."""
    MISSING_SLICES = "MISSING_SLICES"
    """rules, load: a gap between neighbouring slices beyond the allowed factor (1.5 by
    default) times the median spacing."""
    MIXED_SERIES = "MIXED_SERIES"
    """load: instances of more than one Series (or Study) Instance UID handed over together."""
    UNSUPPORTED_PIXEL_FORMAT = "UNSUPPORTED_PIXEL_FORMAT"
    """load: colour, float or otherwise non-monochrome integer pixel data."""
    INCONSISTENT_MATRIX = "INCONSISTENT_MATRIX"
    """load: Rows/Columns differ between slices."""
    MISSING_PIXEL_SPACING = "MISSING_PIXEL_SPACING"
    """load: no Pixel Spacing and nothing to recover it from."""
    INCONSISTENT_PIXEL_SPACING = "INCONSISTENT_PIXEL_SPACING"
    """load: Pixel Spacing differs between slices."""
    INCONSISTENT_FRAME_OF_REFERENCE = "INCONSISTENT_FRAME_OF_REFERENCE"
    """load: slices in different Frames of Reference: their positions cannot be combined."""
    MISSING_POSITIONS = "MISSING_POSITIONS"
    """load: slice positions absent and not recoverable from Slice Location or Instance
    Number."""
    UNDECODABLE_PIXEL_DATA = "UNDECODABLE_PIXEL_DATA"
    """load: pixel data that no installed handler decodes, or of the wrong size."""
    VOLUME_TOO_LARGE = "VOLUME_TOO_LARGE"
    """load: slices x Rows x Columns beyond the configured voxel limit (``max_volume_voxels``):
    refused from the headers, before the volume is allocated."""
    NO_CERVICAL_SPINE = "NO_CERVICAL_SPINE"
    """scope: no cervical vertebra in view after segmentation (a chest-only field of view, a
    head CT ending above C1): outside the service's scope, not a negative."""
    TOO_LITTLE_CERVICAL_SPINE = "TOO_LITTLE_CERVICAL_SPINE"
    """scope: some cervical vertebrae in view, fewer than the minimum: too little of the
    cervical spine to clear or flag; outside the service's scope."""
    ANALYSIS_FAILED = "ANALYSIS_FAILED"
    """worker: the analysis failed (``FAILED``; the error is in ``state_detail``)."""


class AnatomyReason(StrEnum):
    """Why the plausibility gate cannot vouch for a segmentation (an INCONCLUSIVE answer).

    Said by :func:`service.inference.plausibility.assess`; the rules' ranges and sources are
    in that module and in ``docs/anatomy-gate.md``.
    """

    LEVELS_OUT_OF_ORDER = "LEVELS_OUT_OF_ORDER"
    """Level centres do not follow C1, C2, ... down the spine's own axis."""
    LEVEL_SEQUENCE_GAP = "LEVEL_SEQUENCE_GAP"
    """A level is missing between two levels in view (C3 and C5 without C4)."""
    COLUMN_DISCONTINUOUS = "COLUMN_DISCONTINUOUS"
    """Neighbouring levels are too far apart along the axis, or side by side across it."""
    COLUMN_NOT_CRANIOCAUDAL = "COLUMN_NOT_CRANIOCAUDAL"
    """The column's axis lies more than 60 degrees from the patient's head-foot axis."""
    LEVEL_FRAGMENTED = "LEVEL_FRAGMENTED"
    """A level is more than one connected body."""
    LEVEL_EXTENT_OUT_OF_RANGE = "LEVEL_EXTENT_OUT_OF_RANGE"
    """Craniocaudal extent of a level outside the adult range."""
    LEVEL_VOLUME_OUT_OF_RANGE = "LEVEL_VOLUME_OUT_OF_RANGE"
    """Segmented volume of a level outside the adult range."""
    LEVEL_SPACING_OUT_OF_RANGE = "LEVEL_SPACING_OUT_OF_RANGE"
    """Centre-to-centre distance between neighbouring levels outside the adult range."""
    LEVELS_OVERLAP = "LEVELS_OVERLAP"
    """Neighbouring levels overlap along the axis beyond the tolerance."""
    LEVEL_NOT_BONE = "LEVEL_NOT_BONE"
    """Too little of the level's mask has bone density."""
    C1_NOT_UNDER_SKULL_BASE = "C1_NOT_UNDER_SKULL_BASE"
    """The skull base is in view and the level right under it is not C1 (the count is
    shifted), or C1 sits far below it."""


def failure_codes(plausibility: Mapping[str, Any] | None) -> list[str]:
    """``CODE`` or ``CODE:LEVEL`` of each failed rule in a gate report, distinct, in order.

    ``plausibility`` is ``AnatomyReport.as_dict()`` as the findings carry it and the
    ``analysis.plausibility`` column stores it.
    """
    out: list[str] = []
    failures = (plausibility or {}).get("failures") or []
    for failure in failures if isinstance(failures, list) else []:
        code = (f"{failure['code']}:{failure['level']}" if failure.get("level")
                else str(failure.get("code")))
        if code not in out:
            out.append(code)
    return out
