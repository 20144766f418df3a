"""Injected dependencies for routes (``Annotated`` aliases, as in the FastAPI template).

Who is calling: :data:`CurrentUser` (API: 401 without a session or token), :data:`AdminUser`
(403 for a radiologist), :data:`PageUser` (pages: a redirect to ``/login`` instead of a 401),
:data:`AdminPage` (admin pages: the redirect for anonymous callers, 403 for a radiologist),
:data:`OptionalUser` (``/healthz``: anonymous allowed). :data:`CsrfChecked` guards every
state-changing route: a caller authenticated by its session cookie must send the page's CSRF
token (form field or ``X-CSRF-Token`` header); a bearer-token caller has no ambient cookie
authority and needs none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.web.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    Actor,
    SessionCodec,
    actor_from_session,
    actor_from_token,
)


class LoginRequired(Exception):
    """A page was asked for without a login: answered with a redirect to ``/login``."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_session(request: Request) -> Iterator[Session]:
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        yield session


def get_codec(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.session_codec
    return codec


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SessionDep = Annotated[Session, Depends(get_session)]
CodecDep = Annotated[SessionCodec, Depends(get_codec)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def get_optional_user(request: Request, session: SessionDep, codec: CodecDep) -> Actor | None:
    """The caller, from a bearer token or else the session cookie; None when anonymous.

    A bearer header that names no valid token is an error (401), not anonymity: a machine
    client with a revoked token must hear so.
    """
    token = _bearer(request)
    if token is not None:
        actor = actor_from_token(session, token)
        if actor is None:
            raise HTTPException(status_code=401, detail="invalid or revoked token",
                                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        request.state.actor = actor
        return actor
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    data = codec.read(cookie)
    actor = actor_from_session(session, data) if data is not None else None
    if actor is not None:
        request.state.actor = actor
    return actor


OptionalUser = Annotated[Actor | None, Depends(get_optional_user)]


def get_current_user(actor: OptionalUser) -> Actor:
    if actor is None:
        raise HTTPException(status_code=401, detail="login required",
                            headers={"WWW-Authenticate": "Bearer"})
    return actor


def get_admin_user(actor: Annotated[Actor, Depends(get_current_user)]) -> Actor:
    if not actor.is_admin:
        raise HTTPException(status_code=403, detail="admin role required")
    return actor


def get_page_user(request: Request, actor: OptionalUser) -> Actor:
    if actor is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return actor


def get_admin_page_user(actor: Annotated[Actor, Depends(get_page_user)]) -> Actor:
    """An admin page: anonymous callers go to ``/login``, a radiologist is refused (403)."""
    if not actor.is_admin:
        raise HTTPException(status_code=403, detail="admin role required")
    return actor


CurrentUser = Annotated[Actor, Depends(get_current_user)]
AdminUser = Annotated[Actor, Depends(get_admin_user)]
PageUser = Annotated[Actor, Depends(get_page_user)]
AdminPage = Annotated[Actor, Depends(get_admin_page_user)]


async def check_csrf(request: Request, actor: OptionalUser, codec: CodecDep) -> None:
    if actor is None or actor.via != "session" or actor.session_id is None:
        return
    token = request.headers.get(CSRF_HEADER)
    if token is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        token = value if isinstance(value, str) else None
    if not codec.check_csrf(actor.session_id, token):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")


CsrfChecked = Depends(check_csrf)
"""Use as ``dependencies=[CsrfChecked]`` on every route that changes state."""


MAX_OFFSET = 1_000_000
"""Paging bound: keeps a generated offset inside what every database's integers hold."""
MAX_ID = 2**31 - 1

AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid session or API token"},
    403: {"description": "Role too low, or the CSRF token missing or wrong"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such object"}}
"""OpenAPI ``responses`` for routers behind login, and for routes that look an object up."""


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None
