"""Response schemas of ``GET /api/studies`` and ``GET /api/series/{uid}``.

What was received and what became of it, per series. These schemas deliberately carry no
patient identifiers (name, ID, birth date, accession): those are on the worklist and the
study page, whose reads are audited. All timestamps are aware UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.db.tables import AnalysisResult, AnalysisState, Priority, SeriesState


class PlausibilityFailure(BaseModel):
    """One failed rule of the anatomical plausibility gate (``service.inference.plausibility``)."""

    code: str
    """Stable reason code, e.g. ``LEVELS_OUT_OF_ORDER`` or ``LEVEL_EXTENT_OUT_OF_RANGE``."""
    level: str | None = None
    """The level it concerns (``C5``), or None for a rule about the whole column."""
    measured: float | None = None
    allowed: list[float | None] | None = None
    """[low, high] of the allowed range (either may be None), in the rule's unit."""
    unit: str | None = None
    detail: str = ""


class LevelResult(BaseModel):
    vertebra: str
    in_view: bool
    probability: float | None
    suspected: bool
    """Only a level that passed the gate in an in-order column is ever suspected."""
    plausible: bool | None
    """Whether the level passed the gate (None: not in view)."""
    reasons: list[str] = Field(default_factory=list)


class AnalysisSummary(BaseModel):
    id: int
    state: AnalysisState
    model_version: str
    input_fingerprint: str
    """SHA-256 of the sorted (SOP Instance UID, instance SHA-256) pairs analysed."""
    reason_code: str | None
    warnings: list[str] = Field(default_factory=list)
    """Image-QC and model warnings of a finished analysis (``GANTRY_TILT_RESAMPLED``,
    ``PARTIAL_VERTEBRA:C7``, ``LEVELS_OUT_OF_ORDER``, ...): why its findings deserve a
    closer look."""
    result: AnalysisResult | None = None
    """DONE only: FRACTURE_SUSPECTED, NO_FRACTURE_FOUND or INCONCLUSIVE (not cleared)."""
    failed_rules: list[PlausibilityFailure] = Field(default_factory=list)
    """The anatomical rules the segmentation failed: why a result is INCONCLUSIVE."""
    levels: list[LevelResult] = Field(default_factory=list)
    patient_probability: float | None = None
    attempts: int
    superseded_by_id: int | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class SeriesSummary(BaseModel):
    series_instance_uid: str
    series_number: int | None
    modality: str | None
    series_description: str | None
    state: SeriesState
    state_reason: str | None
    """Reason code when NOT_ANALYZABLE or FAILED (e.g. NOT_CERVICAL, NOT_SELECTED)."""
    qualified: bool | None
    """The qualification decision; ``None`` until the series is complete."""
    qualification_reason: str | None
    instance_count: int = Field(ge=0)
    """Distinct SOP Instance UIDs received."""
    expected_instances: int | None
    completion_reason: str | None
    """mpps, expected_count, number_of_frames, association_idle or idle (ingest.tracker)."""
    reopened_count: int
    selected: bool
    """The series of its study chosen for analysis."""
    acquired_at: datetime | None
    first_received_at: datetime | None
    last_received_at: datetime | None
    completed_at: datetime | None


class StudySummary(BaseModel):
    study_instance_uid: str
    study_date: str | None
    study_description: str | None
    priority: Priority
    selected_series_instance_uid: str | None
    selection_reason: str | None
    first_received_at: datetime | None
    last_received_at: datetime | None
    series: list[SeriesSummary]


class StudyList(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[StudySummary]


class SeriesDetail(SeriesSummary):
    study_instance_uid: str
    body_part_examined: str | None
    protocol_name: str | None
    frame_of_reference_uid: str | None
    bytes_received: int
    state_detail: str | None
    qualification_detail: str | None
    """The decision as a sentence."""
    qualification_metrics: dict[str, Any]
    """Measured values behind the decision (slices, thickness_mm, kernel, ...)."""
    duplicate_conflicts: int
    """Instances kept beside another with the same SOP Instance UID but different bytes."""
    association_released_at: datetime | None
    analyses: list[AnalysisSummary]
    """Newest first; superseded ones included."""
