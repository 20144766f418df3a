"""The admin's audit page (search, filters, paging, CSV, chain status) and status page (queues,
workers, disks, failures, retry and resend through the real broker), on both databases."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from harness.data.admin_seed import make_export_failed, make_failed, make_not_analyzable
from harness.data.worklist_seed import FRACTURED, INCONCLUSIVE, NORMAL, seed
from harness.web import login, make_user
from service.audit import record
from service.audit.search import AuditQuery, search
from service.db.session import make_engine, make_session_factory
from service.db.tables import (
    Analysis,
    AnalysisState,
    AuditEvent,
    Export,
    ExportState,
    Role,
    SeriesState,
)
from service.db.types import utcnow
from service.heartbeat import Heartbeat
from service.queue import ANALYSIS_QUEUE, EXPORT_QUEUE, TASK_ANALYZE_SERIES, TASK_EXPORT_RESULT
from service.web.app import create_app


@pytest.fixture
def factory(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def seeded(factory: sessionmaker[Session], migrated_url: str) -> str:
    with factory() as session:
        seed(session)
    make_user(migrated_url, "rad", Role.RADIOLOGIST)
    make_user(migrated_url, "adm", Role.ADMIN)
    return migrated_url


def _events(factory: sessionmaker[Session], event_type: str) -> list[AuditEvent]:
    with factory() as session:
        return list(session.execute(select(AuditEvent).where(
            AuditEvent.event_type == event_type).order_by(AuditEvent.id)).scalars())


def _rows(html: str) -> list[str]:
    """The event ids of the audit table, in page order."""
    body = html.split('id="audit-events"', 1)[1].split("</table>", 1)[0]
    return re.findall(r"<tr class=\"outcome-[^\"]*\"[^>]*>\s*<td>(\d+)</td>", body)


# --- audit ---------------------------------------------------------------------------------


def test_radiologist_view_is_found_by_patient_and_the_search_is_audited(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session]) -> None:
    app = create_app(settings_factory(database_url=seeded))
    with TestClient(app) as rad:
        login(rad, seeded, "rad")  # the worklist read: lists every seeded study
        assert rad.get(f"/studies/{FRACTURED.uid}").status_code == 200
        assert rad.get("/admin/audit").status_code == 403
    with TestClient(app) as adm:
        login(adm, seeded, "adm", Role.ADMIN)
        page = adm.get("/admin/audit", params={"subject": "PID1", "user": "rad"})
        assert page.status_code == 200, page.text
        ids = _rows(page.text)
        with factory() as session:
            shown = {e.id: e for e in session.execute(
                select(AuditEvent).where(AuditEvent.id.in_([int(i) for i in ids]))).scalars()}
        kinds = sorted(shown[int(i)].event_type for i in ids)
        # The study page read and the worklist read that listed the patient, nothing else.
        assert kinds == ["study.view", "worklist.view"], kinds
        assert all(e.actor == "rad" for e in shown.values())
        assert "Chain intact" in page.text
        assert "about 1 study" in page.text  # PID1 names one study, not two
        # A study UID names the same reads; a narrower action filter keeps only the page.
        by_uid = adm.get("/admin/audit", params={"subject": FRACTURED.uid,
                                                 "event_type": "study.view"})
        assert len(_rows(by_uid.text)) == 1
        nobody = adm.get("/admin/audit", params={"subject": "PID1", "user": "someone-else"})
        assert _rows(nobody.text) == [] and "No event matches" in nobody.text
    views = _events(factory, "audit.view")
    assert [v.actor for v in views] == ["adm"] * 3
    assert views[0].details is not None
    assert views[0].details["filters"] == {"subject": "PID1", "user": "rad"}
    assert FRACTURED.uid in views[0].details["studies"]


def test_filters_prefix_outcome_time_and_paging(seeded: str, settings_factory: Any,
                                                 factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with factory() as session:
        for n in range(60):
            record(session, "dicom.store", actor="CT_SCANNER_1",
                   occurred_at=now - timedelta(days=2, minutes=n))
        record(session, "auth.login", outcome="failure", actor="mallory",
               details={"reason": "bad_credentials"}, occurred_at=now - timedelta(hours=1))
        session.commit()
        # Service layer: prefix match, outcome, and a time window that excludes the old ones.
        auth_only = search(session, AuditQuery(event_type="auth."))
        # Nobody logged in yet: the one auth.* event is mallory's (user.add is not auth.).
        assert [e.event_type for e in auth_only.events] == ["auth.login"]
        failures = search(session, AuditQuery(outcome="failure"))
        assert [e.actor for e in failures.events] == ["mallory"]
        recent = search(session, AuditQuery(actor="CT_SCANNER_1",
                                            since=now - timedelta(days=1)))
        assert recent.total == 0
        window = search(session, AuditQuery(actor="CT_SCANNER_1",
                                            since=now - timedelta(days=2, minutes=9),
                                            until=now - timedelta(days=2)))
        assert window.total == 9  # minutes 1..9 (minute 0 is at `until`, excluded)
    app = create_app(settings_factory(database_url=seeded))
    with TestClient(app) as adm:
        login(adm, seeded, "adm", Role.ADMIN)
        first = adm.get("/admin/audit", params={"user": "CT_SCANNER_1"})
        second = adm.get("/admin/audit", params={"user": "CT_SCANNER_1", "offset": 50})
        one, two = _rows(first.text), _rows(second.text)
        assert len(one) == 50 and len(two) == 10 and not set(one) & set(two)
        assert [int(i) for i in one] == sorted((int(i) for i in one), reverse=True)
        assert 'rel="next"' in first.text and 'rel="next"' not in second.text
        assert "offset=0" in second.text  # the "newer" link keeps the filter
        assert "user=CT_SCANNER_1" in second.text
        day = (now - timedelta(days=2)).date().isoformat()
        by_day = adm.get("/admin/audit", params={"user": "CT_SCANNER_1", "since": day,
                                                 "until": day})
        expected = sum(1 for n in range(60)
                       if (now - timedelta(days=2, minutes=n)).date().isoformat() == day)
        assert len(_rows(by_day.text)) == min(expected, 50)


def test_csv_export_is_complete_quoted_neutralised_and_audited(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session]) -> None:
    with factory() as session:
        record(session, "auth.login", outcome="failure", actor="=HYPERLINK(\"x\")",
               details={"reason": "bad_credentials", "note": "a, \"quoted\"\nline"})
        for _n in range(1205):  # more than one keyset batch
            record(session, "dicom.echo", actor="PACS")
        session.commit()
    app = create_app(settings_factory(database_url=seeded))
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        response = client.get("/admin/audit.csv", params={"user": "PACS"})
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/csv")
        assert "attachment" in response.headers["content-disposition"]
        rows = list(csv.reader(io.StringIO(response.text)))
        assert rows[0][:4] == ["id", "occurred_at", "event_type", "outcome"]
        assert len(rows) == 1 + 1205 and {r[2] for r in rows[1:]} == {"dicom.echo"}
        ids = [int(r[0]) for r in rows[1:]]
        assert ids == sorted(ids)
        evil = list(csv.reader(io.StringIO(client.get(
            "/admin/audit.csv", params={"outcome": "failure"}).text)))
        assert evil[1][4] == "'=HYPERLINK(\"x\")"  # not a formula in a spreadsheet
        assert json.loads(evil[1][8])["note"] == "a, \"quoted\"\nline"
        radiologist = TestClient(app)
        login(radiologist, seeded, "rad")
        assert radiologist.get("/admin/audit.csv").status_code == 403
    exports = _events(factory, "audit.export")
    assert [e.details["filters"] for e in exports if e.details] == [
        {"user": "PACS"}, {"outcome": "failure"}]


def test_broken_chain_is_shown_with_its_first_broken_link(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session]) -> None:
    app = create_app(settings_factory(database_url=seeded))
    with factory() as session:
        record(session, "dicom.store", actor="CT_SCANNER_1")
        session.commit()
        last_good = session.execute(select(AuditEvent.id).order_by(
            AuditEvent.id.desc()).limit(1)).scalar_one()
        # A row written around record(): the append-only triggers allow INSERT, and nothing
        # but the chain can tell that this one was not chained by the service.
        forged = AuditEvent(occurred_at=utcnow(), event_type="study.view", outcome="success",
                            actor="ghost", prev_hash="f" * 64, hash="e" * 64,
                            study_instance_uid=FRACTURED.uid)
        session.add(forged)
        session.commit()
        forged_id = forged.id
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        page = client.get("/admin/audit")
    assert page.status_code == 200
    assert f"Chain broken at event {forged_id}" in page.text
    broken = page.text.split('data-testid="broken-event"', 1)[1].split("</tr>", 1)[0]
    assert f"<td>{forged_id}</td>" in broken and "ghost" in broken
    assert f"<td>{last_good}</td>" in page.text.split("last good", 1)[1].split("</tr>", 1)[0]
    views = _events(factory, "audit.view")
    assert views[-1].details is not None and views[-1].details["chain_intact"] is False


# --- status --------------------------------------------------------------------------------


def _messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    finally:
        client.close()


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match
    return match.group(1)


def test_status_page_shows_queues_workers_disks_and_what_needs_action(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session],
        redis_url: str) -> None:
    settings = settings_factory(database_url=seeded, broker_url=redis_url)
    with factory() as session:
        failed = make_failed(session, FRACTURED)
        not_analyzable = make_not_analyzable(session, NORMAL)
        export_id = make_export_failed(session, INCONCLUSIVE)
    import redis

    client = redis.Redis.from_url(redis_url)
    client.rpush(ANALYSIS_QUEUE, b"{}", b"{}")
    client.rpush(EXPORT_QUEUE + "\x06\x163", b"{}")
    client.hset("unacked", "tag-1", json.dumps([{"body": "..."}, "", ANALYSIS_QUEUE]))
    client.close()
    beat = Heartbeat(redis_url, {"host": "gpu-node-7", "pid": 4242,
                                 "execution_provider": "CUDAExecutionProvider",
                                 "model": "cspine-v1", "version": "1.5.0",
                                 "model_sha256": "ab12cd34ef56" + "0" * 52}, ttl_s=30,
                     interval_s=10)
    beat.beat()
    settings.results_path.mkdir(parents=True, exist_ok=True)
    (settings.results_path / "x.dcm").write_bytes(b"\0" * 4096)
    app = create_app(settings)
    with TestClient(app) as adm:
        login(adm, seeded, "adm", Role.ADMIN)
        page = adm.get("/admin/status")
        assert page.status_code == 200, page.text
        html = page.text
        rad = TestClient(app)
        login(rad, seeded, "rad")
        assert rad.get("/admin/status").status_code == 403
    assert 'data-queue="analysis"><td>analysis</td><td>2</td><td>1</td>' in html
    assert 'data-queue="export"><td>export</td><td>1</td><td>0</td>' in html
    worker = html.split('data-testid="worker"', 1)[1].split("</tr>", 1)[0]
    assert "gpu-node-7" in worker and "CUDAExecutionProvider" in worker
    assert "1.5.0" in worker and "ab12cd34ef56" in worker
    assert f'data-analysis="{failed}"' in html and f'data-analysis="{not_analyzable}"' in html
    assert "ONNX Runtime session lost" in html and "TOO_FEW_SLICES" in html
    assert f'data-export="{export_id}"' in html and "called AE unknown" in html
    assert "4.0 KiB" in html  # the result store's one file
    views = _events(factory, "admin.status.view")
    assert views[-1].actor == "adm" and views[-1].details is not None
    assert FRACTURED.uid in views[-1].details["studies"]


def test_retry_requeues_on_the_real_broker_and_is_audited(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session],
        redis_url: str) -> None:
    with factory() as session:
        failed = make_failed(session, FRACTURED)
    app = create_app(settings_factory(database_url=seeded, broker_url=redis_url))
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        csrf = _csrf(client.get("/admin/status").text)
        assert client.post(f"/admin/analyses/{failed}/retry",
                           follow_redirects=False).status_code == 403  # no CSRF token
        response = client.post(f"/admin/analyses/{failed}/retry", data={"csrf_token": csrf},
                               follow_redirects=False)
        assert response.status_code == 303, response.text
        assert response.headers["location"] == f"/admin/status?notice=retry_queued&id={failed}"
        assert "queued again" in client.get(response.headers["location"]).text
        again = client.post(f"/admin/analyses/{failed}/retry", data={"csrf_token": csrf},
                            follow_redirects=False)
        assert again.status_code == 409  # QUEUED now: not retryable twice
        assert client.post("/admin/analyses/999999/retry", data={"csrf_token": csrf},
                           follow_redirects=False).status_code == 404
    messages = _messages(redis_url, ANALYSIS_QUEUE)
    assert len(messages) == 1
    assert messages[0]["headers"]["task"] == TASK_ANALYZE_SERIES
    assert messages[0]["headers"]["argsrepr"] == f"[{failed}]"
    with factory() as session:
        analysis = session.get(Analysis, failed)
        assert analysis is not None
        assert analysis.state is AnalysisState.QUEUED and analysis.attempts == 0
        assert analysis.task_id == messages[0]["headers"]["id"]
        assert analysis.error is None and analysis.series.state is SeriesState.QUEUED
    retries = _events(factory, "analysis.retry")
    assert len(retries) == 1 and retries[0].actor == "adm"
    assert retries[0].study_instance_uid == FRACTURED.uid
    assert retries[0].details is not None and retries[0].details["analysis_id"] == failed
    assert retries[0].details["previous"]["state"] == "FAILED"
    assert _events(factory, "analysis.enqueued")[-1].details["analysis_id"] == failed  # type: ignore[index]


def test_retry_with_the_broker_down_leaves_it_pending_for_the_tracker(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session]) -> None:
    with factory() as session:
        analysis_id = make_not_analyzable(session, NORMAL)
    app = create_app(settings_factory(database_url=seeded, broker_url="redis://127.0.0.1:1/0",
                                      broker_connect_timeout_s=0.5))
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        csrf = _csrf(client.get("/admin/status").text)
        response = client.post(f"/admin/analyses/{analysis_id}/retry",
                               data={"csrf_token": csrf}, follow_redirects=False)
        assert response.headers["location"].endswith(f"notice=retry_pending&id={analysis_id}")
    with factory() as session:
        row = session.get(Analysis, analysis_id)
        assert row is not None and row.state is AnalysisState.PENDING and row.task_id is None
    assert len(_events(factory, "analysis.retry")) == 1


def test_resend_requeues_the_export_and_is_audited(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session],
        redis_url: str) -> None:
    with factory() as session:
        export_id = make_export_failed(session, INCONCLUSIVE)
        analysis_id = session.get(Export, export_id).analysis_id  # type: ignore[union-attr]
    app = create_app(settings_factory(database_url=seeded, broker_url=redis_url))
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        csrf = _csrf(client.get("/admin/status").text)
        response = client.post(f"/admin/exports/{export_id}/resend",
                               data={"csrf_token": csrf}, follow_redirects=False)
        assert response.status_code == 303
        assert response.headers["location"].endswith(f"notice=resend_queued&id={export_id}")
        sent = session_export = None
        with factory() as session:
            session_export = session.get(Export, export_id)
            sent = session.execute(select(Export.id).where(
                Export.analysis_id == analysis_id, Export.state == ExportState.SENT)).all()
        assert session_export is not None and session_export.state is ExportState.PENDING
        assert session_export.attempts == 0 and session_export.last_error is None
        assert len(sent) == 1  # the SR that had gone out is left alone
        assert client.post(f"/admin/exports/{export_id}/resend", data={"csrf_token": csrf},
                           follow_redirects=False).status_code == 409  # PENDING now
    messages = _messages(redis_url, EXPORT_QUEUE)
    assert [m["headers"]["task"] for m in messages] == [TASK_EXPORT_RESULT]
    assert messages[0]["headers"]["argsrepr"] == f"[{analysis_id}]"
    resends = _events(factory, "export.resend")
    assert len(resends) == 1 and resends[0].actor == "adm"
    assert resends[0].details is not None and resends[0].details["previous_state"] == "FAILED"


def test_chain_status_checks_the_anchors_like_the_cli(
        seeded: str, settings_factory: Any, factory: sessionmaker[Session]) -> None:
    from service.audit import write_anchor

    settings = settings_factory(database_url=seeded)
    anchors = settings.audit_anchor_path
    with factory() as session:
        record(session, "dicom.store", actor="CT_SCANNER_1")
        session.commit()
        good = write_anchor(session, anchors)
    assert good is not None
    app = create_app(settings)
    with TestClient(app) as client:
        login(client, seeded, "adm", Role.ADMIN)
        intact = client.get("/admin/audit").text
        assert "Chain intact" in intact and "the 1 anchored chain heads" in intact
        # An anchor the stored chain does not reproduce: what a rewritten (and re-chained)
        # history looks like, without needing the rights to rewrite one here.
        with anchors.open("a") as handle:
            handle.write(json.dumps({"event_id": good.event_id + 1, "hash": "0" * 64,
                                     "anchored_at": "2026-12-03T12:00:00+00:00"}) + "\n")
        rewritten = client.get("/admin/audit").text
        mismatch = rewritten.split('data-testid="anchor-mismatch"', 1)[1].split("</p>", 1)[0]
        assert f"anchor of event {good.event_id + 1} is not reproduced" in mismatch
        assert f"still matches is {good.event_id}" in mismatch
        assert "Chain broken at event" not in rewritten  # the links themselves verify
        anchors.write_text("not an anchor\n")
        unusable = client.get("/admin/audit").text
        assert "Anchor file not usable" in unusable and "not an anchor line" in unusable
