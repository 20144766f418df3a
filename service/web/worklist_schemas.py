"""Response schemas of ``GET /api/worklist`` (pydantic; never a database row)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from service.db.tables import Priority


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
    suspected_vertebrae: list[str]
    patient_probability: float | None


class WorklistPage(BaseModel):
    generated_at: datetime
    total: int
    items: list[WorklistItem]
