"""``GET /api/worklist``: studies by priority (STAT first), then by waiting time (longest
first); acknowledge / mark read. Thin: the queries live in :func:`worklist_page` and
:func:`worklist_stamp`.

The worklist shows patient names and IDs, so it needs a logged-in actor and every read of it
is audited with that actor (``worklist.view``). ``GET /api/worklist/stamp`` carries no patient
data: an open page polls it and fetches the list again only when it changes.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from service.audit import record
from service.db.tables import (
    Analysis,
    AnalysisState,
    Feedback,
    Finding,
    Instance,
    Priority,
    Series,
    Study,
    StudyReview,
)
from service.db.types import utcnow
from service.web.auth import Actor
from service.web.deps import (
    AUTH_RESPONSES,
    MAX_OFFSET,
    NOT_FOUND,
    CsrfChecked,
    CurrentUser,
    SessionDep,
    client_ip,
)
from service.web.worklist_schemas import (
    ReadingState,
    VertebraBadge,
    WorklistItem,
    WorklistPage,
    WorklistStamp,
)

router = APIRouter(prefix="/api", tags=["worklist"], responses=AUTH_RESPONSES)

PRIORITY_ORDER: tuple[Priority, ...] = tuple(Priority)
"""The reading order is the enum's declaration order (``service.worklist.priority`` uses the
same); taken from the table here so the web app imports nothing of the model side."""


def _as_utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def worklist_page(session: Session, *, priorities: list[Priority] | None = None,
                  limit: int = 100, offset: int = 0, now: datetime | None = None,
                  date_from: date | None = None, date_to: date | None = None,
                  calling_ae: str | None = None, state: ReadingState | None = None
                  ) -> WorklistPage:
    """One page of the worklist. ``date_from``/``date_to`` (inclusive, UTC days) filter on
    when the study started arriving; ``calling_ae`` on the AE title that sent it."""
    now = now or utcnow()
    first_received = (
        select(Series.study_id, func.min(Series.first_received_at).label("first_received"))
        .group_by(Series.study_id).subquery()
    )
    waiting_since = func.coalesce(first_received.c.first_received, Study.created_at)
    rank = case({p.value: i for i, p in enumerate(PRIORITY_ORDER)}, value=Study.priority,
                else_=len(PRIORITY_ORDER))
    base = (select(Study, waiting_since.label("waiting_since"))
            .outerjoin(first_received, first_received.c.study_id == Study.id)
            .outerjoin(StudyReview, StudyReview.study_id == Study.id))
    conditions: list[ColumnElement[bool]] = []
    if priorities:
        conditions.append(Study.priority.in_(priorities))
    if date_from is not None:
        conditions.append(waiting_since >= _day_start(date_from))
    if date_to is not None:
        conditions.append(waiting_since < _day_start(date_to) + timedelta(days=1))
    if calling_ae:
        conditions.append(Study.id.in_(
            select(Series.study_id).join(Instance, Instance.series_id == Series.id)
            .where(Instance.calling_ae == calling_ae)))
    if state == ReadingState.READ:
        conditions.append(StudyReview.read_at.is_not(None))
    elif state == ReadingState.ACKNOWLEDGED:
        conditions.append(StudyReview.acknowledged_at.is_not(None)
                          & StudyReview.read_at.is_(None))
    elif state == ReadingState.NEW:
        conditions.append(StudyReview.id.is_(None)
                          | (StudyReview.acknowledged_at.is_(None)
                             & StudyReview.read_at.is_(None)))
    elif state == ReadingState.UNREAD:
        conditions.append(StudyReview.id.is_(None) | StudyReview.read_at.is_(None))
    if conditions:
        base = base.where(*conditions)
    total = int(session.execute(select(func.count()).select_from(base.subquery())).scalar_one())
    rows = session.execute(
        base.order_by(rank, waiting_since.asc(), Study.id).limit(limit).offset(offset)).all()

    study_ids = [study.id for study, _ in rows]
    latest: dict[int, Analysis] = {}
    reviews: dict[int, StudyReview] = {}
    aes: dict[int, list[str]] = {}
    if study_ids:
        analyses = session.execute(
            select(Series.study_id, Analysis).join(Analysis, Analysis.series_id == Series.id)
            .where(Series.study_id.in_(study_ids),
                   Analysis.state != AnalysisState.SUPERSEDED)
            .order_by(Analysis.created_at, Analysis.id)).all()
        for study_id, candidate in analyses:
            latest[study_id] = candidate  # ordered: the last one wins
        reviews = {r.study_id: r for r in session.execute(
            select(StudyReview).where(StudyReview.study_id.in_(study_ids))).scalars()}
        for study_id, ae in session.execute(
                select(Series.study_id, Instance.calling_ae).distinct()
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(study_ids), Instance.calling_ae.is_not(None))
                .order_by(Instance.calling_ae)).all():
            if ae:
                aes.setdefault(study_id, []).append(ae)
    levels: dict[int, list[Finding]] = {}
    if latest:
        for finding in session.execute(
                select(Finding).where(Finding.analysis_id.in_([a.id for a in latest.values()]),
                                      Finding.in_view.is_(True))
                .order_by(Finding.vertebra)).scalars():
            levels.setdefault(finding.analysis_id, []).append(finding)

    items = []
    for study, since in rows:
        since = _as_utc(since)
        analysis = latest.get(study.id)
        found = levels.get(analysis.id, []) if analysis is not None else []
        review = reviews.get(study.id)
        reading = ReadingState.NEW
        if review is not None and review.read_at is not None:
            reading = ReadingState.READ
        elif review is not None and review.acknowledged_at is not None:
            reading = ReadingState.ACKNOWLEDGED
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
            result=analysis.result if analysis is not None else None,
            suspected_vertebrae=[f.vertebra for f in found if f.suspected],
            patient_probability=analysis.patient_probability if analysis is not None else None,
            levels=[VertebraBadge(vertebra=f.vertebra, probability=f.probability,
                                  suspected=f.suspected, plausible=f.plausible)
                    for f in found],
            calling_aes=aes.get(study.id, []),
            reading_state=reading,
            acknowledged_by=review.acknowledged_by if review else None,
            acknowledged_at=review.acknowledged_at if review else None,
            read_by=review.read_by if review else None,
            read_at=review.read_at if review else None,
        ))
    return WorklistPage(generated_at=now, total=total, items=items)


def worklist_stamp(session: Session) -> WorklistStamp:
    """A digest of the counts and latest change times of everything the worklist shows."""
    parts = [
        session.execute(select(func.count(Study.id), func.max(Study.updated_at))).one(),
        session.execute(select(func.count(Series.id), func.max(Series.updated_at))).one(),
        session.execute(select(func.count(Analysis.id), func.max(Analysis.finished_at),
                               func.max(Analysis.started_at))).one(),
        session.execute(select(func.count(StudyReview.id),
                               func.max(StudyReview.updated_at))).one(),
        session.execute(select(func.count(Feedback.id))).one(),
    ]
    digest = hashlib.sha256(repr([tuple(p) for p in parts]).encode()).hexdigest()[:16]
    return WorklistStamp(stamp=digest, generated_at=utcnow())


def audit_worklist_read(session: Session, actor: Actor, source_ip: str | None,
                        page: WorklistPage) -> None:
    """The worklist shows patient names and IDs: every read is in the audit trail."""
    record(session, "worklist.view", actor=actor.username, source_ip=source_ip,
           details={"studies": [item.study_instance_uid for item in page.items][:200],
                    "total": page.total, "via": actor.via})
    session.commit()


class UnknownStudy(LookupError):
    pass


def set_reading_state(session: Session, study_instance_uid: str, actor: Actor,
                      source_ip: str | None, *, read: bool, undo: bool = False) -> None:
    """Acknowledge (``read=False``) or mark read; ``undo`` clears that mark. Audited."""
    study = session.execute(select(Study).where(
        Study.study_instance_uid == study_instance_uid)).scalar_one_or_none()
    if study is None:
        raise UnknownStudy(study_instance_uid)
    review = session.execute(select(StudyReview).where(
        StudyReview.study_id == study.id)).scalar_one_or_none()
    if review is None:
        review = StudyReview(study_id=study.id, updated_at=utcnow())
        session.add(review)
    now = utcnow()
    if read:
        review.read_at, review.read_by = (None, None) if undo else (now, actor.username)
        if not undo and review.acknowledged_at is None:
            review.acknowledged_at, review.acknowledged_by = now, actor.username
    else:
        review.acknowledged_at, review.acknowledged_by = ((None, None) if undo
                                                          else (now, actor.username))
    review.updated_at = now
    event = ("study.read" if read else "study.acknowledge") + (".undo" if undo else "")
    record(session, event, actor=actor.username, source_ip=source_ip,
           study_instance_uid=study_instance_uid, details={"via": actor.via})
    session.commit()


@router.get("/worklist", response_model=WorklistPage)
async def get_worklist(
    request: Request,
    session: SessionDep,
    actor: CurrentUser,
    priority: Annotated[list[Priority] | None, Query(description="Only these priorities")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    date_from: Annotated[date | None, Query(description="First day (UTC) received")] = None,
    date_to: Annotated[date | None, Query(description="Last day (UTC) received")] = None,
    calling_ae: Annotated[str | None, Query(description="Sending AE title")] = None,
    state: Annotated[ReadingState | None, Query(description="Reading state")] = None,
) -> WorklistPage:
    page = await run_in_threadpool(worklist_page, session, priorities=priority, limit=limit,
                                   offset=offset, date_from=date_from, date_to=date_to,
                                   calling_ae=calling_ae, state=state)
    await run_in_threadpool(audit_worklist_read, session, actor, client_ip(request), page)
    return page


@router.get("/worklist/stamp", response_model=WorklistStamp)
async def get_worklist_stamp(session: SessionDep, actor: CurrentUser) -> WorklistStamp:
    return await run_in_threadpool(worklist_stamp, session)


async def _mark(request: Request, session: Session, actor: Actor, uid: str, *, read: bool,
                undo: bool) -> dict[str, str]:
    try:
        await run_in_threadpool(set_reading_state, session, uid, actor, client_ip(request),
                                read=read, undo=undo)
    except UnknownStudy:
        raise HTTPException(status_code=404, detail="no such study") from None
    return {"study_instance_uid": uid, "status": "ok"}


@router.post("/studies/{study_instance_uid}/acknowledge", dependencies=[CsrfChecked],
             responses=NOT_FOUND)
async def acknowledge_study(study_instance_uid: str, request: Request, session: SessionDep,
                            actor: CurrentUser, undo: bool = False) -> dict[str, str]:
    """The flag was seen and someone has the study (``undo=true`` clears it)."""
    return await _mark(request, session, actor, study_instance_uid, read=False, undo=undo)


@router.post("/studies/{study_instance_uid}/read", dependencies=[CsrfChecked],
             responses=NOT_FOUND)
async def mark_study_read(study_instance_uid: str, request: Request, session: SessionDep,
                          actor: CurrentUser, undo: bool = False) -> dict[str, str]:
    """The study is reported (``undo=true`` puts it back on the unread list)."""
    return await _mark(request, session, actor, study_instance_uid, read=True, undo=undo)
