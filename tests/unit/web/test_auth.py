"""Login, sessions, tokens and the CLI that manages them, against a real migrated database."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from harness.data.worklist_seed import FRACTURED, seed
from harness.web import PASSWORD, bearer, login, make_user
from service.cli import build_parser
from service.db.session import make_engine, make_session_factory
from service.db.tables import ApiToken, AuditEvent, Role, User
from service.web import auth
from service.web.app import create_app


def _form_token(client: TestClient) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert match
    return match.group(1)


def _attempt(client: TestClient, username: str, password: str) -> Any:
    return client.post("/login", data={"username": username, "password": password,
                                       "csrf_token": _form_token(client)},
                       follow_redirects=False)


def _events(url: str, event_type: str) -> list[AuditEvent]:
    with make_session_factory(make_engine(url))() as session:
        return list(session.execute(select(AuditEvent).where(
            AuditEvent.event_type == event_type).order_by(AuditEvent.id)).scalars())


@pytest.fixture
def app_url(settings_factory, migrated_url: str):  # type: ignore[no-untyped-def]
    settings = settings_factory(database_url=migrated_url, login_max_failures=3,
                                login_ip_max_failures=6)
    return create_app(settings), migrated_url


def test_session_cookie_flags_and_audited_login(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    make_user(url, "rad")
    with TestClient(app) as client:
        response = _attempt(client, "rad", PASSWORD)
        assert response.status_code == 303 and response.headers["location"] == "/"
        cookie = next(v for k, v in response.headers.multi_items()
                      if k == "set-cookie" and v.startswith(auth.SESSION_COOKIE))
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Secure" not in cookie, "plain http: no Secure flag (the browser would drop it)"
    with TestClient(app, base_url="https://testserver") as client:
        cookie = next(v for k, v in _attempt(client, "rad", PASSWORD).headers.multi_items()
                      if k == "set-cookie" and v.startswith(auth.SESSION_COOKIE))
        assert "Secure" in cookie, "over TLS the session cookie is Secure"
    logins = _events(url, "auth.login")
    assert [(e.actor, e.outcome) for e in logins] == [("rad", "success")] * 2


def test_lockout_after_failures_and_rate_limit_per_address(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    make_user(url, "rad")
    with TestClient(app) as client:
        for _ in range(3):
            assert _attempt(client, "rad", "not the password").status_code == 401
        locked = _attempt(client, "rad", PASSWORD)
        assert locked.status_code == 429, "locked: even the right password is refused"
        assert "Too many failed attempts" in locked.text
        for name in ("ghost1", "ghost2"):
            assert _attempt(client, name, "whatever!").status_code == 401
        # 6 failures from this address now (3 + the locked try + 2): the address is refused.
        make_user(url, "other")
        assert _attempt(client, "other", PASSWORD).status_code == 429
    reasons = [(e.actor, e.outcome, (e.details or {}).get("reason"))
               for e in _events(url, "auth.login")]
    assert reasons[:4] == [("rad", "failure", "bad_credentials")] * 3 + [
        ("rad", "failure", "locked")]
    assert reasons[-1] == ("other", "failure", "rate_limited")
    assert all(PASSWORD not in str(e.details) for e in _events(url, "auth.login"))


def test_password_change_and_disable_end_sessions_and_tokens(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    headers = bearer(url, "rad")
    factory = make_session_factory(make_engine(url))
    with TestClient(app) as client:
        login(client, url, "rad")
        assert client.get("/api/me").json() == {"username": "rad", "role": "RADIOLOGIST",
                                                "via": "session"}
        with factory() as session:
            auth.set_password(session, "rad", "another good password")
            session.commit()
        assert client.get("/api/me").status_code == 401, "old session ended"
        assert client.get("/", follow_redirects=False).status_code == 303
        assert client.get("/api/me", headers=headers).json()["via"] == "token"
        with factory() as session:
            auth.disable_user(session, "rad")
            session.commit()
        assert client.get("/api/me", headers=headers).status_code == 401
        response = _attempt(client, "rad", "another good password")
        assert response.status_code == 401, "a disabled user cannot log in"


def test_tokens_are_hashed_revocable_and_unforgeable(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    headers = bearer(url, "script", Role.RADIOLOGIST)
    token = headers["Authorization"].split()[1]
    factory = make_session_factory(make_engine(url))
    with factory() as session:
        row = session.execute(select(ApiToken)).scalar_one()
        assert token not in (row.token_hash, row.prefix) and len(row.token_hash) == 64
        token_id = row.id
    with TestClient(app) as client:
        assert client.get("/api/me", headers=headers).status_code == 200
        forged = {"Authorization": "Bearer ct_" + "A" * 43}
        assert client.get("/api/me", headers=forged).status_code == 401
        revoked = client.delete(f"/api/tokens/{token_id}", headers=headers)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"]
        assert client.get("/api/me", headers=headers).status_code == 401
        # A forged session cookie (wrong signature) is nobody.
        client.cookies.set(auth.SESSION_COOKIE, "eyJ1aWQiOjF9.forged.sig")
        assert client.get("/api/worklist").status_code == 401


def test_worklist_read_is_audited_with_its_actor(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    with make_session_factory(make_engine(url))() as session:
        seed(session, (FRACTURED,))
    with TestClient(app) as client:
        assert client.get("/api/worklist").status_code == 401
        body = client.get("/api/worklist", headers=bearer(url, "reader")).json()
        assert body["items"][0]["patient_name"] == FRACTURED.patient_name
        login(client, url, "rad")
        client.get(f"/studies/{FRACTURED.uid}")
    views = _events(url, "worklist.view")
    assert [(e.actor, e.details["via"]) for e in views] == [("reader", "token"),
                                                            ("rad", "session")]
    assert views[0].details["studies"] == [FRACTURED.uid]
    study_views = _events(url, "study.view")
    assert [(e.actor, e.study_instance_uid) for e in study_views] == [("rad", FRACTURED.uid)]


def test_login_redirect_stays_on_this_site(app_url) -> None:  # type: ignore[no-untyped-def]
    app, url = app_url
    make_user(url, "rad")
    with TestClient(app) as client:
        for target, expected in (("//evil.example/x", "/"), ("https://evil.example", "/"),
                                 ("/\t/evil.example", "/"), ("/\\evil.example", "/"),
                                 (f"/studies/{FRACTURED.uid}", f"/studies/{FRACTURED.uid}")):
            client.cookies.clear()
            response = client.post("/login", data={
                "username": "rad", "password": PASSWORD, "next": target,
                "csrf_token": _form_token(client)}, follow_redirects=False)
            assert response.headers["location"] == expected


def test_cli_user_and_token_commands(settings_factory, migrated_url: str,  # type: ignore[no-untyped-def]
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_factory(database_url=migrated_url)
    parser = build_parser()

    def run(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        args = parser.parse_args(list(argv))
        code: int = args.handler(args, settings)
        return code

    assert run("user", "add", "alice", "--role", "admin", "--password-stdin",
               stdin="alice's long password\n") == 0
    assert run("user", "add", "alice", "--role", "radiologist", "--password-stdin",
               stdin="another password\n") == 2, "duplicate user"
    assert run("user", "add", "bob", "--role", "radiologist", "--password-stdin",
               stdin="short\n") == 2, "too short a password"
    capsys.readouterr()
    assert run("token", "create", "alice", "--name", "pacs-bridge") == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith(auth.TOKEN_PREFIX)
    assert run("user", "passwd", "alice", "--password-stdin", stdin="a new password\n") == 0
    app = create_app(settings)
    with TestClient(app) as client:
        me = client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert me.json() == {"username": "alice", "role": "ADMIN", "via": "token"}
        assert client.get("/api/users", headers={"Authorization": f"Bearer {token}"}
                          ).status_code == 200
        assert run("user", "disable", "alice") == 0
        assert client.get("/api/me", headers={"Authorization": f"Bearer {token}"}
                          ).status_code == 401
    with make_session_factory(make_engine(migrated_url))() as session:
        user = session.execute(select(User).where(User.username == "alice")).scalar_one()
        assert user.active is False and user.password_hash.startswith("$argon2id$")
        kinds = [e.event_type for e in session.execute(select(AuditEvent)
                                                       .order_by(AuditEvent.id)).scalars()]
    assert kinds[:4] == ["user.add", "auth.token_created", "user.passwd", "user.disable"]
