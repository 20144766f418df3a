"""No patient name or ID in any log line, across a full pipeline at DEBUG.

A synthetic cervical-spine CT with made-up, unmistakable identifiers (patient name, patient
ID, referring physician) goes DCMTK ``storescu`` -> ``triage scp`` (a process, with its
tracker) -> ``triage worker`` (a process: analysis, SR/SEG, export to DCMTK ``storescp``, the
HL7 ORU to an MLLP peer) -> ``triage web`` (a process: the worklist and study pages and API,
the SR download and the audit page, which do show the name to a logged-in reader). Every line
the three processes logged, at DEBUG, is scanned for each identifier. The identifiers
demonstrably went through the pipeline (the database, the reader's API and the ORU hold them),
so a clean scan is not vacuous.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy import select

from harness.peers.dicom import ScpProcess, storescp, storescu
from harness.process import free_port, wait_until
from harness.web import bearer
from harness.worker import WorkerProcess, shipped_model_dir, worker_env
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Export, ExportState, Role, Study
from service.synthetic import PhantomOptions, generate_phantom, write_series
from service.worklist.notify import MLLP_END, MLLP_START

pytestmark = pytest.mark.slow

FAMILY, GIVEN, MIDDLE = "Quixbury", "Zelphine", "Marwood"
PATIENT_NAME = f"{FAMILY}^{GIVEN}^{MIDDLE}"
PATIENT_ID = "QXPID-88213"
REFERRING = "Drefford^Ulmarion"
IDENTIFIERS = (FAMILY, GIVEN, MIDDLE, PATIENT_ID, "Drefford", "Ulmarion")
"""Each is searched for on its own (case-insensitive): a log that splits or re-cases a name
still leaks it."""


class MllpAckPeer:
    """The RIS: acknowledges every ORU (AA) and keeps it."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while MLLP_END not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                message = data.strip(MLLP_START).split(MLLP_END)[0].decode()
                self.messages.append(message)
                control = message.split("\r", 1)[0].split("|")[9]
                ack = f"MSH|^~\\&|RIS||CSPINE_TRIAGE||20240501||ACK|A1|P|2.5\rMSA|AA|{control}"
                conn.sendall(MLLP_START + ack.encode() + MLLP_END)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def ris() -> Iterator[MllpAckPeer]:
    peer = MllpAckPeer()
    yield peer
    peer.close()


def write_case(out: Path) -> list[Path]:
    options = PhantomOptions(seed=733, matrix=256, pixel_spacing=0.8, slice_spacing=1.25,
                             n_slices=None, fractures=0, mimics=0)
    files = write_series(generate_phantom(options), out)
    for path in files:
        ds = dcmread(path)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.ReferringPhysicianName = REFERRING
        ds.save_as(path)
    return files


def leaks(text: str) -> list[str]:
    lowered = text.lower()
    return [line for line in text.splitlines()
            if any(i.lower() in line.lower() for i in IDENTIFIERS)] if any(
        i.lower() in lowered for i in IDENTIFIERS) else []


def _answers(base: str) -> bool:
    try:
        return httpx.get(f"{base}/healthz", timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def test_no_identifier_in_any_log_line(tmp_path: Path, postgres_url: str, redis_url: str,
                                       settings_factory, ris: MllpAckPeer  # type: ignore[no-untyped-def]
                                       ) -> None:
    migrate.upgrade(postgres_url)
    files = write_case(tmp_path / "case")
    scp_port = free_port()
    with storescp(tmp_path / "pacs") as pacs:
        settings = settings_factory(database_url=postgres_url, broker_url=redis_url,
                                    model_dir=shipped_model_dir(), dicom_port=scp_port)
        destinations = json.dumps([{"name": "pacs", "ae_title": pacs.ae_title,
                                    "host": "127.0.0.1", "port": pacs.port}])
        env = worker_env(settings, TRIAGE_DICOM_PORT=str(scp_port),
                         TRIAGE_DICOM_HOST="127.0.0.1", TRIAGE_LOG_LEVEL="DEBUG",
                         TRIAGE_PACS_DESTINATIONS=destinations,
                         TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S="1",
                         TRIAGE_HL7_HOST="127.0.0.1", TRIAGE_HL7_PORT=str(ris.port))
        logs = {"scp": tmp_path / "scp.log", "worker": tmp_path / "worker.log",
                "web": tmp_path / "web.log"}
        scp = ScpProcess(env, tmp_path, logs["scp"]).start()
        worker = WorkerProcess(env, logs["worker"]).start()
        web_port = free_port()
        with logs["web"].open("wb") as handle:
            web = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "web", "--port", str(web_port)],
                env={**env, "TRIAGE_SECRET_KEY": "log-scan-test-secret"}, cwd=tmp_path,
                stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        engine = make_engine(postgres_url)
        factory = make_session_factory(engine)
        try:
            sent = storescu(scp_port, files)
            assert sent.returncode == 0, sent.stdout + sent.stderr

            def exported() -> bool:
                assert worker.alive(), worker.output()
                with factory() as session:
                    states = list(session.execute(select(Export.state)).scalars())
                return bool(states) and all(s is ExportState.SENT for s in states)

            wait_until(exported, 480, 1.0, "SR and SEG sent to storescp")
            wait_until(lambda: ris.messages, 60, 0.5, "the ORU at the RIS")
            base = f"http://127.0.0.1:{web_port}"
            wait_until(lambda: _answers(base), 60, 0.3, "triage web to answer")
            reader = bearer(settings.db_url)
            admin = bearer(settings.db_url, "admin-client", Role.ADMIN)
            with httpx.Client(base_url=base, timeout=30) as client:
                worklist = client.get("/api/worklist", headers=reader)
                assert worklist.status_code == 200, worklist.text
                (item,) = worklist.json()["items"]
                uid = item["study_instance_uid"]
                study = client.get(f"/api/studies/{uid}", headers=reader)
                assert study.status_code == 200, study.text
                for path, headers in [("/", reader), (f"/studies/{uid}", reader),
                                      (f"/api/studies/{uid}/results/sr", reader),
                                      ("/admin/audit", admin)]:
                    page = client.get(path, headers=headers)
                    assert page.status_code == 200, (path, page.status_code)
        finally:
            os.killpg(web.pid, signal.SIGTERM)
            web.wait(30)
            worker.stop()
            scp.stop()
        with factory() as session:
            (row,) = session.execute(select(Study)).scalars()
            assert (row.patient_name, row.patient_id) == (PATIENT_NAME, PATIENT_ID)
        engine.dispose()
    # The identifiers went through: the reader's API and the ORU carried them.
    assert FAMILY in worklist.text + study.text
    assert f"{FAMILY}^{GIVEN}" in ris.messages[0] and PATIENT_ID in ris.messages[0]

    texts = {name: path.read_text(errors="replace") for name, path in logs.items()}
    assert f"GET /studies/{uid}" in texts["web"]  # the access log is in the scan
    for name, text in texts.items():
        assert len(text.splitlines()) > 5, f"{name} logged almost nothing: {text!r}"
    found = {name: leaks(text)[:5] for name, text in texts.items() if leaks(text)}
    assert not found, f"patient identifiers in the logs: {found}"
    print({name: len(text.splitlines()) for name, text in texts.items()}, "lines scanned")
