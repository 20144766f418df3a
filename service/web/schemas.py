"""Response schemas of ``GET /api/studies`` and ``GET /api/series/{uid}``.

What was received and what became of it, per series. These schemas deliberately carry no
patient identifiers (name, ID, birth date, accession): until the dashboard adds login they are
served read-only on the web port. All timestamps are aware UTC.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from service.db.tables import AnalysisState, Priority, SeriesState


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
    """expected_count, mpps, association_idle or idle."""
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
