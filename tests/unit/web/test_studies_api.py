"""``GET /api/studies`` and ``GET /api/series/{uid}`` over a real ingest (both dialects)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from harness.data.ctdata import SeriesSpec
from harness.web import bearer
from service.db.tables import Analysis, Finding
from service.ingest.bookkeeper import write_batch
from service.ingest.dispatch import AnalysisDispatcher
from service.ingest.tracker import Tracker
from service.web.app import create_app
from tests.unit.ingest.conftest import IngestEnv, ingest_env  # noqa: F401 - fixture
from tests.unit.ingest.test_tracker import FakeBroker


def test_studies_and_series_show_states_decisions_and_times(
        ingest_env: IngestEnv) -> None:  # noqa: F811
    env = ingest_env
    good = SeriesSpec(slices=12, images_in_acquisition=12, series_number=3)
    thick = SeriesSpec(slices=12, images_in_acquisition=12, thickness_mm=5.0,
                       study_uid=good.study_uid, series_number=4)
    waiting = SeriesSpec(slices=12, series_number=1)
    for spec in (good, thick, waiting):
        items = [env.receive(spec, i) for i in range(spec.slices - (3 if spec is waiting else 0))]
        with env.factory() as session, session.begin():
            write_batch(session, items)
    dispatcher = AnalysisDispatcher(env.factory, env.settings, app_factory=FakeBroker)
    Tracker(env.factory, env.settings, env.spool, dispatcher=dispatcher).tick()

    with TestClient(create_app(env.settings)) as client:
        assert client.get("/api/studies").status_code == 401
        client.headers.update(bearer(env.settings.db_url))
        body = client.get("/api/studies").json()
        assert body["total"] == 2
        by_uid = {item["study_instance_uid"]: item for item in body["items"]}
        study = by_uid[good.study_uid]
        assert study["selected_series_instance_uid"] == good.series_uid
        assert "patient_name" not in study and "patient_id" not in study
        series = {s["series_instance_uid"]: s for s in study["series"]}
        assert series[good.series_uid]["state"] == "QUEUED"
        assert series[good.series_uid]["qualified"] is True
        assert series[good.series_uid]["selected"] is True
        assert series[good.series_uid]["completion_reason"] == "expected_count"
        assert series[thick.series_uid]["state"] == "NOT_ANALYZABLE"
        assert series[thick.series_uid]["state_reason"] == "SLICE_TOO_THICK"
        for entry in series.values():
            for key in ("acquired_at", "first_received_at", "last_received_at", "completed_at"):
                assert entry[key] is not None, key
        receiving = by_uid[waiting.study_uid]["series"][0]
        assert receiving["state"] == "RECEIVING" and receiving["completed_at"] is None
        assert receiving["instance_count"] == 9 and receiving["qualified"] is None

        only_receiving = client.get("/api/studies", params={"state": "RECEIVING"}).json()
        assert [s["study_instance_uid"] for s in only_receiving["items"]] == [waiting.study_uid]
        paged = client.get("/api/studies", params={"limit": 1, "offset": 1}).json()
        assert paged["total"] == 2 and len(paged["items"]) == 1

        detail = client.get(f"/api/series/{good.series_uid}").json()
        assert detail["study_instance_uid"] == good.study_uid
        assert detail["qualification_metrics"]["slices"] == 12
        assert detail["qualification_detail"].startswith("axial CT")
        assert detail["analyses"][0]["state"] == "QUEUED"
        assert len(detail["analyses"][0]["input_fingerprint"]) == 64
        assert detail["analyses"][0]["warnings"] == []
        with env.factory() as session, session.begin():
            analysis = session.get(Analysis, detail["analyses"][0]["id"])
            assert analysis is not None
            analysis.warnings = ["GANTRY_TILT_RESAMPLED", "LEVELS_OUT_OF_ORDER"]
        detail = client.get(f"/api/series/{good.series_uid}").json()
        assert detail["analyses"][0]["warnings"] == ["GANTRY_TILT_RESAMPLED",
                                                     "LEVELS_OUT_OF_ORDER"]
        assert detail["duplicate_conflicts"] == 0 and detail["bytes_received"] > 0
        # Findings stored for two levels only (in reverse order): the API still lists C1..C7
        # in anatomical order, the others out of view, as the study page does.
        with env.factory() as session, session.begin():
            for vertebra, probability in (("C5", 0.2), ("C2", 0.9)):
                session.add(Finding(analysis_id=detail["analyses"][0]["id"], vertebra=vertebra,
                                    in_view=True, probability=probability, suspected=False,
                                    plausible=True))
        levels = client.get(f"/api/series/{good.series_uid}").json()["analyses"][0]["levels"]
        assert [(lv["vertebra"], lv["in_view"], lv["probability"]) for lv in levels] == [
            ("C1", False, None), ("C2", True, 0.9), ("C3", False, None), ("C4", False, None),
            ("C5", True, 0.2), ("C6", False, None), ("C7", False, None)]
        assert client.get("/api/series/1.2.3.404").status_code == 404
        assert client.get("/api/studies", params={"limit": 0}).status_code == 422
