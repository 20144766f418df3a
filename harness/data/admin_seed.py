"""Rows for the admin pages' tests: an analysis that FAILED, one NOT_ANALYZABLE, an export
that FAILED, written straight into the database on top of :mod:`harness.data.worklist_seed`'s
studies (no model run, no PACS)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from harness.data.worklist_seed import SeedStudy
from service.db.tables import (
    Analysis,
    AnalysisState,
    Export,
    ExportState,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow


def _analysis(session: Session, spec: SeedStudy) -> Analysis:
    return session.execute(
        select(Analysis).join(Series, Series.id == Analysis.series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Study.study_instance_uid == spec.uid)).scalar_one()


def make_failed(session: Session, spec: SeedStudy,
                error: str = "RuntimeError: ONNX Runtime session lost") -> int:
    """Turn the study's (seeded, DONE) analysis into a FAILED one; returns its id."""
    analysis = _analysis(session, spec)
    analysis.state = AnalysisState.FAILED
    analysis.result = None
    analysis.error = error
    analysis.attempts = 3
    analysis.finished_at = utcnow()
    analysis.series.state = SeriesState.FAILED
    analysis.series.state_reason = "ANALYSIS_FAILED"
    session.commit()
    return analysis.id


def make_not_analyzable(session: Session, spec: SeedStudy,
                        reason: str = "TOO_FEW_SLICES") -> int:
    analysis = _analysis(session, spec)
    analysis.state = AnalysisState.NOT_ANALYZABLE
    analysis.result = None
    analysis.reason_code = reason
    analysis.error = "12 slices, 20 needed"
    analysis.finished_at = utcnow()
    analysis.series.state = SeriesState.NOT_ANALYZABLE
    analysis.series.state_reason = reason
    session.commit()
    return analysis.id


def make_export_failed(session: Session, spec: SeedStudy, kind: str = "SEG",
                       error: str = "association rejected (permanent): called AE unknown"
                       ) -> int:
    """Mark one of the study's (seeded, SENT) exports FAILED; returns the export's id."""
    analysis = _analysis(session, spec)
    row = session.execute(select(Export).where(Export.analysis_id == analysis.id,
                                               Export.object_kind == kind)).scalar_one()
    row.state = ExportState.FAILED
    row.last_error = error
    row.attempts = 5
    row.sent_at = None
    session.commit()
    return row.id
