"""The study page's API: study detail, feedback, result downloads; who am I; API tokens;
users (admin). Every read that shows a patient identifier is audited with its actor."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import ApiToken, User
from service.web import auth
from service.web.deps import (
    AUTH_RESPONSES,
    MAX_ID,
    NOT_FOUND,
    AdminUser,
    CsrfChecked,
    CurrentUser,
    SessionDep,
    SettingsDep,
    client_ip,
)
from service.web.study_schemas import (
    FeedbackIn,
    FeedbackView,
    Me,
    StudyDetail,
    TokenCreate,
    TokenCreated,
    TokenView,
    UserView,
)
from service.web.study_view import (
    BadFeedback,
    UnknownStudy,
    add_feedback,
    audit_study_read,
    download_path,
    study_detail,
)

router = APIRouter(prefix="/api", tags=["reading"], responses=AUTH_RESPONSES)


@router.get("/studies/{study_instance_uid}", response_model=StudyDetail, responses=NOT_FOUND)
async def get_study(study_instance_uid: str, request: Request, session: SessionDep,
                    settings: SettingsDep, actor: CurrentUser) -> StudyDetail:
    try:
        detail = await run_in_threadpool(study_detail, session, settings, study_instance_uid)
    except UnknownStudy:
        raise HTTPException(status_code=404, detail="no such study") from None
    await run_in_threadpool(audit_study_read, session, actor, client_ip(request),
                            study_instance_uid)
    return detail


@router.post("/studies/{study_instance_uid}/feedback", response_model=FeedbackView,
             status_code=201, dependencies=[CsrfChecked], responses=NOT_FOUND)
async def post_feedback(study_instance_uid: str, body: FeedbackIn, request: Request,
                        session: SessionDep, actor: CurrentUser) -> FeedbackView:
    """Agree / disagree / missed on one vertebra (``vertebra``) or the study (null)."""
    try:
        return await run_in_threadpool(add_feedback, session, study_instance_uid, actor,
                                       client_ip(request), body)
    except UnknownStudy:
        raise HTTPException(status_code=404, detail="no such study") from None
    except BadFeedback as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None


@router.get("/studies/{study_instance_uid}/results/{kind}", response_class=FileResponse,
            responses={200: {"content": {"application/dicom": {}}}, **NOT_FOUND})
async def download_result(study_instance_uid: str,
                          kind: Annotated[str, Path(pattern="^(sr|seg)$")],
                          request: Request, session: SessionDep, settings: SettingsDep,
                          actor: CurrentUser) -> FileResponse:
    """The stored DICOM SR or SEG of the study's current analysis (audited: it names the
    patient)."""
    try:
        found = await run_in_threadpool(download_path, session, settings, study_instance_uid,
                                        kind)
    except UnknownStudy:
        raise HTTPException(status_code=404, detail="no such study") from None
    if found is None:
        raise HTTPException(status_code=404, detail=f"no {kind.upper()} stored for this study")
    path, analysis_id = found
    await run_in_threadpool(audit_study_read, session, actor, client_ip(request),
                            study_instance_uid, "result.download")
    return FileResponse(path, media_type="application/dicom",
                        filename=f"{kind}-{analysis_id}.dcm")


@router.get("/me", response_model=Me, tags=["auth"])
async def get_me(actor: CurrentUser) -> Me:
    return Me(username=actor.username, role=actor.role, via=actor.via)


def _token_views(session: Session, actor: auth.Actor) -> list[TokenView]:
    query = select(ApiToken, User.username).join(User, User.id == ApiToken.user_id)
    if not actor.is_admin:
        query = query.where(ApiToken.user_id == actor.user_id)
    return [TokenView(id=t.id, username=name, name=t.name, prefix=t.prefix,
                      created_at=t.created_at, expires_at=t.expires_at,
                      last_used_at=t.last_used_at, revoked_at=t.revoked_at)
            for t, name in session.execute(query.order_by(ApiToken.id)).all()]


@router.get("/tokens", response_model=list[TokenView], tags=["auth"])
async def list_tokens(session: SessionDep, actor: CurrentUser) -> list[TokenView]:
    """Your own API tokens (an admin sees everyone's); never the tokens themselves."""
    return await run_in_threadpool(_token_views, session, actor)


def _create_token(session: Session, actor: auth.Actor, name: str | None) -> TokenCreated:
    row, token = auth.create_token(session, actor.username, name=name, actor=actor.username)
    session.commit()
    return TokenCreated(id=row.id, username=actor.username, name=row.name, prefix=row.prefix,
                        created_at=row.created_at, expires_at=row.expires_at,
                        last_used_at=None, revoked_at=None, token=token)


@router.post("/tokens", response_model=TokenCreated, status_code=201, tags=["auth"],
             dependencies=[CsrfChecked])
async def create_token(body: TokenCreate, session: SessionDep,
                       actor: CurrentUser) -> TokenCreated:
    """A new token acting as you; the response is the only time it is shown."""
    return await run_in_threadpool(_create_token, session, actor, body.name)


def _revoke(session: Session, actor: auth.Actor, token_id: int) -> TokenView | None:
    row = session.get(ApiToken, token_id)
    if row is None or (row.user_id != actor.user_id and not actor.is_admin):
        return None
    auth.revoke_token(session, token_id, actor=actor.username)
    session.commit()
    owner = session.get(User, row.user_id)
    return TokenView(id=row.id, username=owner.username if owner else "", name=row.name,
                     prefix=row.prefix, created_at=row.created_at, expires_at=row.expires_at,
                     last_used_at=row.last_used_at, revoked_at=row.revoked_at)


@router.delete("/tokens/{token_id}", response_model=TokenView, tags=["auth"],
               dependencies=[CsrfChecked], responses=NOT_FOUND)
async def revoke_token(token_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep,
                       actor: CurrentUser) -> TokenView:
    """Revoke one of your tokens (an admin: anyone's). Effective at the next request."""
    view = await run_in_threadpool(_revoke, session, actor, token_id)
    if view is None:
        raise HTTPException(status_code=404, detail="no such token")
    return view


def _users(session: Session) -> list[UserView]:
    return [UserView(username=u.username, role=u.role, active=u.active,
                     created_at=u.created_at, last_login_at=u.last_login_at)
            for u in session.execute(select(User).order_by(User.username)).scalars()]


@router.get("/users", response_model=list[UserView], tags=["auth"])
async def list_users(session: SessionDep, actor: AdminUser) -> list[UserView]:
    """Admin: the local users (``triage user add`` creates them)."""
    return await run_in_threadpool(_users, session)
