"""Server-rendered pages (Jinja2): login, the worklist, the study page.

Pages redirect to ``/login`` when nobody is logged in; the fragment a page fetches answers 401
instead, and the page's script then goes to ``/login`` itself. Forms carry the CSRF token the
page was rendered with.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session

from service.db.tables import FeedbackVerdict, Priority
from service.findings import VERTEBRAE
from service.web import auth
from service.web.auth import Actor
from service.web.deps import (
    CodecDep,
    CsrfChecked,
    CurrentUser,
    OptionalUser,
    PageUser,
    SessionDep,
    SettingsDep,
    client_ip,
)
from service.web.images import ImagesUnavailable, image_path
from service.web.routes.worklist import audit_worklist_read, worklist_page
from service.web.study_schemas import FeedbackIn
from service.web.study_view import (
    BadFeedback,
    UnknownStudy,
    add_feedback,
    audit_study_read,
    study_detail,
    study_series,
)
from service.web.worklist_schemas import ReadingState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["pages"], include_in_schema=False)


def _templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.app.state.templates
    return templates


def _safe_next(value: str | None) -> str:
    """Only a path on this site: never ``//host`` or an absolute URL (open redirect)."""
    if (not value or not value.startswith("/") or value.startswith("//") or "\\" in value
            or any(ord(c) < 33 or ord(c) == 127 for c in value)):
        return "/"  # browsers drop tabs and newlines: "/\t/evil" would become "//evil"
    return value


def _secure(request: Request, secure_setting: bool | None) -> bool:
    return request.url.scheme == "https" if secure_setting is None else secure_setting


def _page(request: Request, name: str, actor: Actor | None, codec: auth.SessionCodec,
          status_code: int = 200, **context: Any) -> HTMLResponse:
    csrf = codec.csrf_token(actor.session_id) if actor and actor.session_id else ""
    response: HTMLResponse = _templates(request).TemplateResponse(
        request, name, {"actor": actor, "csrf_token": csrf, **context},
        status_code=status_code)
    response.headers["Cache-Control"] = "no-store"
    return response


# --- login / logout ------------------------------------------------------------------------


def _login_page(request: Request, codec: auth.SessionCodec, settings_secure: bool | None,
                next_url: str, error: str | None = None, status_code: int = 200,
                username: str = "") -> HTMLResponse:
    cookie, nonce = codec.login_nonce()
    response = _page(request, "login.html", None, codec, status_code=status_code,
                     login_csrf=codec.csrf_token(f"login:{nonce}"), next_url=next_url,
                     error=error, username=username)
    response.set_cookie(auth.LOGIN_COOKIE, cookie, max_age=3600, httponly=True,
                        samesite="strict", secure=_secure(request, settings_secure),
                        path="/login")
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, codec: CodecDep, settings: SettingsDep,
                     actor: OptionalUser,
                     next: Annotated[str | None, Query()] = None) -> Response:  # noqa: A002
    if actor is not None and actor.via == "session":
        return RedirectResponse(_safe_next(next), status_code=303)
    return _login_page(request, codec, settings.session_cookie_secure, _safe_next(next))


def _login(session: Session, settings: Any, username: str, password: str,
           ip: str | None) -> tuple[Any, auth.AuthError | None]:
    try:
        user = auth.authenticate(session, settings, username, password, ip)
    except auth.AuthError as exc:
        session.commit()  # the failed attempt stays in the audit trail
        return None, exc
    session.commit()
    return user, None


@router.post("/login", response_class=HTMLResponse)
async def login_submit(
    request: Request, session: SessionDep, settings: SettingsDep, codec: CodecDep,
    username: Annotated[str, Form(max_length=256)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form()] = "",
    next: Annotated[str, Form()] = "/",  # noqa: A002
) -> Response:
    next_url = _safe_next(next)
    nonce = codec.read_login_nonce(request.cookies.get(auth.LOGIN_COOKIE))
    if nonce is None or not codec.check_csrf(f"login:{nonce}", csrf_token):
        return _login_page(request, codec, settings.session_cookie_secure, next_url,
                           error="The login form expired; please try again.", status_code=403,
                           username=username)
    user, error = await run_in_threadpool(_login, session, settings, username, password,
                                          client_ip(request))
    if error is not None:
        throttled = isinstance(error, auth.LoginThrottled)
        message = ("Too many failed attempts; try again later." if throttled
                   else "Wrong user name or password.")
        return _login_page(request, codec, settings.session_cookie_secure, next_url,
                           error=message, status_code=429 if throttled else 401,
                           username=username)
    value, _session_id = codec.issue(user)
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(auth.SESSION_COOKIE, value, max_age=settings.session_max_age_s,
                        httponly=True, samesite="strict",
                        secure=_secure(request, settings.session_cookie_secure), path="/")
    response.delete_cookie(auth.LOGIN_COOKIE, path="/login")
    return response


def _audit_logout(session: Session, actor: Actor, ip: str | None) -> None:
    from service.audit import record

    record(session, "auth.logout", actor=actor.username, source_ip=ip)
    session.commit()


@router.post("/logout", dependencies=[CsrfChecked])
async def logout(request: Request, session: SessionDep, actor: CurrentUser,
                 settings: SettingsDep) -> Response:
    await run_in_threadpool(_audit_logout, session, actor, client_ip(request))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.SESSION_COOKIE, path="/", httponly=True, samesite="strict",
                           secure=_secure(request, settings.session_cookie_secure))
    return response


# --- worklist ------------------------------------------------------------------------------


def _filters(priority: list[Priority] | None, date_from: str | None, date_to: str | None,
             calling_ae: str | None, state: str | None) -> dict[str, Any]:
    def day(value: str | None) -> date | None:
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            return None

    try:
        reading = ReadingState(state) if state else None
    except ValueError:
        reading = None
    return {"priorities": priority or None, "date_from": day(date_from),
            "date_to": day(date_to), "calling_ae": (calling_ae or "").strip() or None,
            "state": reading}


def _rows(session: Session, actor: Actor, ip: str | None, filters: dict[str, Any]) -> Any:
    page = worklist_page(session, limit=200, **filters)
    audit_worklist_read(session, actor, ip, page)
    return page


PriorityFilter = Annotated[list[Priority] | None, Query()]
TextFilter = Annotated[str | None, Query(max_length=64)]


@router.get("/", response_class=HTMLResponse)
async def worklist(request: Request, session: SessionDep, settings: SettingsDep,
                   codec: CodecDep, actor: PageUser, priority: PriorityFilter = None,
                   date_from: TextFilter = None, date_to: TextFilter = None,
                   calling_ae: TextFilter = None, state: TextFilter = None) -> Response:
    filters = _filters(priority, date_from, date_to, calling_ae, state)
    page = await run_in_threadpool(_rows, session, actor, client_ip(request), filters)
    return _page(request, "worklist.html", actor, codec, page=page, filters=filters,
                 priorities=list(Priority), states=list(ReadingState),
                 poll_ms=int(settings.worklist_poll_s * 1000))


@router.get("/worklist/rows", response_class=HTMLResponse)
async def worklist_rows(request: Request, session: SessionDep, codec: CodecDep,
                        actor: CurrentUser, priority: PriorityFilter = None,
                        date_from: TextFilter = None, date_to: TextFilter = None,
                        calling_ae: TextFilter = None, state: TextFilter = None) -> Response:
    """The worklist's rows alone, for the page to swap in when the stamp changes."""
    filters = _filters(priority, date_from, date_to, calling_ae, state)
    page = await run_in_threadpool(_rows, session, actor, client_ip(request), filters)
    return _page(request, "_worklist_rows.html", actor, codec, page=page)


# --- study page ----------------------------------------------------------------------------


def _detail(session: Session, settings: Any, actor: Actor, ip: str | None, uid: str) -> Any:
    detail = study_detail(session, settings, uid)
    audit_study_read(session, actor, ip, uid)
    return detail


@router.get("/studies/{study_instance_uid}", response_class=HTMLResponse)
async def study_page(study_instance_uid: str, request: Request, session: SessionDep,
                     settings: SettingsDep, codec: CodecDep, actor: PageUser) -> Response:
    try:
        detail = await run_in_threadpool(_detail, session, settings, actor, client_ip(request),
                                         study_instance_uid)
    except UnknownStudy:
        return _page(request, "error.html", actor, codec, status_code=404,
                     message="No such study.")
    return _page(request, "study.html", actor, codec, study=detail, vertebrae=VERTEBRAE,
                 verdicts=list(FeedbackVerdict))


@router.post("/studies/{study_instance_uid}/feedback", dependencies=[CsrfChecked])
async def study_feedback(
    study_instance_uid: str, request: Request, session: SessionDep, actor: CurrentUser,
    verdict: Annotated[FeedbackVerdict, Form()],
    vertebra: Annotated[str, Form(max_length=8)] = "",
    comment: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """The study page's feedback form; back to the page (``#feedback``) when stored."""
    level = vertebra.strip().upper() or None
    if level is not None and level not in VERTEBRAE:
        raise HTTPException(status_code=422, detail="vertebra must be one of C1..C7")
    body = FeedbackIn.model_validate({"vertebra": level, "verdict": verdict,
                                      "comment": comment or None})
    try:
        await run_in_threadpool(add_feedback, session, study_instance_uid, actor,
                                client_ip(request), body)
    except UnknownStudy:
        raise HTTPException(status_code=404, detail="no such study") from None
    except BadFeedback as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return RedirectResponse(f"/studies/{study_instance_uid}#feedback", status_code=303)



def _image(session: Session, settings: Any, uid: str, view: str) -> Any:
    series = study_series(session, uid)
    if series is None:
        raise ImagesUnavailable("no series")
    return image_path(session, settings, series, view)


@router.get("/studies/{study_instance_uid}/images/{view}.png", response_class=FileResponse)
async def study_image(study_instance_uid: str, view: str, session: SessionDep,
                      settings: SettingsDep, actor: CurrentUser) -> Response:
    """A key image of the study (rendered once per analysis, then cached). No identifier is
    drawn on it; the page that shows it audited the read."""
    try:
        path = await run_in_threadpool(_image, session, settings, study_instance_uid, view)
    except (UnknownStudy, ImagesUnavailable):
        raise HTTPException(status_code=404, detail="no such image") from None
    return FileResponse(path, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=300"})
