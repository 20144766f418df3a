"""The admin's audit page (search, CSV export, chain status) and status page (queues,
workers, disks, failures, retry and resend).

Thin routes over :mod:`service.audit.search` and :mod:`service.web.admin_status`. Pages need
an admin: nobody logged in goes to ``/login``, a radiologist gets 403. Both pages show study
UIDs and patient IDs, so each view (and each CSV export) is itself an audit event with its
actor, like a worklist read. The two actions are form posts with the page's CSRF token.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from celery import Celery
from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record
from service.audit.search import (
    AuditQuery,
    chain_status,
    csv_lines,
    event_types,
    iter_events,
    search,
)
from service.config import Settings
from service.queue import make_celery
from service.web.admin_status import (
    ActionRefused,
    ActionResult,
    UnknownObject,
    audit_status_read,
    resend_export,
    retry_analysis,
    status_snapshot,
)
from service.web.auth import Actor
from service.web.deps import (
    MAX_ID,
    MAX_OFFSET,
    AdminPage,
    AdminUser,
    CodecDep,
    CsrfChecked,
    SessionDep,
    SettingsDep,
    client_ip,
)

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"], include_in_schema=False)

PAGE_SIZE = 50
CSV_MAX_ROWS = 1_000_000


def _templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.app.state.templates
    return templates


def _page(request: Request, name: str, actor: Actor, codec: Any,
          **context: Any) -> HTMLResponse:
    csrf = codec.csrf_token(actor.session_id) if actor.session_id else ""
    response: HTMLResponse = _templates(request).TemplateResponse(
        request, name, {"actor": actor, "csrf_token": csrf, **context})
    response.headers["Cache-Control"] = "no-store"
    return response


def _celery_factory(request: Request, settings: Settings) -> Any:
    """The web process's Celery app (made once, on first use): only to send tasks by name."""
    def factory() -> Celery:
        app: Celery | None = getattr(request.app.state, "celery", None)
        if app is None:
            app = make_celery(settings)
            request.app.state.celery = app
        return app
    return factory


# --- audit ---------------------------------------------------------------------------------


def _moment(value: str | None, *, end: bool = False) -> datetime | None:
    """``2026-12-03`` or ``2026-12-03T14:05`` (UTC unless an offset is given); a bare date
    as ``until`` means the end of that day. Unreadable: None (the filter is ignored)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(),
                                      tzinfo=UTC)
            return moment
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


Text = Annotated[str | None, Query(max_length=128)]


def _audit_query(actor: str | None, event_type: str | None, subject: str | None,
                 outcome: str | None, since: str | None, until: str | None) -> AuditQuery:
    def clean(value: str | None) -> str | None:
        return (value or "").strip() or None

    return AuditQuery(actor=clean(actor), event_type=clean(event_type), subject=clean(subject),
                      outcome=clean(outcome), since=_moment(since),
                      until=_moment(until, end=True))


def _filters_dict(raw: dict[str, str | None]) -> dict[str, str]:
    return {k: v.strip() for k, v in raw.items() if v and v.strip()}


def _audit_page_data(session: Session, settings: Settings, actor: Actor, ip: str | None,
                     query: AuditQuery, filters: dict[str, str],
                     offset: int) -> dict[str, Any]:
    page = search(session, query, limit=PAGE_SIZE, offset=offset)
    chain = chain_status(session, settings.audit_anchor_path)
    types = event_types(session)
    shown = [e.study_instance_uid for e in page.events if e.study_instance_uid]
    record(session, "audit.view", actor=actor.username, source_ip=ip,
           details={"filters": filters, "total": page.total, "offset": offset,
                    "studies": list(dict.fromkeys(shown))[:200],
                    "chain_intact": chain.intact, "via": actor.via})
    session.commit()
    return {"page": page, "chain": chain, "event_types": types}


@router.get("/admin/audit", response_class=HTMLResponse)
async def audit_page(request: Request, session: SessionDep, settings: SettingsDep,
                     codec: CodecDep, actor: AdminPage, user: Text = None, event_type: Text = None,
                     subject: Text = None, outcome: Text = None, since: Text = None,
                     until: Text = None,
                     offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0) -> Response:
    raw = {"user": user, "event_type": event_type, "subject": subject, "outcome": outcome,
           "since": since, "until": until}
    query = _audit_query(user, event_type, subject, outcome, since, until)
    filters = _filters_dict(raw)
    data = await run_in_threadpool(_audit_page_data, session, settings, actor,
                                   client_ip(request), query, filters, offset)
    base = urlencode(filters)
    return _page(request, "admin_audit.html", actor, codec, filters=filters, query_string=base,
                 offset=offset, page_size=PAGE_SIZE, **data)


def _audit_export(session: Session, actor: Actor, ip: str | None, query: AuditQuery,
                  filters: dict[str, str]) -> None:
    record(session, "audit.export", actor=actor.username, source_ip=ip,
           details={"filters": filters, "format": "csv", "via": actor.via})
    session.commit()


@router.get("/admin/audit.csv")
async def audit_csv(request: Request, session: SessionDep, actor: AdminUser,
                    user: Text = None, event_type: Text = None, subject: Text = None,
                    outcome: Text = None, since: Text = None, until: Text = None) -> Response:
    """Every matching event, oldest first, as CSV (the export is audited before it starts)."""
    raw = {"user": user, "event_type": event_type, "subject": subject, "outcome": outcome,
           "since": since, "until": until}
    query = _audit_query(user, event_type, subject, outcome, since, until)
    filters = _filters_dict(raw)
    await run_in_threadpool(_audit_export, session, actor, client_ip(request), query, filters)
    factory: sessionmaker[Session] = request.app.state.session_factory

    def body() -> Any:
        with factory() as stream_session:
            yield from csv_lines(iter_events(stream_session, query, max_rows=CSV_MAX_ROWS))

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="audit-{stamp}.csv"',
        "Cache-Control": "no-store"})


# --- status --------------------------------------------------------------------------------


NOTICES = {
    "retry_queued": "Analysis {id} queued again.",
    "retry_pending": "Analysis {id} is PENDING: the broker did not take it; the tracker "
                     "sends it when the broker is back.",
    "resend_queued": "Export {id} queued again.",
    "resend_failed": "Export {id} was not queued: the broker is unreachable.",
}


def _status_data(session: Session, settings: Settings, actor: Actor,
                 ip: str | None) -> Any:
    snapshot = status_snapshot(session, settings)
    audit_status_read(session, actor.username, ip, snapshot)
    return snapshot


@router.get("/admin/status", response_class=HTMLResponse)
async def status_page(request: Request, session: SessionDep, settings: SettingsDep,
                      codec: CodecDep, actor: AdminPage,
                      notice: Annotated[str | None, Query(max_length=32)] = None,
                      id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None  # noqa: A002
                      ) -> Response:
    snapshot = await run_in_threadpool(_status_data, session, settings, actor,
                                       client_ip(request))
    message = NOTICES[notice].format(id=id) if notice in NOTICES and id else None
    return _page(request, "admin_status.html", actor, codec, status=snapshot,
                 notice=message, notice_ok=bool(notice and notice.endswith("_queued")))


def _after(result: ActionResult, kind: str, object_id: int) -> Response:
    code = f"{kind}_queued" if result.queued else (
        "retry_pending" if kind == "retry" else "resend_failed")
    return RedirectResponse(f"/admin/status?notice={code}&id={object_id}", status_code=303)


ObjectId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post("/admin/analyses/{analysis_id}/retry", dependencies=[CsrfChecked])
async def retry(analysis_id: ObjectId, request: Request, settings: SettingsDep,
                actor: AdminUser) -> Response:
    """Put a FAILED or NOT_ANALYZABLE analysis back on the analysis queue (audited)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    try:
        result = await run_in_threadpool(
            retry_analysis, factory, settings, analysis_id, actor=actor.username,
            source_ip=client_ip(request), app_factory=_celery_factory(request, settings))
    except UnknownObject as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except ActionRefused as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return _after(result, "retry", analysis_id)


@router.post("/admin/exports/{export_id}/resend", dependencies=[CsrfChecked])
async def resend(export_id: ObjectId, request: Request, settings: SettingsDep,
                 actor: AdminUser) -> Response:
    """Send a FAILED (or still RETRYING) export again (audited)."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    try:
        result = await run_in_threadpool(
            resend_export, factory, export_id, actor=actor.username,
            source_ip=client_ip(request), app_factory=_celery_factory(request, settings))
    except UnknownObject as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except ActionRefused as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return _after(result, "resend", export_id)
