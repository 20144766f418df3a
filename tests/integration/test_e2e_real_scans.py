"""Both real scans through the real service (issue 16): no false alarm on real anatomy.

DCMTK ``storescu`` sends each real CT in ``../shared/data`` to ``triage scp``; the worker
(a separate process, the real Redis broker and PostgreSQL) analyses it; the SR and the SEG
go to Orthanc as the PACS. Neither scan has a known fracture and the shipped
(synthetic-trained) model finds impossible levels on both: each must end DONE with plausible
levels or INCONCLUSIVE with its failed rules, and never STAT. Checked where a user sees it:
the worklist priority and reason, ``GET /api/series/{uid}``, the SR in the PACS (Fracture
Indeterminate, the rules as text), the audit trail, the webhook.

The chest CT (Body Part CHEST, an invalid Study Date holding a hash, 4 mm slices) is
analysed as a site that routes chest CTs would configure it: slices up to 5 mm.
"""

from __future__ import annotations

import io
import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from harness.peers.dicom import ScpProcess, storescu
from harness.peers.orthanc import Orthanc
from harness.process import free_port, wait_until
from harness.web import bearer
from harness.worker import WorkerProcess, shipped_model_dir, worker_env
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, AnalysisResult, AuditEvent, Priority, Series, Study
from service.results import codes
from service.web.app import create_app
from tests.integration.test_e2e_orthanc import SEG_CLASSES, SR_CLASSES

pytestmark = pytest.mark.slow


class _Webhook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length", "0"))
        type(self).received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []
    handler = type("Hook", (_Webhook,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()


@pytest.fixture
def stack(tmp_path: Path, postgres_url: str, redis_url: str, settings_factory,  # type: ignore[no-untyped-def]
          webhook: tuple[str, list[dict[str, Any]]]):
    migrate.upgrade(postgres_url)
    scp_port = free_port()
    with Orthanc(tmp_path / "orthanc", {}) as orthanc:
        destinations = json.dumps([{"name": "orthanc", "ae_title": "ORTHANC",
                                    "host": "127.0.0.1", "port": orthanc.dicom_port}])
        settings = settings_factory(database_url=postgres_url, broker_url=redis_url,
                                    model_dir=shipped_model_dir(), dicom_port=scp_port,
                                    completion_idle_after_release_s=1.0,
                                    max_slice_thickness_mm=5.0, webhook_url=webhook[0],
                                    development_mode=True)  # a plain-http local webhook
        env = worker_env(settings, TRIAGE_DICOM_PORT=str(scp_port),
                         TRIAGE_DICOM_HOST="127.0.0.1",
                         TRIAGE_PACS_DESTINATIONS=destinations,
                         TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S="1",
                         TRIAGE_MAX_SLICE_THICKNESS_MM="5",
                         TRIAGE_WEBHOOK_URL=webhook[0], TRIAGE_DEVELOPMENT_MODE="true")
        scp = ScpProcess(env, tmp_path, tmp_path / "scp.log").start()
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            yield settings, scp_port, orthanc, worker, webhook[1]
        finally:
            worker.stop()
            scp.stop()


def _sr_in_pacs(orthanc: Orthanc, study_instance_uid: str) -> hd.sr.Comprehensive3DSR | None:
    found = orthanc.request("POST", "/tools/lookup", study_instance_uid.encode())
    for resource in found:
        if resource.get("Type") != "Study":
            continue
        for instance in orthanc.request("GET", f"/studies/{resource['ID']}/instances"):
            tags = orthanc.request("GET", f"/instances/{instance['ID']}/simplified-tags")
            if tags.get("SOPClassUID") in SR_CLASSES:
                with urllib.request.urlopen(
                        f"{orthanc.url}/instances/{instance['ID']}/file", timeout=60) as answer:
                    return hd.sr.srread(io.BytesIO(answer.read()))  # type: ignore[return-value]
    return None


def _classes_in_pacs(orthanc: Orthanc, study_instance_uid: str) -> set[str]:
    classes: set[str] = set()
    for resource in orthanc.request("POST", "/tools/lookup", study_instance_uid.encode()):
        if resource.get("Type") == "Study":
            for instance in orthanc.request("GET", f"/studies/{resource['ID']}/instances"):
                tags = orthanc.request("GET", f"/instances/{instance['ID']}/simplified-tags")
                classes.add(tags.get("SOPClassUID", ""))
    return classes


def test_real_scans_are_never_stat_and_say_why(  # type: ignore[no-untyped-def]
        stack, real_ct_dir: Path, real_chest_ct_dir: Path) -> None:
    settings, port, orthanc, worker, hooks = stack
    for directory in (real_ct_dir, real_chest_ct_dir):
        sent = storescu(port, sorted(p for p in directory.iterdir() if p.is_file()))
        assert sent.returncode == 0, sent.stderr

    factory = make_session_factory(make_engine(settings.db_url))

    def finished() -> list[Analysis] | None:
        assert worker.alive(), worker.output()
        with factory() as session:
            rows = session.execute(select(Analysis)).scalars().all()
            done = [a for a in rows if a.state.value in ("DONE", "NOT_ANALYZABLE", "FAILED")]
            return done if len(done) == 2 else None

    try:
        analyses = wait_until(finished, 600, 1.0, "both real scans analysed")
    except AssertionError:
        print(worker.output())
        raise
    with factory() as session:
        studies = session.execute(select(Study)).scalars().all()
        assert len(studies) == 2
        for analysis in session.execute(select(Analysis)).scalars().all():
            series = session.get(Series, analysis.series_id)
            assert series is not None
            study = series.study
            # DONE: the model ran. Never FRACTURE_SUSPECTED, never STAT.
            assert analysis.state.value == "DONE", (analysis.state, analysis.error,
                                                     analysis.reason_code)
            assert analysis.result in (AnalysisResult.INCONCLUSIVE,
                                       AnalysisResult.NO_FRACTURE_FOUND), analysis.result
            assert study.priority is not Priority.STAT and not analysis.suspected
            if analysis.result is AnalysisResult.INCONCLUSIVE:
                failures = (analysis.plausibility or {})["failures"]
                assert failures and all(f["code"] and f["detail"] for f in failures)
                assert study.priority is Priority.INCONCLUSIVE
                assert study.priority_reason.startswith("inconclusive, not cleared")
                assert failures[0]["code"] in study.priority_reason
            else:  # plausible levels, nothing found: every level vouched for
                assert analysis.plausibility["passed"] is True
        # The chest CT's hash Study Date is not stored as a date; its body part is kept.
        chest = next(s for s in session.execute(select(Series)).scalars()
                     if s.body_part_examined == "CHEST")
        assert chest.study.study_date is None and chest.acquired_at is not None
        done_events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == "analysis.done")).scalars().all()
        assert {e.details["result"] for e in done_events} <= {"INCONCLUSIVE",
                                                             "NO_FRACTURE_FOUND"}
        uids = {s.series_instance_uid: s.study.study_instance_uid
                for s in session.execute(select(Series)).scalars()}
    assert len(analyses) == 2

    with TestClient(create_app(settings)) as client:
        client.headers.update(bearer(settings.db_url))
        for series_uid in uids:
            detail = client.get(f"/api/series/{series_uid}").json()
            (latest, *_) = detail["analyses"]
            assert latest["result"] in ("INCONCLUSIVE", "NO_FRACTURE_FOUND")
            if latest["result"] == "INCONCLUSIVE":
                assert latest["failed_rules"] and latest["failed_rules"][0]["code"]
                assert not any(level["suspected"] for level in latest["levels"])
        worklist = client.get("/api/worklist").json()["items"]
        assert all(item["priority"] != "STAT" for item in worklist)

    # The SR and the SEG reached the PACS; the SR says Indeterminate, with the rules.
    for study_uid in uids.values():
        def both_back(uid: str = study_uid) -> bool:
            classes = _classes_in_pacs(orthanc, uid)
            return bool(classes & SR_CLASSES) and bool(classes & SEG_CLASSES)

        wait_until(both_back, 300, 1.0, "SR and SEG in Orthanc")
        sr = _sr_in_pacs(orthanc, study_uid)
        assert sr is not None
        (patient,) = sr.content.get_image_measurement_groups()
        (evaluation,) = patient.get_qualitative_evaluations(name=codes.FRACTURE)
        assert evaluation.value in (codes.INDETERMINATE, codes.ABSENT)
        assert evaluation.value != codes.PRESENT
    # The webhook heard an inconclusive result, not a flag.
    wait_until(lambda: len(hooks) >= 2, 60, 0.5, "two webhook notifications")
    assert all(not h["fracture_suspected"] and h["priority"] != "STAT" for h in hooks)
    assert {h["event"] for h in hooks} <= {"study.inconclusive", "study.flagged"}
