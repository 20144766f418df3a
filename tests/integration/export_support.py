"""Shared setup for the export integration tests: a migrated database with one analysed
study (synthetic inputs), its result objects in the store, and helpers to read back state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from harness.data.results_inputs import SyntheticCase, make_case
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import (
    Analysis,
    AnalysisState,
    AuditEvent,
    Export,
    Series,
    SeriesState,
    Study,
)
from service.dicom.scu import export_targets, plan_exports
from service.results.build import build_and_store
from service.results.store import StoredObject
from service.results.uids import ObjectKind


@dataclass
class AnalysedStudy:
    case: SyntheticCase
    analysis_id: int
    stored: dict[ObjectKind, StoredObject]
    session_factory: sessionmaker[Session]


def analysed_study(settings: Settings, *, migrate_db: bool = True,
                   suspected: dict[str, float] | None = None,
                   n_slices: int = 40) -> AnalysedStudy:
    """Rows for a study/series/analysis, results built and stored, exports planned."""
    if migrate_db:
        migrate.upgrade(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    case = make_case(n_slices, 64, 64, suspected={"C2": 0.93} if suspected is None else suspected)
    stored = build_and_store(case.volume, case.findings, settings)
    with factory() as session:
        study = Study(study_instance_uid=case.volume.study_instance_uid, patient_id="SYNTH-001")
        series = Series(study=study, series_instance_uid=case.volume.series_instance_uid,
                        modality="CT", state=SeriesState.DONE)
        analysis = Analysis(series=series, model_version=case.findings.model_version,
                            input_fingerprint="f" * 64, state=AnalysisState.DONE)
        session.add_all([study, series, analysis])
        session.flush()
        plan_exports(session, analysis.id, stored, export_targets(settings))
        session.commit()
        analysis_id = analysis.id
    return AnalysedStudy(case=case, analysis_id=analysis_id, stored=stored,
                         session_factory=factory)


def export_rows(factory: sessionmaker[Session], analysis_id: int) -> list[Export]:
    with factory() as session:
        return list(session.execute(select(Export).where(Export.analysis_id == analysis_id)
                                    .order_by(Export.id)).scalars())


def audit_events(factory: sessionmaker[Session], prefix: str = "export.") -> list[AuditEvent]:
    with factory() as session:
        return [e for e in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()
                if e.event_type.startswith(prefix)]


def received_paths(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())
