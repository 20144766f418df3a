"""Every route of the app x (anonymous, radiologist, admin), with the expected status.

The routes are enumerated from the app itself and must equal the table below, so a new route
fails this test until someone decides who may call it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import Mount

from harness.data.worklist_seed import FRACTURED, seed
from harness.web import login, make_user
from service.db.session import make_engine, make_session_factory
from service.db.tables import Role
from service.results.store import ResultStore
from service.results.uids import ObjectKind
from service.web import auth
from service.web.app import create_app

UID = FRACTURED.uid
SERIES = FRACTURED.uid + ".1"
ANON, RAD, ADMIN = "anonymous", "radiologist", "admin"


@dataclass
class Call:
    statuses: dict[str, int]
    """Expected status per role."""
    path: str | None = None
    """Concrete path (defaults to the template); ``{token_id}`` is filled per role."""
    json: Any = None
    form: dict[str, str] | None = None
    params: dict[str, str] = field(default_factory=dict)
    check: Callable[[str, Any], None] | None = None


def _exp(anon: int, rad: int, admin: int) -> dict[str, int]:
    return {ANON: anon, RAD: rad, ADMIN: admin}


def _health_body(role: str, response: Any) -> None:
    body = response.json()
    if role == ADMIN:
        assert "versions" in body and "components" in body
    else:
        assert body == {"status": body["status"]}, "no detail without an admin or a token"


def _login_redirect(role: str, response: Any) -> None:
    if role == ANON:
        assert response.headers["location"].startswith("/login?next=")


ROUTES: dict[tuple[str, str], Call] = {
    ("GET", "/healthz"): Call(_exp(200, 200, 200), check=_health_body),
    ("GET", "/login"): Call(_exp(200, 303, 303)),
    # Without the login form's own token (its cookie) a login post is refused for anyone.
    ("POST", "/login"): Call(_exp(403, 403, 403), form={"username": "x", "password": "y"}),
    ("POST", "/logout"): Call(_exp(401, 303, 303)),
    ("GET", "/"): Call(_exp(303, 200, 200), check=_login_redirect),
    ("GET", "/worklist/rows"): Call(_exp(401, 200, 200)),
    ("GET", "/studies/{study_instance_uid}"): Call(_exp(303, 200, 200), path=f"/studies/{UID}",
                                                   check=_login_redirect),
    # The seeded series is not in the spool: no image to draw (test_images draws them).
    ("GET", "/studies/{study_instance_uid}/images/{view}.png"): Call(
        _exp(401, 404, 404), path=f"/studies/{UID}/images/sagittal.png"),
    ("POST", "/studies/{study_instance_uid}/feedback"): Call(
        _exp(401, 303, 303), path=f"/studies/{UID}/feedback", form={"verdict": "AGREE"}),
    ("GET", "/api/worklist"): Call(_exp(401, 200, 200)),
    ("GET", "/api/worklist/stamp"): Call(_exp(401, 200, 200)),
    ("POST", "/api/studies/{study_instance_uid}/acknowledge"): Call(
        _exp(401, 200, 200), path=f"/api/studies/{UID}/acknowledge"),
    ("POST", "/api/studies/{study_instance_uid}/read"): Call(
        _exp(401, 200, 200), path=f"/api/studies/{UID}/read"),
    ("GET", "/api/studies/{study_instance_uid}"): Call(_exp(401, 200, 200),
                                                       path=f"/api/studies/{UID}"),
    ("POST", "/api/studies/{study_instance_uid}/feedback"): Call(
        _exp(401, 201, 201), path=f"/api/studies/{UID}/feedback",
        json={"vertebra": "C2", "verdict": "AGREE", "comment": "seen"}),
    ("GET", "/api/studies/{study_instance_uid}/results/{kind}"): Call(
        _exp(401, 200, 200), path=f"/api/studies/{UID}/results/sr"),
    ("GET", "/api/me"): Call(_exp(401, 200, 200)),
    ("GET", "/api/tokens"): Call(_exp(401, 200, 200)),
    ("POST", "/api/tokens"): Call(_exp(401, 201, 201), json={"name": "script"}),
    ("DELETE", "/api/tokens/{token_id}"): Call(_exp(401, 200, 200), path="/api/tokens/{token_id}"),
    ("GET", "/api/users"): Call(_exp(401, 403, 200)),
    ("GET", "/api/studies"): Call(_exp(401, 200, 200)),
    ("GET", "/api/series/{series_instance_uid}"): Call(_exp(401, 200, 200),
                                                       path=f"/api/series/{SERIES}"),
    ("GET", "/openapi.json"): Call(_exp(401, 200, 200)),
    ("GET", "/admin/turnaround"): Call(_exp(303, 403, 200), check=_login_redirect),
    ("GET", "/admin/turnaround.csv"): Call(_exp(303, 403, 200), check=_login_redirect),
    ("GET", "/api/turnaround"): Call(_exp(401, 403, 200), params={"priority": "STAT"}),
    ("GET", "/admin/monitoring"): Call(_exp(303, 403, 200), check=_login_redirect,
                                       params={"period": "week"}),
    ("GET", "/admin/audit"): Call(_exp(303, 403, 200), check=_login_redirect,
                                  params={"subject": UID}),
    ("GET", "/admin/audit.csv"): Call(_exp(401, 403, 200)),
    ("GET", "/admin/status"): Call(_exp(303, 403, 200), check=_login_redirect),
    # The seeded analysis is DONE and its exports SENT: an admin is heard, and refused (409).
    ("POST", "/admin/analyses/{analysis_id}/retry"): Call(
        _exp(401, 403, 409), path="/admin/analyses/1/retry"),
    ("POST", "/admin/exports/{export_id}/resend"): Call(
        _exp(401, 403, 409), path="/admin/exports/1/resend"),
    # No metrics token configured here: an admin only (test_metrics covers the token).
    ("GET", "/metrics"): Call(_exp(401, 403, 200)),
    ("GET", "/static/{path}"): Call(_exp(200, 200, 200), path="/static/app.css"),
}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app answers, HEAD aside; a mount is ``/x/{path}``."""
    try:
        from fastapi.routing import iter_route_contexts

        routes: Iterator[Any] = iter_route_contexts(app.routes)
    except ImportError:  # FastAPI before the lazily included routers
        routes = iter(app.routes)
    found: set[tuple[str, str]] = set()
    for route in routes:
        original = getattr(route, "original_route", route)
        if isinstance(original, Mount):
            found.add(("GET", f"{original.path}/{{path}}"))
            continue
        for method in route.methods or ():
            if method != "HEAD":
                found.add((method, route.path))
    return found


@pytest.fixture
def app_and_tokens(settings_factory, migrated_url: str  # type: ignore[no-untyped-def]
                   ) -> tuple[FastAPI, str, dict[str, int]]:
    settings = settings_factory(database_url=migrated_url)
    factory = make_session_factory(make_engine(migrated_url))
    with factory() as session:
        seed(session, (FRACTURED,))
    store = ResultStore.from_settings(settings)
    path = store.path_for(SERIES, "1.5.0", ObjectKind.SR)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"DICM-test")
    make_user(migrated_url, "rad", Role.RADIOLOGIST)
    make_user(migrated_url, "adm", Role.ADMIN)
    tokens = {}
    with factory() as session:
        tokens[RAD] = auth.create_token(session, "rad")[0].id
        tokens[ADMIN] = auth.create_token(session, "rad")[0].id  # an admin revokes anyone's
        tokens[ANON] = tokens[RAD]
        session.commit()
    return create_app(settings), migrated_url, tokens


def _call(client: TestClient, method: str, call: Call, path: str,
          csrf: str | None) -> Any:
    headers = {"X-CSRF-Token": csrf} if csrf and call.form is None else {}
    form = dict(call.form or {})
    if csrf and call.form is not None:
        form["csrf_token"] = csrf
    return client.request(method, path, params=call.params, headers=headers,
                          json=call.json, data=form or None, follow_redirects=False)


def test_every_route_is_in_the_table(app_and_tokens) -> None:  # type: ignore[no-untyped-def]
    app, _url, _tokens = app_and_tokens
    assert app_routes(app) == set(ROUTES), "a route was added or removed: update ROUTES"


@pytest.mark.parametrize("role", [ANON, RAD, ADMIN])
def test_route_by_role(app_and_tokens, role: str) -> None:  # type: ignore[no-untyped-def]
    app, url, tokens = app_and_tokens
    with TestClient(app) as client:
        csrf = None
        if role != ANON:
            csrf = login(client, url, "rad" if role == RAD else "adm")
        # Logging out ends the session the other calls need: it goes last.
        for (method, template), call in sorted(ROUTES.items(),
                                               key=lambda kv: kv[0] == ("POST", "/logout")):
            path = (call.path or template).replace("{token_id}", str(tokens[role]))
            response = _call(client, method, call, path, csrf)
            expected = call.statuses[role]
            if template == "/healthz" and response.status_code == 503:
                expected = 503  # a dependency is not up: the probe says so, to anyone
            assert response.status_code == expected, (
                f"{method} {template} as {role}: {response.status_code} != {expected}: "
                f"{response.text[:300]}")
            if call.check is not None:
                call.check(role, response)


def test_state_changing_routes_need_the_csrf_token(app_and_tokens) -> None:  # type: ignore[no-untyped-def]
    app, url, tokens = app_and_tokens
    with TestClient(app) as client:
        login(client, url, "adm", Role.ADMIN)
        for (method, template), call in ROUTES.items():
            if method in ("GET", "HEAD") or template == "/login":
                continue
            path = (call.path or template).replace("{token_id}", str(tokens[ADMIN]))
            response = _call(client, method, call, path, None)
            assert response.status_code == 403, f"{method} {template} without CSRF token"
            wrong = client.request(method, path, headers={"X-CSRF-Token": "0" * 64},
                                   json=call.json, data=call.form, follow_redirects=False)
            assert wrong.status_code == 403, f"{method} {template} with a wrong CSRF token"
