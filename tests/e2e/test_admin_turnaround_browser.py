"""An admin watches the turnaround of a burst of demo studies sent through the real service.

Real processes throughout: ``triage demo generate`` writes the phantoms, ``triage demo send``
sends them over C-STORE to ``triage scp`` (with its tracker), one ``triage worker`` analyses
them with the shipped model and exports the SR and SEG to Orthanc, on the real PostgreSQL and
Redis. The web app runs under uvicorn; Debian's chromium logs in as an admin, reads the
turnaround page (percentiles, histogram, time series, breaches, filters, CSV), gives one
verdict on a study page, and reads the model-monitoring page.

The phantoms carry a fixed study date years back; a scanner's images are sent minutes after
they are acquired, so the test sets each file's acquisition time (Acquisition DateTime, with
Timezone Offset From UTC +0000) to the moment before the send, as a scanner that just
finished would. Nothing else is touched. With ``UPDATE_DASHBOARD_SCREENSHOTS=1`` the
screenshots replace ``docs/admin-turnaround.png`` and ``docs/admin-monitoring.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest

from harness.peers.dicom import ScpProcess
from harness.peers.orthanc import Orthanc
from harness.process import free_port, wait_until
from harness.web import PASSWORD, make_user
from harness.worker import REPO, WorkerProcess, shipped_model_dir, worker_env
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Role
from service.web.app import create_app
from service.web.turnaround_query import load_study_times

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOCS = REPO / "docs"
STUDIES = 3
CALLING_AE = "DEMO_CT"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(),
                                 reason="Debian's chromium is not installed at /usr/bin/chromium "
                                        "(apt-get install chromium)")]


def _triage(*args: str, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _acquired_now(directory: Path) -> int:
    """Stamp every file's acquisition time with the present, as a scanner sending at once."""
    now = datetime.now(UTC)
    stamp = now.strftime("%Y%m%d%H%M%S.%f")
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix in ("", ".dcm")]
    for path in files:
        ds = pydicom.dcmread(path)
        ds.AcquisitionDateTime = stamp
        ds.AcquisitionDate, ds.AcquisitionTime = stamp[:8], stamp[8:]
        ds.TimezoneOffsetFromUTC = "+0000"
        ds.save_as(path)
    return len(files)


@pytest.fixture
def stack(tmp_path: Path, postgres_url: str, redis_url: str,
          settings_factory: Any) -> Iterator[tuple[Settings, WorkerProcess, int]]:
    migrate.upgrade(postgres_url)
    scp_port = free_port()
    with Orthanc(tmp_path / "orthanc") as orthanc:
        destinations = json.dumps([{"name": "orthanc", "ae_title": "ORTHANC",
                                    "host": "127.0.0.1", "port": orthanc.dicom_port}])
        settings = settings_factory(database_url=postgres_url, broker_url=redis_url,
                                    model_dir=shipped_model_dir(), dicom_port=scp_port,
                                    completion_idle_after_release_s=1.0,
                                    secret_key="admin-browser-test-secret")
        env = worker_env(settings, TRIAGE_DICOM_PORT=str(scp_port),
                         TRIAGE_DICOM_HOST="127.0.0.1",
                         TRIAGE_PACS_DESTINATIONS=destinations,
                         TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S="1")
        scp = ScpProcess(env, tmp_path, tmp_path / "scp.log").start()
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            yield settings, worker, scp_port
        finally:
            worker.stop()
            scp.stop()


@pytest.fixture
def web(stack: tuple[Settings, WorkerProcess, int]) -> Iterator[str]:
    import uvicorn

    settings = stack[0]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 20, 0.05, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"admin-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_DASHBOARD_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / path.name)


def test_admin_sees_the_turnaround_of_a_demo_burst(  # type: ignore[no-untyped-def]
        tmp_path: Path, stack, web: str) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (the dev extra) is not installed")
    settings, worker, scp_port = stack
    env = worker_env(settings)
    demo = tmp_path / "demo"
    _triage("demo", "generate", "--studies", str(STUDIES), "--seed", "7300", "--matrix", "256",
            "--out", str(demo), env=env, timeout=900)
    assert _acquired_now(demo) > STUDIES * 50
    sent_at = time.monotonic()
    _triage("demo", "send", str(demo), "--host", "127.0.0.1", "--port", str(scp_port),
            "--ae-title", "CSPINE_TRIAGE", "--calling-ae", CALLING_AE, "--associations", "2",
            env=env, timeout=600)

    factory = make_session_factory(make_engine(settings.db_url))

    def all_flagged_and_sent() -> bool:
        assert worker.alive(), worker.output()
        with factory() as session:
            rows = load_study_times(session)
        return len(rows) == STUDIES and all(t.flagged and t.sent for t in rows)

    try:
        wait_until(all_flagged_and_sent, 900, 1.0, "every demo study flagged and sent")
    except AssertionError:
        print(worker.output())
        raise
    print(f"burst of {STUDIES} flagged and sent {time.monotonic() - sent_at:.1f} s after "
          "the send began")
    make_user(settings.db_url, "root", Role.ADMIN)

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(30000)
            page.goto(web + "/admin/turnaround")
            assert "/login" in page.url
            page.fill("input[name=username]", "root")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("table#percentiles")
            assert "/admin/turnaround" in page.url, "back to the page asked for"

            def cell(stage: str, column: int) -> str:
                return page.inner_text(
                    f"#percentiles tr[data-stage={stage}] td:nth-child({column})")

            assert cell("end_to_end", 3) == str(STUDIES)
            assert cell("from_receipt", 3) == str(STUDIES)
            for stage in ("received", "complete", "queued", "analyzed", "flagged", "stored",
                          "sent"):
                assert cell(stage, 3) == str(STUDIES), stage
            assert page.locator("svg[data-testid=timeseries] circle.point").count() == STUDIES
            assert page.locator("svg[data-testid=histogram] rect.bar").count() >= 1
            assert page.locator("svg[data-testid=timeseries] rect.band").count() == 1
            options = page.eval_on_selector_all("select[name=calling_ae] option",
                                                "os => os.map(o => o.value)")
            assert CALLING_AE in options
            figures = page.evaluate("""async () => (await fetch('/api/turnaround')).json()""")
            print("turnaround of the burst:", json.dumps(
                {"end_to_end": figures["end_to_end"], "from_receipt": figures["from_receipt"],
                 "stages": figures["stages"], "counts": figures["counts"]}))
            assert figures["end_to_end"]["count"] == STUDIES
            assert figures["counts"]["missing_acquisition"] == 0
            _shot(page, tmp_path, "turnaround")

            # Filtered by the sending AE: the same studies; by another: none.
            page.select_option("select[name=calling_ae]", CALLING_AE)
            page.click("#turnaround-filters button[type=submit]")
            page.wait_for_selector("table#percentiles")
            assert f"calling_ae={CALLING_AE}" in page.url
            assert cell("end_to_end", 3) == str(STUDIES)
            with page.expect_download() as download:
                page.click("[data-testid=csv]")
            lines = Path(download.value.path()).read_text().strip().splitlines()
            assert len(lines) == STUDIES + 1 and lines[0].startswith("study_instance_uid,")

            # A radiologist's verdict (an admin may give one) shows on the monitoring page.
            with factory() as session:
                rows = load_study_times(session)
            flagged = [t for t in rows if t.priority == "STAT"]
            uid = (flagged or rows)[0].study_instance_uid
            # Not waiting for "load": the key images are drawn from the series on first
            # request, which takes a while on a busy machine.
            page.goto(f"{web}/studies/{uid}", wait_until="domcontentloaded")
            page.check("form.fb-study input[value=AGREE]")
            page.click("form.fb-study button[type=submit]")
            page.wait_for_selector("table#feedback-list")
            page.click("nav a:has-text('Monitoring')")
            page.wait_for_selector("table#rates")
            version = json.loads((shipped_model_dir() / "manifest.json").read_text())["version"]
            row = page.locator(f"#rates tr[data-model='{version}']")
            assert row.count() == 1
            assert row.locator("td:nth-child(3)").inner_text() == str(STUDIES)
            agreement = page.locator(f"#agreement tr[data-model='{version}']")
            assert agreement.count() == 1
            if flagged:  # the verdict was on a positive: one agreed of one, PPV 100 %
                assert agreement.locator("td.ppv").inner_text() == "100 %"
            _shot(page, tmp_path, "monitoring")
        finally:
            browser.close()
