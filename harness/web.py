"""Log a test client in: a bearer token for API tests, a real form login for page tests."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.db.session import make_engine, make_session_factory
from service.db.tables import Role, User
from service.web import auth

PASSWORD = "correct horse battery staple"


def make_user(db_url: str, username: str, role: Role = Role.RADIOLOGIST,
              password: str = PASSWORD) -> None:
    """Create the user unless it exists (idempotent, so tests can call it freely)."""
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            if session.query(User).filter_by(username=username).first() is None:
                auth.create_user(session, username, password, role, actor="test")
                session.commit()
    finally:
        engine.dispose()


def bearer(db_url: str, username: str = "api-client",
           role: Role = Role.RADIOLOGIST) -> dict[str, str]:
    """Headers with a fresh API token for ``username`` (created with ``role`` if new)."""
    make_user(db_url, username, role)
    engine = make_engine(db_url)
    try:
        with make_session_factory(engine)() as session:
            _row, token = auth.create_token(session, username, actor="test")
            session.commit()
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {token}"}


_CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')
_CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]*)"')


def login(client: TestClient, db_url: str, username: str = "rad",
          role: Role = Role.RADIOLOGIST, password: str = PASSWORD) -> str:
    """Log ``client`` in through the login form; returns the session's CSRF token."""
    make_user(db_url, username, role, password)
    page = client.get("/login")
    assert page.status_code == 200, page.text
    match = _CSRF_INPUT.search(page.text)
    assert match, "no CSRF token in the login form"
    response = client.post("/login", data={"username": username, "password": password,
                                           "csrf_token": match.group(1), "next": "/"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    home = client.get("/")
    assert home.status_code == 200, home.text
    meta = _CSRF_META.search(home.text)
    assert meta and meta.group(1), "no CSRF token on the worklist page"
    return meta.group(1)
