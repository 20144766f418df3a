"""``GET /api/worklist``: studies by priority (STAT first), then by waiting time (longest
first). Thin: the query lives in :func:`worklist_page`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from service.audit import record
from service.db.tables import Analysis, AnalysisState, Finding, Priority, Series, Study
from service.db.types import utcnow
from service.web.deps import SessionDep
from service.web.worklist_schemas import WorklistItem, WorklistPage
from service.worklist.priority import PRIORITY_ORDER

router = APIRouter(prefix="/api", tags=["worklist"])


def _as_utc(value: datetime) -> datetime:
    from datetime import UTC

    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def worklist_page(session: Session, *, priorities: list[Priority] | None = None,
                  limit: int = 100, offset: int = 0,
                  now: datetime | None = None) -> WorklistPage:
    now = now or utcnow()
    first_received = (
        select(Series.study_id, func.min(Series.first_received_at).label("first_received"))
        .group_by(Series.study_id).subquery()
    )
    waiting_since = func.coalesce(first_received.c.first_received, Study.created_at)
    rank = case({p.value: i for i, p in enumerate(PRIORITY_ORDER)}, value=Study.priority,
                else_=len(PRIORITY_ORDER))
    base = select(Study, waiting_since.label("waiting_since")).outerjoin(
        first_received, first_received.c.study_id == Study.id)
    count_query = select(func.count(Study.id))
    if priorities:
        base = base.where(Study.priority.in_(priorities))
        count_query = count_query.where(Study.priority.in_(priorities))
    rows = session.execute(
        base.order_by(rank, waiting_since.asc(), Study.id).limit(limit).offset(offset)).all()
    total = int(session.execute(count_query).scalar_one())

    study_ids = [study.id for study, _ in rows]
    latest: dict[int, Analysis] = {}
    if study_ids:
        analyses = session.execute(
            select(Series.study_id, Analysis).join(Analysis, Analysis.series_id == Series.id)
            .where(Series.study_id.in_(study_ids),
                   Analysis.state != AnalysisState.SUPERSEDED)
            .order_by(Analysis.created_at, Analysis.id)).all()
        for study_id, candidate in analyses:
            latest[study_id] = candidate  # ordered: the last one wins
    suspected: dict[int, list[str]] = {}
    if latest:
        for analysis_id, vertebra in session.execute(
                select(Finding.analysis_id, Finding.vertebra)
                .where(Finding.analysis_id.in_([a.id for a in latest.values()]),
                       Finding.suspected.is_(True))
                .order_by(Finding.vertebra)).all():
            suspected.setdefault(analysis_id, []).append(vertebra)

    items = []
    for study, since in rows:
        since = _as_utc(since)
        analysis = latest.get(study.id)
        items.append(WorklistItem(
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
            study_date=study.study_date,
            study_description=study.study_description,
            priority=study.priority,
            priority_reason=study.priority_reason,
            flagged_at=study.flagged_at,
            waiting_since=since,
            waiting_s=max(0.0, (now - since).total_seconds()),
            analysis_state=analysis.state.value if analysis is not None else None,
            suspected_vertebrae=suspected.get(analysis.id, []) if analysis is not None else [],
            patient_probability=analysis.patient_probability if analysis is not None else None,
        ))
    return WorklistPage(generated_at=now, total=total, items=items)


@router.get("/worklist", response_model=WorklistPage)
async def get_worklist(
    request: Request,
    session: SessionDep,
    priority: Annotated[list[Priority] | None, Query(description="Only these priorities")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> WorklistPage:
    page = await run_in_threadpool(worklist_page, session, priorities=priority, limit=limit,
                                   offset=offset)
    await run_in_threadpool(_audit_read, session, request, page)
    return page


def _audit_read(session: Session, request: Request, page: WorklistPage) -> None:
    """The worklist shows patient names and IDs: every read is in the audit trail."""
    record(session, "worklist.view", actor=None,
           source_ip=request.client.host if request.client else None,
           details={"studies": [item.study_instance_uid for item in page.items][:200],
                    "total": page.total})
    session.commit()
