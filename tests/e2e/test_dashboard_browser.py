"""The dashboard in a real browser (Debian's chromium driven by Playwright).

A radiologist logs in, sees the fractured study above the normal one, watches a study that
lands while the page is open appear without a reload, opens the fractured study, gives
feedback on a vertebra and on the study, and logs out. Rows go straight into the database
(no model run) to stay fast. Screenshots land in the test's tmp dir; with
``UPDATE_DASHBOARD_SCREENSHOTS=1`` they also replace ``docs/dashboard-*.png``.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from harness.data.worklist_seed import (
    FRACTURED,
    INCONCLUSIVE,
    NORMAL,
    WAITING,
    add_imaged_study,
    add_study,
)
from harness.process import free_port
from harness.web import PASSWORD, make_user
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import AuditEvent, Feedback, FeedbackVerdict, Role
from service.results.store import ResultStore
from service.results.uids import ObjectKind
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
def server(tmp_path: Path, settings_factory) -> Iterator[tuple[str, str, Settings]]:  # type: ignore[no-untyped-def]
    """The app under uvicorn on a free port, over a migrated SQLite database."""
    import uvicorn

    url = f"sqlite:///{tmp_path / 'triage.db'}"
    migrate.upgrade(url)
    settings = settings_factory(database_url=url, worklist_poll_s=0.5,
                                secret_key="browser-test-secret",
                                viewer_url_template="https://viewer.example/viewer"
                                                    "?StudyInstanceUIDs={study_instance_uid}")
    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                            log_level="warning")
    uv = uvicorn.Server(config)
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


def _shot(page, tmp_path: Path, name: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_DASHBOARD_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / path.name)


def test_radiologist_reads_the_worklist_in_chromium(server: tuple[str, str, Settings],
                                                   tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright (the dev extra) is not installed")
    base, db_url, settings = server
    factory = make_session_factory(make_engine(db_url))
    with factory() as session:
        for spec in (NORMAL, INCONCLUSIVE, FRACTURED):
            add_study(session, spec)
        phantom_uid = add_imaged_study(session, settings).study_instance_uid
    make_user(db_url, "dr.house", Role.RADIOLOGIST)
    store = ResultStore.from_settings(settings)
    for kind in (ObjectKind.SR, ObjectKind.SEG):
        path = store.path_for(FRACTURED.uid + ".1", "1.5.0", kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 128 + b"DICM" + kind.value.encode())

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.set_default_timeout(30000)  # generous: CI machines are shared
            page.goto(base + "/")
            assert "/login" in page.url, "an anonymous visit goes to the login page"
            _shot(page, tmp_path, "login")
            page.fill("input[name=username]", "dr.house")
            page.fill("input[name=password]", "wrong password!")
            page.click("button[type=submit]")
            assert "Wrong user name or password" in page.inner_text(".error")
            page.fill("input[name=username]", "dr.house")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_selector("table#worklist")
            assert page.inner_text("[data-testid=user]") == "dr.house"

            uids = page.eval_on_selector_all("tr.row", "rows => rows.map(r => r.dataset.uid)")
            assert uids.index(FRACTURED.uid) < uids.index(phantom_uid) \
                < uids.index(INCONCLUSIVE.uid) < uids.index(NORMAL.uid), uids
            fractured_row = page.locator(f"tr.row[data-uid='{FRACTURED.uid}']")
            assert "C2 93 %" in fractured_row.inner_text()
            assert "fracture suspected" in fractured_row.inner_text()
            inconclusive_row = page.locator(f"tr.row[data-uid='{INCONCLUSIVE.uid}']")
            assert "inconclusive: not cleared" in inconclusive_row.inner_text()
            assert "no fracture found" in page.locator(
                f"tr.row[data-uid='{NORMAL.uid}']").inner_text()
            # Distinct looks: the INCONCLUSIVE row is not styled like a ROUTINE one.
            colors = page.evaluate(
                """uids => uids.map(u => getComputedStyle(
                    document.querySelector(`tr.row[data-uid='${u}'] td`)).backgroundColor)""",
                [FRACTURED.uid, INCONCLUSIVE.uid, NORMAL.uid])
            assert len(set(colors)) == 3, colors
            waiting = f"tr.row[data-uid='{FRACTURED.uid}'] td.waiting"
            first_wait = page.inner_text(waiting)
            page.wait_for_function(  # the waiting time ticks by itself, no fetch needed
                "([sel, before]) => document.querySelector(sel).textContent !== before",
                arg=[waiting, first_wait], timeout=10000)

            # A study lands while the page is open: it shows up without a reload.
            page.evaluate("window.__noReload = true")
            with factory() as session:
                add_study(session, WAITING)
            stored = time.monotonic()
            page.wait_for_selector(f"tr.row[data-uid='{WAITING.uid}']", timeout=20000)
            shown_after = time.monotonic() - stored
            assert page.evaluate("window.__noReload") is True, "the page reloaded"
            print(f"new study on the open worklist after {shown_after:.2f} s")
            assert shown_after < 10, "polled every 0.5 s: seconds at most, even on a busy box"

            page.click(f"tr.row[data-uid='{FRACTURED.uid}'] button[data-action=acknowledge]")
            page.wait_for_function(
                f"""() => document.querySelector("tr.row[data-uid='{FRACTURED.uid}'] td.reading")
                        .textContent.includes('acknowledged')""")
            _shot(page, tmp_path, "worklist")

            page.click(f"tr.row[data-uid='{FRACTURED.uid}'] a.open")
            page.wait_for_selector("table#levels")
            assert "Fracture suspected: C2, C5" in page.inner_text("[data-testid=result]")
            assert "DOE, JANE" in page.inner_text("h1")
            viewer = page.get_attribute("a:has-text('Open in viewer')", "href")
            assert viewer == ("https://viewer.example/viewer?StudyInstanceUIDs="
                              + FRACTURED.uid)
            with page.expect_download() as download:
                page.click("a:has-text('Download SR')")
            assert Path(download.value.path()).read_bytes().endswith(b"DICMSR")

            row = page.locator("table#levels tr[data-vertebra=C5]")
            row.locator("select[name=verdict]").select_option("DISAGREE")
            row.locator("input[name=comment]").fill("nutrient foramen, not a fracture")
            row.locator("button[type=submit]").click()
            page.wait_for_selector("table#feedback-list")
            page.check("form.fb-study input[value=MISSED]")
            page.fill("form.fb-study input[name=comment]", "C6 lamina fracture missed")
            page.click("form.fb-study button[type=submit]")
            page.wait_for_function(
                "() => document.querySelectorAll('#feedback-list tbody tr').length === 2")
            listing = page.inner_text("#feedback-list")
            assert "nutrient foramen" in listing and "missed" in listing
            _shot(page, tmp_path, "feedback")

            # The phantom study: key images drawn from its series and SEG.
            page.goto(f"{base}/")
            page.click(f"tr.row[data-uid='{phantom_uid}'] a.open")
            page.wait_for_selector("[data-testid=image-axial-C4]")
            page.wait_for_function(  # drawn on first request: load, SEG, render (slow on CI)
                """() => [...document.querySelectorAll('.images img')]
                        .every(i => i.complete && i.naturalWidth === 420)""", timeout=120000)
            assert page.locator(".images img").count() == 3
            assert "Fracture suspected: C4" in page.inner_text("[data-testid=result]")
            _shot(page, tmp_path, "study")

            page.goto(f"{base}/studies/{INCONCLUSIVE.uid}")
            banner = page.inner_text("[data-testid=result]")
            assert "Inconclusive: not cleared" in banner and "LEVEL_EXTENT_OUT_OF_RANGE" in banner
            _shot(page, tmp_path, "inconclusive")

            page.click("button:has-text('Log out')")
            page.wait_for_url("**/login")
            page.goto(base + "/")
            assert "/login" in page.url, "logged out: the worklist needs a login again"
        finally:
            browser.close()

    with factory() as session:
        stored = session.execute(select(Feedback).order_by(Feedback.id)).scalars().all()
        assert [(f.vertebra, f.verdict, f.username) for f in stored] == [
            ("C5", FeedbackVerdict.DISAGREE, "dr.house"), (None, FeedbackVerdict.MISSED,
                                                           "dr.house")]
        events = {(e.event_type, e.actor, e.outcome) for e in session.execute(
            select(AuditEvent)).scalars()}
    assert ("auth.login", "dr.house", "failure") in events
    assert ("auth.login", "dr.house", "success") in events
    assert ("worklist.view", "dr.house", "success") in events
    assert ("study.view", "dr.house", "success") in events
    assert ("result.download", "dr.house", "success") in events
    assert ("feedback.create", "dr.house", "success") in events
    assert ("auth.logout", "dr.house", "success") in events
