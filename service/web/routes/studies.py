"""``GET /api/studies`` and ``GET /api/series/{series_instance_uid}``: what was received.

Thin routes over two query functions that build the response schemas (never rows). They
need a logged-in actor; they show no patient identifier, so their reads are not audited.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.tables import Analysis, Instance, Series, SeriesState, Study
from service.web.deps import AUTH_RESPONSES, MAX_OFFSET, NOT_FOUND, CurrentUser, SessionDep
from service.web.schemas import (
    AnalysisSummary,
    SeriesDetail,
    SeriesSummary,
    StudyList,
    StudySummary,
)
from service.web.series_fields import failed_rules, level_results, series_fields

router = APIRouter(prefix="/api", tags=["studies"], responses=AUTH_RESPONSES)


def studies_page(session: Session, *, limit: int = 50, offset: int = 0,
                 state: SeriesState | None = None) -> StudyList:
    """Studies, most recently received first, each with all its series."""
    last = (select(Series.study_id, func.max(Series.last_received_at).label("last"),
                   func.min(Series.first_received_at).label("first"))
            .group_by(Series.study_id).subquery())
    query = select(Study, last.c.first, last.c.last).outerjoin(last, last.c.study_id == Study.id)
    count = select(func.count(Study.id))
    if state is not None:
        having = select(Series.study_id).where(Series.state == state)
        query = query.where(Study.id.in_(having))
        count = count.where(Study.id.in_(having))
    rows = session.execute(query.order_by(func.coalesce(last.c.last, Study.created_at).desc(),
                                          Study.id.desc()).limit(limit).offset(offset)).all()
    total = int(session.execute(count).scalar_one())
    study_ids = [study.id for study, _, _ in rows]
    by_study: dict[int, list[Series]] = {}
    if study_ids:
        for series in session.execute(select(Series).where(Series.study_id.in_(study_ids))
                                      .order_by(Series.series_number, Series.id)).scalars():
            by_study.setdefault(series.study_id, []).append(series)
    items = []
    for study, first, last_received in rows:
        series_list = by_study.get(study.id, [])
        selected_uid = next((s.series_instance_uid for s in series_list
                             if s.id == study.selected_series_id), None)
        items.append(StudySummary(
            study_instance_uid=study.study_instance_uid, study_date=study.study_date,
            study_description=study.study_description, priority=study.priority,
            selected_series_instance_uid=selected_uid, selection_reason=study.selection_reason,
            first_received_at=first, last_received_at=last_received,
            series=[SeriesSummary(**series_fields(s, study.selected_series_id))
                    for s in series_list]))
    return StudyList(total=total, limit=limit, offset=offset, items=items)


def _parse_detail(raw: str | None) -> tuple[str | None, dict[str, Any]]:
    if not raw:
        return None, {}
    try:
        data = json.loads(raw)
    except ValueError:
        return raw, {}
    if not isinstance(data, dict):
        return raw, {}
    metrics = data.get("metrics")
    return data.get("detail"), metrics if isinstance(metrics, dict) else {}


def series_detail(session: Session, series_instance_uid: str) -> SeriesDetail | None:
    row = session.execute(
        select(Series, Study.study_instance_uid, Study.selected_series_id)
        .join(Study, Study.id == Series.study_id)
        .where(Series.series_instance_uid == series_instance_uid)).one_or_none()
    if row is None:
        return None
    series, study_uid, selected_id = row
    conflicts = int(session.execute(
        select(func.count(Instance.id))
        .where(Instance.series_id == series.id, Instance.duplicate_conflict.is_(True)))
        .scalar_one())
    analyses = session.execute(select(Analysis).where(Analysis.series_id == series.id)
                               .order_by(Analysis.created_at.desc(), Analysis.id.desc())
                               ).scalars().all()
    detail, metrics = _parse_detail(series.qualification_detail)
    return SeriesDetail(
        **series_fields(series, selected_id),
        study_instance_uid=study_uid,
        body_part_examined=series.body_part_examined,
        protocol_name=series.protocol_name,
        frame_of_reference_uid=series.frame_of_reference_uid,
        bytes_received=series.bytes_received,
        state_detail=series.state_detail,
        qualification_detail=detail,
        qualification_metrics=metrics,
        duplicate_conflicts=conflicts,
        association_released_at=series.association_released_at,
        analyses=[AnalysisSummary(
            id=a.id, state=a.state, model_version=a.model_version,
            input_fingerprint=a.input_fingerprint, reason_code=a.reason_code,
            warnings=[str(w) for w in a.warnings or []], result=a.result,
            failed_rules=failed_rules(a), levels=level_results(a),
            patient_probability=a.patient_probability, attempts=a.attempts,
            superseded_by_id=a.superseded_by_id, created_at=a.created_at,
            queued_at=a.queued_at, started_at=a.started_at, finished_at=a.finished_at)
            for a in analyses],
    )


@router.get("/studies", response_model=StudyList)
async def get_studies(
    session: SessionDep,
    actor: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    state: Annotated[SeriesState | None,
                     Query(description="Only studies with a series in this state")] = None,
) -> StudyList:
    return await run_in_threadpool(studies_page, session, limit=limit, offset=offset,
                                   state=state)


@router.get("/series/{series_instance_uid}", response_model=SeriesDetail, responses=NOT_FOUND)
async def get_series(series_instance_uid: str, session: SessionDep,
                     actor: CurrentUser) -> SeriesDetail:
    detail = await run_in_threadpool(series_detail, session, series_instance_uid)
    if detail is None:
        raise HTTPException(status_code=404, detail="no such series")
    return detail
