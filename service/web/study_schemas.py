"""Schemas of the study page's API (``GET /api/studies/{uid}``, feedback, tokens, users).

Unlike ``service.web.schemas`` these carry patient identifiers: every route that returns them
needs a logged-in actor and audits the read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.tables import (
    AnalysisResult,
    AnalysisState,
    ExportState,
    FeedbackVerdict,
    Priority,
    Role,
)
from service.web.schemas import LevelResult, PlausibilityFailure, SeriesSummary
from service.web.worklist_schemas import ReadingState


class AnalysisView(BaseModel):
    id: int
    series_instance_uid: str
    state: AnalysisState
    result: AnalysisResult | None
    model_version: str
    reason_code: str | None
    warnings: list[str] = Field(default_factory=list)
    failed_rules: list[PlausibilityFailure] = Field(default_factory=list)
    levels: list[LevelResult] = Field(default_factory=list)
    """C1..C7, each once, in order (a level the model never saw is ``in_view=False``)."""
    patient_probability: float | None
    execution_provider: str | None
    stage_durations: dict[str, Any] = Field(default_factory=dict)
    """Seconds the worker spent per stage (load, preprocess, segmentation, ...)."""


class TimelineStage(BaseModel):
    stage: str
    """acquisition, received, complete, queued, analyzed, results_stored, sent, flagged."""
    label: str
    at: datetime | None
    since_previous_s: float | None
    """Seconds since the previous stage that has a time."""
    since_start_s: float | None
    """Seconds since acquisition (or first receipt when the acquisition time is unknown)."""


class Turnaround(BaseModel):
    stages: list[TimelineStage]
    total_s: float | None
    """Start to the last stage reached (flagged when done)."""
    from_receipt_s: float | None = None
    """First image received to the last stage reached: the service's own share (an old
    study routed today has a total of days, this stays minutes)."""
    band_s: tuple[float, float]
    """The reference band: 3-8 minutes for the commercial product."""
    verdict: str
    """``faster`` (below the band), ``within``, ``slower``, or ``in_progress``."""
    start_is_acquisition: bool
    """False when the header had no acquisition time and the first receipt stands in."""


class ExportView(BaseModel):
    destination: str
    object_kind: str
    state: ExportState
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    updated_at: datetime


Vertebra = Literal["C1", "C2", "C3", "C4", "C5", "C6", "C7"]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vertebra: Vertebra | None = Field(default=None, description="C1..C7, or null for the study")
    verdict: FeedbackVerdict
    comment: str | None = Field(default=None, max_length=2000)


class FeedbackView(BaseModel):
    id: int
    analysis_id: int | None
    username: str
    vertebra: str | None
    verdict: FeedbackVerdict
    comment: str | None
    created_at: datetime


class StudyDetail(BaseModel):
    study_instance_uid: str
    patient_name: str | None
    patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    priority: Priority
    priority_reason: str | None
    flagged_at: datetime | None
    reading_state: ReadingState
    acknowledged_by: str | None
    acknowledged_at: datetime | None
    read_by: str | None
    read_at: datetime | None
    selected_series_instance_uid: str | None
    series: list[SeriesSummary]
    analysis: AnalysisView | None
    """The selected series' current analysis (newest not superseded)."""
    turnaround: Turnaround | None
    exports: list[ExportView]
    downloads: list[str]
    """Result objects stored for the analysis: ``sr``, ``seg`` (download under the page)."""
    viewer_url: str | None
    feedback: list[FeedbackView]
    images: list[str] = Field(default_factory=list)
    """Key image views (``sagittal``, ``coronal``, ``axial-C2``...) the page can show, at
    ``/studies/{uid}/images/{view}.png``; empty when the series left the spool."""


class Me(BaseModel):
    username: str
    role: Role
    via: str


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=128)


class TokenView(BaseModel):
    id: int
    username: str
    name: str | None
    prefix: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenView):
    token: str
    """Shown once; only its SHA-256 is stored."""


class UserView(BaseModel):
    username: str
    role: Role
    active: bool
    created_at: datetime
    last_login_at: datetime | None
