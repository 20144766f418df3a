"""The study page's data: one study with its analysis, timeline, exports and feedback.

Query functions build schemas (never rows) and raise domain errors (:class:`UnknownStudy`,
:class:`BadFeedback`); the routes audit and translate.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.audit import record
from service.config import Settings
from service.db.tables import Analysis, AnalysisState, Export, Feedback, Series, Study, StudyReview
from service.db.types import utcnow
from service.findings import VERTEBRAE
from service.results.store import ResultStore
from service.results.uids import ObjectKind
from service.web.auth import Actor
from service.web.images import views_for
from service.web.schemas import SeriesSummary
from service.web.series_fields import failed_rules, level_results, series_fields
from service.web.study_schemas import (
    AnalysisView,
    ExportView,
    FeedbackIn,
    FeedbackView,
    StudyDetail,
    TimelineStage,
    Turnaround,
)
from service.web.worklist_schemas import ReadingState

logger = logging.getLogger(__name__)

DOWNLOAD_KINDS = {"sr": ObjectKind.SR, "seg": ObjectKind.SEG}


class UnknownStudy(LookupError):
    pass


class BadFeedback(ValueError):
    pass


def _study(session: Session, study_instance_uid: str) -> Study:
    study = session.execute(select(Study).where(
        Study.study_instance_uid == study_instance_uid)).scalar_one_or_none()
    if study is None:
        raise UnknownStudy(study_instance_uid)
    return study


def current_analysis(session: Session, study: Study) -> tuple[Series | None, Analysis | None]:
    """The series the study is read from (selected, else the newest analysed) and its newest
    analysis that is not superseded."""
    series_list = list(session.execute(select(Series).where(Series.study_id == study.id)
                                       .order_by(Series.id)).scalars())
    candidates = [s for s in series_list if s.id == study.selected_series_id] or series_list
    best: tuple[Series | None, Analysis | None] = (candidates[0] if candidates else None, None)
    for series in candidates:
        analysis = session.execute(
            select(Analysis).where(Analysis.series_id == series.id,
                                   Analysis.state != AnalysisState.SUPERSEDED)
            .order_by(Analysis.created_at.desc(), Analysis.id.desc()).limit(1)
        ).scalar_one_or_none()
        if analysis is not None and (best[1] is None or analysis.created_at > best[1].created_at):
            best = (series, analysis)
    return best


STAGES: tuple[tuple[str, str], ...] = (
    ("acquisition", "acquired"), ("received", "last image received"),
    ("complete", "series complete"), ("queued", "queued"), ("analyzed", "analyzed"),
    ("flagged", "flagged"), ("results_stored", "results stored"), ("sent", "sent to PACS"),
)
"""In the worker's order: the worklist flag is raised as soon as findings exist, and the SR
and SEG follow it (``service.worker``), so the turnaround is acquisition -> flag and the
paperwork after it is shown, not counted."""


def turnaround(series: Series, analysis: Analysis | None,
               band_s: tuple[float, float]) -> Turnaround:
    """The stage timeline: each stage's time, the step from the one before and the total."""
    times: dict[str, datetime | None] = {
        "acquisition": series.acquired_at,
        "received": series.last_received_at,
        "complete": series.completed_at,
        "queued": analysis.queued_at if analysis else None,
        "analyzed": analysis.inferred_at if analysis else None,
        "results_stored": analysis.results_stored_at if analysis else None,
        "sent": analysis.exported_at if analysis else None,
        "flagged": analysis.flagged_at if analysis else None,
    }
    start = series.acquired_at or series.first_received_at
    stages: list[TimelineStage] = []
    previous: datetime | None = None
    last: datetime | None = None
    for key, label in STAGES:
        at = times[key]
        stages.append(TimelineStage(
            stage=key, label=label, at=at,
            since_previous_s=(at - previous).total_seconds() if at and previous else None,
            since_start_s=(at - start).total_seconds() if at and start else None))
        if at is not None:
            previous = at
            last = at
    end = times["flagged"] or last
    total = (end - start).total_seconds() if end and start else None
    done = times["flagged"] is not None or (
        analysis is not None and analysis.state in (AnalysisState.DONE, AnalysisState.FAILED,
                                                    AnalysisState.NOT_ANALYZABLE)
        and analysis.finished_at is not None)
    if not done or total is None:
        verdict = "in_progress"
    elif total < band_s[0]:
        verdict = "faster"
    elif total <= band_s[1]:
        verdict = "within"
    else:
        verdict = "slower"
    receipt = series.first_received_at
    from_receipt = (end - receipt).total_seconds() if end and receipt else None
    return Turnaround(stages=stages, total_s=total, from_receipt_s=from_receipt,
                      band_s=band_s, verdict=verdict,
                      start_is_acquisition=series.acquired_at is not None)


def result_path(settings: Settings, series: Series, analysis: Analysis, kind: str) -> Path | None:
    """Where the result object of ``kind`` (``sr``/``seg``) lies, if it was stored."""
    object_kind = DOWNLOAD_KINDS.get(kind)
    if object_kind is None:
        return None
    path = ResultStore.from_settings(settings).path_for(series.series_instance_uid,
                                                       analysis.model_version, object_kind)
    return path if path.is_file() else None


def viewer_url(settings: Settings, study: Study, series: Series | None) -> str | None:
    template = settings.viewer_url_template
    if not template:
        return None
    values = {"study_instance_uid": study.study_instance_uid,
              "series_instance_uid": series.series_instance_uid if series else "",
              "accession_number": study.accession_number or ""}
    try:
        return template.format(**{k: quote(v, safe="") for k, v in values.items()})
    except (KeyError, IndexError, ValueError):
        logger.warning("viewer_url_template has an unknown placeholder")
        return None


def study_detail(session: Session, settings: Settings, study_instance_uid: str) -> StudyDetail:
    study = _study(session, study_instance_uid)
    series_list = list(session.execute(select(Series).where(Series.study_id == study.id)
                                       .order_by(Series.series_number, Series.id)).scalars())
    series, analysis = current_analysis(session, study)
    review = session.execute(select(StudyReview).where(
        StudyReview.study_id == study.id)).scalar_one_or_none()
    reading = ReadingState.NEW
    if review is not None and review.read_at is not None:
        reading = ReadingState.READ
    elif review is not None and review.acknowledged_at is not None:
        reading = ReadingState.ACKNOWLEDGED
    exports: list[ExportView] = []
    downloads: list[str] = []
    view: AnalysisView | None = None
    if analysis is not None and series is not None:
        view = AnalysisView(
            id=analysis.id, series_instance_uid=series.series_instance_uid,
            state=analysis.state, result=analysis.result, model_version=analysis.model_version,
            reason_code=analysis.reason_code, warnings=[str(w) for w in analysis.warnings or []],
            failed_rules=failed_rules(analysis), levels=level_results(analysis),
            patient_probability=analysis.patient_probability,
            execution_provider=analysis.execution_provider,
            stage_durations=dict(analysis.stage_durations or {}))
        exports = [ExportView(destination=e.destination, object_kind=e.object_kind,
                              state=e.state, attempts=e.attempts, last_error=e.last_error,
                              sent_at=e.sent_at, updated_at=e.updated_at)
                   for e in session.execute(select(Export).where(Export.analysis_id ==
                                                                 analysis.id)
                                            .order_by(Export.destination, Export.object_kind)
                                            ).scalars()]
        downloads = [k for k in DOWNLOAD_KINDS if result_path(settings, series, analysis, k)]
    feedback = [FeedbackView(id=f.id, analysis_id=f.analysis_id, username=f.username,
                             vertebra=f.vertebra, verdict=f.verdict, comment=f.comment,
                             created_at=f.created_at)
                for f in session.execute(select(Feedback).where(Feedback.study_id == study.id)
                                         .order_by(Feedback.created_at.desc(),
                                                   Feedback.id.desc())).scalars()]
    selected_uid = next((s.series_instance_uid for s in series_list
                         if s.id == study.selected_series_id), None)
    return StudyDetail(
        study_instance_uid=study.study_instance_uid, patient_name=study.patient_name,
        patient_id=study.patient_id, patient_birth_date=study.patient_birth_date,
        patient_sex=study.patient_sex, accession_number=study.accession_number,
        study_date=study.study_date, study_time=study.study_time,
        study_description=study.study_description, priority=study.priority,
        priority_reason=study.priority_reason, flagged_at=study.flagged_at,
        reading_state=reading,
        acknowledged_by=review.acknowledged_by if review else None,
        acknowledged_at=review.acknowledged_at if review else None,
        read_by=review.read_by if review else None,
        read_at=review.read_at if review else None,
        selected_series_instance_uid=selected_uid,
        series=[SeriesSummary(**series_fields(s, study.selected_series_id))
                for s in series_list],
        analysis=view,
        turnaround=turnaround(series, analysis, settings.turnaround_band_s) if series else None,
        exports=exports, downloads=downloads, viewer_url=viewer_url(settings, study, series),
        feedback=feedback, images=views_for(session, settings, series))


def audit_study_read(session: Session, actor: Actor, source_ip: str | None,
                     study_instance_uid: str, event: str = "study.view") -> None:
    record(session, event, actor=actor.username, source_ip=source_ip,
           study_instance_uid=study_instance_uid, details={"via": actor.via})
    session.commit()


def add_feedback(session: Session, study_instance_uid: str, actor: Actor,
                 source_ip: str | None, feedback: FeedbackIn) -> FeedbackView:
    """Store one verdict (on a vertebra, or the study when ``vertebra`` is None); audited."""
    vertebra = feedback.vertebra.strip().upper() if feedback.vertebra else None
    if vertebra is not None and vertebra not in VERTEBRAE:
        raise BadFeedback(f"vertebra must be one of {', '.join(VERTEBRAE)}")
    comment = (feedback.comment or "").strip() or None
    study = _study(session, study_instance_uid)
    _series, analysis = current_analysis(session, study)
    row = Feedback(study_id=study.id, analysis_id=analysis.id if analysis else None,
                   user_id=actor.user_id, username=actor.username, vertebra=vertebra,
                   verdict=feedback.verdict, comment=comment, created_at=utcnow())
    session.add(row)
    session.flush()
    record(session, "feedback.create", actor=actor.username, source_ip=source_ip,
           study_instance_uid=study_instance_uid,
           details={"feedback_id": row.id, "analysis_id": row.analysis_id,
                    "vertebra": vertebra, "verdict": feedback.verdict.value,
                    "has_comment": comment is not None})
    session.commit()
    return FeedbackView(id=row.id, analysis_id=row.analysis_id, username=row.username,
                        vertebra=row.vertebra, verdict=row.verdict, comment=row.comment,
                        created_at=row.created_at)


def study_series(session: Session, study_instance_uid: str) -> Series | None:
    """The series the study is read from (see :func:`current_analysis`)."""
    series, _analysis = current_analysis(session, _study(session, study_instance_uid))
    return series


def download_path(session: Session, settings: Settings, study_instance_uid: str,
                  kind: str) -> tuple[Path, int] | None:
    """(path, analysis id) of a stored result object of the study's current analysis."""
    study = _study(session, study_instance_uid)
    series, analysis = current_analysis(session, study)
    if series is None or analysis is None:
        return None
    path = result_path(settings, series, analysis, kind)
    return (path, analysis.id) if path is not None else None
