"""The admin's audit and status pages in a real browser (Debian's chromium, Playwright), with a
real ``triage worker`` on the real Redis.

A radiologist opens a study; an admin finds that view in the audit page by the patient's ID,
sees the failed analysis on the status page next to the worker's heartbeat (its execution
provider and model), presses Retry, and the worker takes the re-queued task from the broker.
Screenshots land in the test's tmp dir; with ``UPDATE_DASHBOARD_SCREENSHOTS=1`` they also
replace ``docs/admin-audit.png`` and ``docs/admin-status.png``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from harness.data.admin_seed import make_export_failed, make_failed, make_not_analyzable
from harness.data.worklist_seed import ALL, FRACTURED, INCONCLUSIVE, NORMAL, add_study
from harness.process import free_port
from harness.web import PASSWORD, make_user
from harness.worker import WorkerProcess, shipped_model_dir, wait_for_state, worker_env
from service.audit import record
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, AnalysisState, AuditEvent, Role
from service.db.types import utcnow
from service.model_manifest import model_version
from service.web.app import create_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DOCS = Path(__file__).resolve().parents[2] / "docs"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed at /usr/bin/chromium "
                                       "(apt-get install chromium)")


@pytest.fixture
def server(tmp_path: Path, settings_factory: Any, redis_url: str
           ) -> Iterator[tuple[str, str, Settings]]:
    """The app under uvicorn on a free port, over a migrated SQLite database and the real
    Redis as broker."""
    import uvicorn

    url = f"sqlite:///{tmp_path / 'triage.db'}"
    migrate.upgrade(url)
    settings = settings_factory(database_url=url, broker_url=redis_url,
                                secret_key="browser-test-secret",
                                model_dir=shipped_model_dir())
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}", url, settings
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


def _shot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_DASHBOARD_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / path.name)


def _login(page: Any, base: str, username: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("table#worklist")


def _wait_for_heartbeat(base_settings: Settings, worker: WorkerProcess,
                        timeout_s: float = 120) -> None:
    import redis

    from service.heartbeat import read_heartbeats

    client = redis.Redis.from_url(str(base_settings.broker_url))
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert worker.alive(), f"worker exited:\n{worker.output()}"
            if read_heartbeats(client):
                return
            time.sleep(0.2)
    finally:
        client.close()
    raise AssertionError(f"no worker heartbeat within {timeout_s} s:\n{worker.output()}")


def test_admin_finds_a_view_and_retries_a_failed_analysis(
        server: tuple[str, str, Settings], tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (the dev extra) is not installed")
    base, db_url, settings = server
    factory = make_session_factory(make_engine(db_url))
    with factory() as session:
        for spec in ALL:
            add_study(session, spec)
        failed = make_failed(session, FRACTURED)
        make_not_analyzable(session, NORMAL)
        make_export_failed(session, INCONCLUSIVE)
        # What the worker and the export task would have written when those went wrong.
        record(session, "analysis.failed", outcome="failure", actor=settings.ae_title,
               study_instance_uid=FRACTURED.uid, series_instance_uid=FRACTURED.uid + ".1",
               details={"analysis_id": failed, "attempts": 3,
                        "error": "RuntimeError: ONNX Runtime session lost"})
        record(session, "export.failed", outcome="failure", actor=settings.ae_title,
               study_instance_uid=INCONCLUSIVE.uid,
               details={"object_kind": "SEG", "destination": "PACS",
                        "error": "association rejected (permanent): called AE unknown"})
        session.commit()
    make_user(db_url, "dr.grey", Role.RADIOLOGIST)
    make_user(db_url, "admin.ana", Role.ADMIN)
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
    try:
        _wait_for_heartbeat(settings, worker)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                radiologist = browser.new_page(viewport={"width": 1360, "height": 820})
                radiologist.set_default_timeout(30000)
                _login(radiologist, base, "dr.grey")
                assert radiologist.locator("a[href='/admin/audit']").count() == 0
                radiologist.goto(f"{base}/studies/{FRACTURED.uid}")
                radiologist.wait_for_selector("#study")
                assert radiologist.goto(base + "/admin/audit").status == 403

                admin = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
                admin.set_default_timeout(30000)
                _login(admin, base, "admin.ana")
                admin.click("a[href='/admin/audit']")
                admin.wait_for_selector("#audit-events")
                assert "Chain intact" in admin.inner_text("[data-testid=chain-status]")
                admin.fill("input[name=subject]", "PID1")  # FRACTURED's patient ID
                admin.fill("input[name=user]", "dr.grey")
                admin.click("#audit-filters button[type=submit]")
                admin.wait_for_url("**subject=PID1**")
                views = admin.locator("tr[data-event-type='study.view'][data-actor='dr.grey']")
                assert views.count() == 1
                assert FRACTURED.uid in views.first.inner_text()
                admin.fill("input[name=user]", "")
                admin.click("#audit-filters button[type=submit]")
                admin.wait_for_url("**user=&**")  # the field is sent empty: any actor
                assert admin.locator("#audit-events tbody tr").count() > views.count()
                _shot(admin, tmp_path, "admin-audit")

                admin.click("a[href='/admin/status']")
                admin.wait_for_selector("#workers")
                worker_row = admin.locator("[data-testid=worker]").first.inner_text()
                shipped = model_version(shipped_model_dir())
                assert "CPUExecutionProvider" in worker_row and shipped in worker_row, \
                    (shipped, worker_row)
                row = admin.locator(f"tr[data-analysis='{failed}']")
                assert "ONNX Runtime session lost" in row.inner_text()
                _shot(admin, tmp_path, "admin-status")
                retried_at = utcnow()
                row.locator("button", has_text="Retry").click()
                admin.wait_for_selector("[data-testid=notice]")
                assert "queued again" in admin.inner_text("[data-testid=notice]")
            finally:
                browser.close()
        # The worker took the task from the broker and ran it: the seeded series has no
        # images in the spool, so it ends not analyzable, with its first new attempt.
        done = wait_for_state(factory, failed, {AnalysisState.DONE,
                                                AnalysisState.NOT_ANALYZABLE,
                                                AnalysisState.FAILED}, worker)
        with factory() as session:
            analysis = session.get(Analysis, failed)
            assert analysis is not None
            assert analysis.attempts == 1 and analysis.started_at is not None
            assert analysis.started_at >= retried_at
            assert analysis.task_id, "the task id the worker ran is recorded"
            retry_events = list(session.execute(select(AuditEvent).where(
                AuditEvent.event_type == "analysis.retry")).scalars())
            assert [(e.actor, e.study_instance_uid) for e in retry_events] == [
                ("admin.ana", FRACTURED.uid)]
        assert done.state is not AnalysisState.QUEUED
    finally:
        worker.stop()
