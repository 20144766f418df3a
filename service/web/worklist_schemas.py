"""Response schemas of ``GET /api/worklist`` (pydantic; never a database row)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from service.db.tables import AnalysisResult, Priority


class ReadingState(StrEnum):
    """Where a study stands with the radiologists (``study_review``)."""

    NEW = "new"
    ACKNOWLEDGED = "acknowledged"
    """Someone saw the flag and took the study; not yet reported."""
    READ = "read"
    UNREAD = "unread"
    """Filter only: new or acknowledged."""


class VertebraBadge(BaseModel):
    vertebra: str
    probability: float | None
    suspected: bool
    plausible: bool | None
    """False: the level failed the anatomical gate (its probability vouches for nothing)."""


class WorklistItem(BaseModel):
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None
    study_date: str | None
    study_description: str | None
    priority: Priority
    priority_reason: str | None
    flagged_at: datetime | None
    """When the priority last changed (UTC)."""
    waiting_since: datetime
    """First instance received for the study (UTC); the study's creation when unknown."""
    waiting_s: float = Field(ge=0)
    """Seconds between ``waiting_since`` and ``generated_at``."""
    analysis_state: str | None
    result: AnalysisResult | None = None
    """The latest analysis' answer: FRACTURE_SUSPECTED, NO_FRACTURE_FOUND or INCONCLUSIVE."""
    suspected_vertebrae: list[str]
    patient_probability: float | None
    levels: list[VertebraBadge] = Field(default_factory=list)
    """Every level in view of the latest analysis, C1 first."""
    calling_aes: list[str] = Field(default_factory=list)
    """Calling AE titles that sent the study's instances."""
    reading_state: ReadingState = ReadingState.NEW
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    read_by: str | None = None
    read_at: datetime | None = None


class WorklistPage(BaseModel):
    generated_at: datetime
    total: int
    items: list[WorklistItem]


class WorklistStamp(BaseModel):
    """Changes whenever anything the worklist shows changes; carries no patient data, so
    pages can poll it every few seconds without an audited read each time."""

    stamp: str
    generated_at: datetime
