"""SQLAlchemy 2 typed tables. The schema changes only through Alembic (``alembic/versions``).

Named ``tables`` because "models" means the ML models in this project.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db.types import UTCDateTime, utcnow
from service.outcomes import AnalysisResult as AnalysisResult  # the column type, re-exported

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


def _enum(cls: type[StrEnum]) -> Enum:
    # Stored as VARCHAR so adding a state never needs an ALTER TYPE on PostgreSQL.
    return Enum(cls, native_enum=False, length=32, validate_strings=True,
                values_callable=lambda e: [m.value for m in e])


class SeriesState(StrEnum):
    RECEIVING = "RECEIVING"
    COMPLETE = "COMPLETE"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    NOT_ANALYZABLE = "NOT_ANALYZABLE"
    FAILED = "FAILED"


class AnalysisState(StrEnum):
    PENDING = "PENDING"
    """Recorded but not yet on the broker (e.g. broker down); enqueued when it is back."""
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    NOT_ANALYZABLE = "NOT_ANALYZABLE"
    FAILED = "FAILED"
    SUPERSEDED = "SUPERSEDED"


class ExportState(StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    RETRYING = "RETRYING"
    FAILED = "FAILED"


class Priority(StrEnum):
    """Worklist priority; the order of declaration is the reading order."""

    STAT = "STAT"
    URGENT = "URGENT"
    INCONCLUSIVE = "INCONCLUSIVE"
    """Analyzed, but the anatomy the model found failed the plausibility gate: not cleared,
    not flagged; read with the ordinary list, never mistaken for "no fracture found"."""
    ROUTINE = "ROUTINE"
    NOT_ANALYZED = "NOT_ANALYZED"
    PENDING = "PENDING"


class Role(StrEnum):
    RADIOLOGIST = "RADIOLOGIST"
    ADMIN = "ADMIN"


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(32))
    study_description: Mapped[str | None] = mapped_column(String(128))
    referring_physician: Mapped[str | None] = mapped_column(String(324))
    priority: Mapped[Priority] = mapped_column(_enum(Priority), default=Priority.PENDING)
    priority_reason: Mapped[str | None] = mapped_column(String(256))
    flagged_at: Mapped[datetime | None]
    selected_series_id: Mapped[int | None] = mapped_column(Integer)
    """The series chosen for analysis when several qualify (no FK: avoids a cycle)."""
    selection_reason: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(128))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    protocol_name: Mapped[str | None] = mapped_column(String(128))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState), default=SeriesState.RECEIVING,
                                               index=True)
    state_reason: Mapped[str | None] = mapped_column(String(64))
    """Stable reason code for NOT_ANALYZABLE / FAILED (shown on the dashboard)."""
    state_detail: Mapped[str | None] = mapped_column(Text)
    qualified: Mapped[bool | None] = mapped_column(Boolean)
    qualification_reason: Mapped[str | None] = mapped_column(String(64))
    qualification_detail: Mapped[str | None] = mapped_column(Text)
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)
    last_association_id: Mapped[str | None] = mapped_column(String(64))
    association_released_at: Mapped[datetime | None]
    completion_reason: Mapped[str | None] = mapped_column(String(32))
    """Why the series was judged complete: mpps, expected_count, number_of_frames,
    association_idle, idle (``service.ingest.tracker.CompletionReason``)."""
    acquired_at: Mapped[datetime | None]
    first_received_at: Mapped[datetime | None]
    last_received_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")
    analyses: Mapped[list[Analysis]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str | None] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    spool_path: Mapped[str] = mapped_column(String(1024))
    """Path relative to the spool directory."""
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    duplicate_conflict: Mapped[bool] = mapped_column(Boolean, default=False)
    """Same SOP Instance UID as another instance but different bytes; both kept."""
    association_id: Mapped[str | None] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Analysis(Base):
    """One model run on one series, with its state and stage timestamps."""

    __tablename__ = "analysis"
    __table_args__ = (UniqueConstraint("series_id", "model_version", "input_fingerprint"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    """Hash of the sorted SOP Instance UIDs and their sha256: same input, same analysis."""
    state: Mapped[AnalysisState] = mapped_column(_enum(AnalysisState),
                                                 default=AnalysisState.PENDING, index=True)
    reason_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(64))
    execution_provider: Mapped[str | None] = mapped_column(String(64))
    patient_probability: Mapped[float | None] = mapped_column(Float)
    suspected: Mapped[bool | None] = mapped_column(Boolean)
    result: Mapped[AnalysisResult | None] = mapped_column(_enum(AnalysisResult))
    """Set when DONE: fracture suspected, no fracture found, or INCONCLUSIVE."""
    plausibility: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The anatomical gate's report: failed rules (code, level, measured, allowed range)."""
    superseded_by_id: Mapped[int | None] = mapped_column(Integer)
    stage_durations: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Seconds per stage: load, preprocess, segmentation, classification, results."""
    warnings: Mapped[list[Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    inferred_at: Mapped[datetime | None]
    results_stored_at: Mapped[datetime | None]
    exported_at: Mapped[datetime | None]
    flagged_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    series: Mapped[Series] = relationship(back_populates="analyses")
    findings: Mapped[list[Finding]] = relationship(back_populates="analysis",
                                                   cascade="all, delete-orphan")
    exports: Mapped[list[Export]] = relationship(back_populates="analysis",
                                                 cascade="all, delete-orphan")


class Finding(Base):
    """Per-vertebra result of one analysis."""

    __tablename__ = "finding"
    __table_args__ = (UniqueConstraint("analysis_id", "vertebra"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analysis.id", ondelete="CASCADE"),
                                             index=True)
    vertebra: Mapped[str] = mapped_column(String(8))
    in_view: Mapped[bool] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    suspected: Mapped[bool] = mapped_column(Boolean, default=False)
    plausible: Mapped[bool | None] = mapped_column(Boolean)
    """Whether the level passed the anatomical gate (None: not in view)."""
    plausibility_reasons: Mapped[list[Any] | None] = mapped_column(JSON)
    slice_start: Mapped[int | None] = mapped_column(Integer)
    slice_end: Mapped[int | None] = mapped_column(Integer)
    bbox: Mapped[list[Any] | None] = mapped_column(JSON)
    """Voxel bounding box [z0, y0, x0, z1, y1, x1] in the sorted volume."""
    key_slices: Mapped[list[Any] | None] = mapped_column(JSON)

    analysis: Mapped[Analysis] = relationship(back_populates="findings")


class Export(Base):
    """One result object sent to one destination."""

    __tablename__ = "export"
    __table_args__ = (UniqueConstraint("analysis_id", "object_kind", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analysis.id", ondelete="CASCADE"),
                                             index=True)
    object_kind: Mapped[str] = mapped_column(String(16))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str | None] = mapped_column(String(1024))
    destination: Mapped[str] = mapped_column(String(128))
    state: Mapped[ExportState] = mapped_column(_enum(ExportState), default=ExportState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    sent_at: Mapped[datetime | None]

    analysis: Mapped[Analysis] = relationship(back_populates="exports")


class MppsStatus(StrEnum):
    """Performed Procedure Step Status (0040,0252) of a Modality Performed Procedure Step."""

    IN_PROGRESS = "IN PROGRESS"
    COMPLETED = "COMPLETED"
    DISCONTINUED = "DISCONTINUED"


class PerformedProcedureStep(Base):
    """A Modality Performed Procedure Step received over N-CREATE / N-SET."""

    __tablename__ = "mpps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[MppsStatus] = mapped_column(_enum(MppsStatus), default=MppsStatus.IN_PROGRESS)
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    references: Mapped[list[PerformedProcedureStepReference]] = relationship(
        back_populates="step", cascade="all, delete-orphan")


class PerformedProcedureStepReference(Base):
    """One image an MPPS lists in its Performed Series Sequence."""

    __tablename__ = "mpps_reference"
    __table_args__ = (UniqueConstraint("mpps_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mpps_id: Mapped[int] = mapped_column(ForeignKey("mpps.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))

    step: Mapped[PerformedProcedureStep] = relationship(back_populates="references")


class AuditEvent(Base):
    """Append-only, hash-chained audit record (see ``service.audit``)."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_type_time", "event_type", "occurred_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    actor: Mapped[str | None] = mapped_column(String(128))
    """User name, or calling AE title for DICOM events."""
    source_ip: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class User(Base):
    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[Role] = mapped_column(_enum(Role), default=Role.RADIOLOGIST)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None]


class ApiToken(Base):
    """A bearer token for a machine client, acting as its user (``triage token create``).

    Only the SHA-256 of the token is stored; the token itself is shown once. A revoked or
    expired token, or one whose user is disabled, authenticates nobody.
    """

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id", ondelete="CASCADE"),
                                         index=True)
    name: Mapped[str | None] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    """The token's first characters, to tell tokens apart in listings (not a secret)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class FeedbackVerdict(StrEnum):
    AGREE = "AGREE"
    DISAGREE = "DISAGREE"
    MISSED = "MISSED"
    """A fracture the model did not report (per vertebra: on that level)."""


class Feedback(Base):
    """A radiologist's verdict on an analysis: per vertebra, or on the whole study."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    analysis_id: Mapped[int | None] = mapped_column(
        ForeignKey("analysis.id", ondelete="SET NULL"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id", ondelete="SET NULL"))
    username: Mapped[str] = mapped_column(String(64))
    vertebra: Mapped[str | None] = mapped_column(String(8))
    """``C1``..``C7``, or None for feedback on the study as a whole."""
    verdict: Mapped[FeedbackVerdict] = mapped_column(_enum(FeedbackVerdict))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StudyReview(Base):
    """Reading state of a study on the worklist: acknowledged (flag seen), then read."""

    __tablename__ = "study_review"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"),
                                          unique=True)
    acknowledged_at: Mapped[datetime | None]
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    read_at: Mapped[datetime | None]
    read_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
