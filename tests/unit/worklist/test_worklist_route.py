from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient

from harness.web import bearer
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, AnalysisState, Finding, Priority, Series, Study
from service.web.app import create_app

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def _study(session, uid: str, priority: Priority, received: datetime,  # type: ignore[no-untyped-def]
           suspected: tuple[str, ...] = ()) -> None:
    study = Study(study_instance_uid=uid, priority=priority, accession_number=f"A{uid[-1]}",
                  priority_reason=f"{priority.value} reason", flagged_at=received)
    series = Series(study=study, series_instance_uid=uid + ".1", first_received_at=received)
    analysis = Analysis(series=series, model_version="1", input_fingerprint="x",
                        state=AnalysisState.DONE, patient_probability=0.9 if suspected else 0.1)
    session.add_all([study, series, analysis])
    session.flush()
    for vertebra in ("C1", "C2", "C3"):
        session.add(Finding(analysis_id=analysis.id, vertebra=vertebra, in_view=True,
                            probability=0.9 if vertebra in suspected else 0.1,
                            suspected=vertebra in suspected))


def test_worklist_orders_by_priority_then_waiting_time(settings_factory,  # type: ignore[no-untyped-def]
                                                       migrated_url: str) -> None:
    settings = settings_factory(database_url=migrated_url)
    factory = make_session_factory(make_engine(migrated_url))
    with factory() as session:
        _study(session, "1.1", Priority.ROUTINE, T0)
        _study(session, "1.2", Priority.STAT, T0 + timedelta(minutes=10), ("C2",))
        _study(session, "1.3", Priority.STAT, T0 + timedelta(minutes=2), ("C1", "C3"))
        _study(session, "1.4", Priority.NOT_ANALYZED, T0 - timedelta(hours=1))
        _study(session, "1.5", Priority.URGENT, T0 + timedelta(minutes=20))
        session.commit()
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/worklist").status_code == 401
        client.headers.update(bearer(migrated_url))
        response = client.get("/api/worklist")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["total"] == 5
        assert [i["study_instance_uid"] for i in body["items"]] == [
            "1.3", "1.2", "1.5", "1.1", "1.4"]
        first = body["items"][0]
        assert first["priority"] == "STAT"
        assert first["suspected_vertebrae"] == ["C1", "C3"]
        assert first["patient_probability"] == 0.9
        assert first["analysis_state"] == "DONE"
        assert datetime.fromisoformat(first["waiting_since"]) == T0 + timedelta(minutes=2)
        assert first["waiting_s"] > 0

        only_stat = client.get("/api/worklist", params={"priority": "STAT", "limit": 1}).json()
        assert only_stat["total"] == 2
        assert [i["study_instance_uid"] for i in only_stat["items"]] == ["1.3"]
        page_two = client.get("/api/worklist", params={"priority": "STAT", "limit": 1,
                                                       "offset": 1}).json()
        assert [i["study_instance_uid"] for i in page_two["items"]] == ["1.2"]
        assert client.get("/api/worklist", params={"priority": "HIGH"}).status_code == 422
        assert client.get("/api/worklist", params={"limit": 0}).status_code == 422
