"""Worklist filters (priority, day received, sending AE, reading state), acknowledge / mark
read, and the change stamp the page polls."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient

from harness.data.worklist_seed import ALL, FRACTURED, INCONCLUSIVE, NORMAL, WAITING, seed
from harness.web import bearer
from service.db.session import make_engine, make_session_factory
from service.db.types import utcnow
from service.web.app import create_app


def _uids(client: TestClient, **params: object) -> list[str]:
    response = client.get("/api/worklist", params=params)
    assert response.status_code == 200, response.text
    return [item["study_instance_uid"] for item in response.json()["items"]]


def test_filters_reading_state_and_stamp(settings_factory, migrated_url: str) -> None:  # type: ignore[no-untyped-def]
    with make_session_factory(make_engine(migrated_url))() as session:
        seed(session, ALL)
    with TestClient(create_app(settings_factory(database_url=migrated_url))) as client:
        client.headers.update(bearer(migrated_url, "rad"))
        assert _uids(client) == [FRACTURED.uid, INCONCLUSIVE.uid, NORMAL.uid, WAITING.uid]
        body = client.get("/api/worklist").json()
        inconclusive = body["items"][1]
        assert inconclusive["result"] == "INCONCLUSIVE"
        assert [(b["vertebra"], b["plausible"]) for b in inconclusive["levels"]
                if b["plausible"] is False] == [("C6", False), ("C7", False)]
        assert body["items"][0]["calling_aes"] == ["CT_SCANNER_1"]
        assert _uids(client, priority=["ROUTINE", "INCONCLUSIVE"]) == [INCONCLUSIVE.uid,
                                                                       NORMAL.uid]
        assert _uids(client, calling_ae="CT_SCANNER_2") == [NORMAL.uid]
        today = utcnow().date()
        assert len(_uids(client, date_from=today.isoformat(), date_to=today.isoformat())) in (
            3, 4)  # a study received before midnight UTC drops out near midnight
        assert _uids(client, date_to=(today - timedelta(days=1)).isoformat()) == []
        assert _uids(client, date_from=(today + timedelta(days=1)).isoformat()) == []

        stamp = client.get("/api/worklist/stamp").json()["stamp"]
        assert client.get("/api/worklist/stamp").json()["stamp"] == stamp, "stable at rest"
        assert client.post(f"/api/studies/{FRACTURED.uid}/acknowledge").status_code == 200
        moved = client.get("/api/worklist/stamp").json()["stamp"]
        assert moved != stamp, "acknowledging changes what the worklist shows"
        assert client.post(f"/api/studies/{NORMAL.uid}/read").status_code == 200
        assert _uids(client, state="new") == [INCONCLUSIVE.uid, WAITING.uid]
        assert _uids(client, state="acknowledged") == [FRACTURED.uid]
        assert _uids(client, state="read") == [NORMAL.uid]
        assert _uids(client, state="unread") == [FRACTURED.uid, INCONCLUSIVE.uid, WAITING.uid]
        item = client.get("/api/worklist", params={"state": "read"}).json()["items"][0]
        assert item["read_by"] == "rad" and item["acknowledged_by"] == "rad"
        assert client.post(f"/api/studies/{NORMAL.uid}/read",
                           params={"undo": "true"}).status_code == 200
        assert NORMAL.uid in _uids(client, state="unread")
        assert client.post("/api/studies/1.2.3/read").status_code == 404
        # The page's own filter form: the same filters render server-side.
        page = client.get("/", params={"priority": "STAT", "calling_ae": "CT_SCANNER_1"})
        assert page.status_code == 200
        assert f'data-uid="{FRACTURED.uid}"' in page.text
        assert f'data-uid="{NORMAL.uid}"' not in page.text
        assert "checked" in page.text.split('value="STAT"')[1][:40], "the filter shows as set"
        rows = client.get("/worklist/rows", params={"state": "read"}).text
        assert "No studies." in rows
