from __future__ import annotations

from fastapi.testclient import TestClient

from harness.web import bearer
from service.db import migrate
from service.web.app import create_app


def test_healthz_up_with_real_database_and_broker(settings_factory, migrated_url: str,  # type: ignore[no-untyped-def]
                                                   redis_url: str) -> None:
    settings = settings_factory(database_url=migrated_url, broker_url=redis_url)
    with TestClient(create_app(settings)) as client:
        anonymous = client.get("/healthz")
        response = client.get("/healthz", headers=bearer(migrated_url))
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["components"]["database"]["status"] == "up"
    assert body["components"]["broker"]["status"] == "up"
    assert body["versions"]["pydicom"]
    assert body["versions"]["cspine-triage"]


def test_healthz_reports_broker_down(settings_factory, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    from harness.process import free_port

    migrate.upgrade(sqlite_url)
    settings = settings_factory(database_url=sqlite_url,
                                broker_url=f"redis://127.0.0.1:{free_port()}/0",
                                broker_connect_timeout_s=0.5)
    with TestClient(create_app(settings)) as client:
        anonymous = client.get("/healthz")
        response = client.get("/healthz", headers=bearer(sqlite_url))
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "degraded"}, "no detail for anonymous callers"
    assert response.status_code == 503
    assert response.json()["components"]["broker"]["status"] == "down"


def test_healthz_reports_unmigrated_database(settings_factory, sqlite_url: str,  # type: ignore[no-untyped-def]
                                             redis_url: str) -> None:
    settings = settings_factory(database_url=sqlite_url, broker_url=redis_url)
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    # No user table yet, so nobody can log in: the anonymous answer is the status alone.
    assert response.status_code == 503
    assert response.json() == {"status": "degraded"}
