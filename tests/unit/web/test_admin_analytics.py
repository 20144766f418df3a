"""The turnaround and monitoring figures read from a real database (SQLite and PostgreSQL):
which analysis speaks for a study, the Study Date + Time fallback marked, ``GET
/api/turnaround``, the CSV, both pages, and the radiologists' agreement."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from harness.web import bearer, login
from service.db.session import make_engine, make_session_factory
from service.db.tables import (
    Analysis,
    AnalysisResult,
    AnalysisState,
    Feedback,
    FeedbackVerdict,
    Finding,
    Instance,
    Priority,
    Role,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow
from service.web import monitoring
from service.web.app import create_app
from service.web.study_view import current_analysis
from service.web.turnaround import AcquisitionSource, Filters
from service.web.turnaround_query import load_study_times, study_start

T0 = utcnow().replace(microsecond=0) - timedelta(hours=2)
TODAY = T0.date()


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def add(session: Session, uid: str, *, acquired: float | None = 0.0, received: float = 60,
        analysis: dict[str, float | None] | None = None, state: AnalysisState = AnalysisState.DONE,
        result: AnalysisResult | None = AnalysisResult.NO_FRACTURE_FOUND,
        model_version: str = "1.5.0", ae: str = "CT1", priority: Priority = Priority.ROUTINE,
        study_date: str | None = None, study_time: str | None = None,
        series_state: SeriesState = SeriesState.DONE, reason: str | None = None,
        suspected: tuple[str, ...] = ()) -> tuple[Study, Analysis | None]:
    study = Study(study_instance_uid=uid, priority=priority, study_date=study_date,
                  study_time=study_time, patient_name="SHOULD^NOTSHOW")
    series = Series(study=study, series_instance_uid=uid + ".1", modality="CT",
                    state=series_state, state_reason=reason if analysis is None else None,
                    acquired_at=_at(acquired), first_received_at=_at(received - 10),
                    last_received_at=_at(received), completed_at=_at(received + 5))
    session.add_all([study, series])
    session.flush()
    study.selected_series_id = series.id
    session.add(Instance(series_id=series.id, sop_instance_uid=uid + ".1.1",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2", spool_path="x.dcm",
                         size_bytes=1, sha256="0" * 64, calling_ae=ae,
                         received_at=_at(received)))
    row = None
    if analysis is not None:
        row = Analysis(series_id=series.id, model_version=model_version,
                       input_fingerprint=uid[-8:].rjust(8, "0"), state=state,
                       result=result if state is AnalysisState.DONE else None,
                       reason_code=reason, created_at=_at(analysis.get("queued_at") or 0),
                       **{k: _at(v) for k, v in analysis.items()})
        session.add(row)
        session.flush()
        for level in suspected:
            session.add(Finding(analysis_id=row.id, vertebra=level, in_view=True,
                                probability=0.9, suspected=True, plausible=True))
    session.commit()
    return study, row


FLOW: dict[str, float | None] = {
    "queued_at": 66, "started_at": 67, "inferred_at": 96, "flagged_at": 97,
    "results_stored_at": 105, "exported_at": 112, "finished_at": 105}
"""Seconds after T0 (acquisition at 0, first image at 50, last at 60, complete at 65)."""


def timeline(**changes: float | None) -> dict[str, float | None]:
    return {**FLOW, **changes}


@pytest.fixture
def db(migrated_url: str) -> Any:
    factory = make_session_factory(make_engine(migrated_url))
    with factory() as session:
        add(session, "1.fast", analysis=timeline())
        add(session, "2.slow", analysis=timeline(inferred_at=600, flagged_at=601,
                                                 results_stored_at=640, exported_at=None),
            priority=Priority.STAT, result=AnalysisResult.FRACTURE_SUSPECTED, ae="CT2",
            suspected=("C2",))
        add(session, "3.noacq", acquired=None, analysis=timeline(), model_version="1.4.0")
        add(session, "4.inflight", analysis=timeline(inferred_at=None, flagged_at=None,
                                                     results_stored_at=None, exported_at=None,
                                                     finished_at=None),
            state=AnalysisState.RUNNING, priority=Priority.PENDING, result=None)
        add(session, "5.refused", analysis=None, series_state=SeriesState.NOT_ANALYZABLE,
            reason="NOT_CERVICAL", priority=Priority.PENDING)
        add(session, "6.incon", analysis=timeline(), priority=Priority.INCONCLUSIVE,
            result=AnalysisResult.INCONCLUSIVE)
        add(session, "7.scope", analysis=timeline(inferred_at=None, finished_at=90,
                                                  flagged_at=91, results_stored_at=None,
                                                  exported_at=None),
            state=AnalysisState.NOT_ANALYZABLE, reason="NO_CERVICAL_SPINE",
            priority=Priority.NOT_ANALYZED)
    yield migrated_url, factory


def test_load_study_times_reads_the_pipelines_timestamps(db: Any) -> None:
    url, factory = db
    with factory() as session:
        rows = {t.study_instance_uid: t for t in load_study_times(session)}
        # The same analysis speaks for each study as on the study page.
        for uid, times in rows.items():
            study = session.query(Study).filter_by(study_instance_uid=uid).one()
            _series, analysis = current_analysis(session, study)
            assert times.model_version == (analysis.model_version if analysis else None)
    assert set(rows) == {"1.fast", "2.slow", "3.noacq", "4.inflight", "5.refused", "6.incon",
                         "7.scope"}
    fast = rows["1.fast"]
    assert seconds(fast.acquired, fast.flagged) == 97
    assert seconds(fast.stored, fast.sent) == 7 and fast.calling_aes == ("CT1",)
    assert rows["3.noacq"].acquired is None
    assert rows["5.refused"].ended_unflagged and rows["5.refused"].analyzed is None
    # NOT_ANALYZABLE in the worker: its answer time is when it finished.
    assert seconds(rows["7.scope"].acquired, rows["7.scope"].analyzed) == 90


def seconds(start: datetime | None, end: datetime | None) -> float:
    assert start is not None and end is not None
    return (end - start).total_seconds()


def test_study_date_time_fallback_is_marked(migrated_url: str) -> None:
    """An acquisition time equal to the Study Date + Time, derived as the ingest code does,
    is marked ``study_start``; another is plain ``header``."""
    start = study_start("20261203", "081500")
    assert start is not None and start.tzinfo is not None
    factory = make_session_factory(make_engine(migrated_url))
    with factory() as session:
        study, _ = add(session, "9.fallback", acquired=0, analysis=timeline(),
                       study_date="20261203", study_time="081500")
        series = session.query(Series).filter_by(study_id=study.id).one()
        series.acquired_at = start
        series.first_received_at = start + timedelta(seconds=50)
        series.last_received_at = start + timedelta(seconds=60)
        add(session, "9.header", acquired=0, analysis=timeline(), study_date="20261203",
            study_time="070000")
        session.commit()
        rows = {t.study_instance_uid: t for t in load_study_times(session)}
    assert rows["9.fallback"].acquisition_source is AcquisitionSource.STUDY_START
    assert rows["9.header"].acquisition_source is AcquisitionSource.HEADER


def test_date_range_selects_by_first_receipt(db: Any) -> None:
    _url, factory = db
    with factory() as session:
        assert load_study_times(session, Filters(date_from=TODAY + timedelta(days=1))) == []
        assert len(load_study_times(session, Filters(date_from=TODAY, date_to=TODAY))) == 7


def test_api_turnaround_figures(db: Any, tmp_path: Any) -> None:
    url, factory = db
    app = create_app_for(url, data_dir=tmp_path / "var")
    with TestClient(app) as client:
        client.headers.update(bearer(url, "boss", Role.ADMIN))
        body = client.get("/api/turnaround").json()
        assert body["target_s"] == 480
        e2e = body["end_to_end"]
        # flagged with an acquisition time: fast 97, slow 601, incon 97, scope 91
        assert e2e["count"] == 4 and e2e["p50_s"] == 97
        assert e2e["p99_s"] == pytest.approx(97 + 0.97 * (601 - 97))
        assert set(body["stages"]) == {"received", "complete", "queued", "analyzed", "flagged",
                                       "stored", "sent"}
        assert body["stages"]["sent"]["count"] == 3
        assert body["counts"]["in_flight"] == 1 and body["counts"]["not_flagged"] == 1
        assert body["counts"]["missing_acquisition"] == 1
        # Slowest first: the study still running after two hours, waiting to be analyzed,
        # then the flagged one whose analysis took 534 s.
        assert [b["study_instance_uid"] for b in body["breaches"]] == ["4.inflight", "2.slow"]
        stuck, slow = body["breaches"]
        assert stuck["status"] == "in_flight" and stuck["slowest_stage"] == "analyzed"
        assert stuck["judged_s"] > 7000
        assert slow["slowest_stage"] == "analyzed" and slow["slowest_s"] == 534
        assert slow["judged_s"] == 601
        only = client.get("/api/turnaround", params={"calling_ae": "CT2"}).json()
        assert only["end_to_end"]["count"] == 1 and only["end_to_end"]["p50_s"] == 601
        stat = client.get("/api/turnaround", params={"priority": "stat"}).json()
        assert stat["counts"]["studies"] == 1
        old = client.get("/api/turnaround", params={"model_version": "1.4.0"}).json()
        assert old["counts"]["studies"] == 1 and old["end_to_end"]["count"] == 0
        assert old["from_receipt"]["count"] == 1
        future = client.get("/api/turnaround",
                            params={"date_from": (TODAY + timedelta(days=1)).isoformat()})
        assert future.json()["counts"]["studies"] == 0
        malformed = client.get("/api/turnaround", params={"date_from": "yesterday"})
        assert malformed.status_code == 422
        assert malformed.json()["detail"][0]["loc"] == ["query", "date_from"]


def create_app_for(url: str, **overrides: Any) -> Any:
    from pydantic import SecretStr

    from service.config import Settings

    return create_app(Settings(database_url=url, secret_key=SecretStr("analytics-test-secret"),
                               **overrides))


def test_turnaround_page_csv_and_monitoring_page(db: Any, tmp_path: Any) -> None:
    url, factory = db
    app = create_app_for(url, data_dir=tmp_path / "var", turnaround_target_s=100.0)
    with TestClient(app) as client:
        login(client, url, "boss", Role.ADMIN)
        page = client.get("/admin/turnaround")
        assert page.status_code == 200
        html = page.text
        assert 'data-stage="end_to_end"' in html and "<svg" in html
        assert 'class="band"' in html and "SHOULD" not in html  # no patient name
        # Target 100 s: slow (601 s) is over it, named by its slowest stage.
        assert 'data-uid="2.slow"' in html and 'data-uid="1.fast"' not in html.split(
            'id="breaches"')[1]
        assert 'href="/admin/turnaround"' in html and 'href="/admin/monitoring"' in html
        # The filter form sends every field, empty for "any".
        empty = {"date_from": "", "date_to": "", "calling_ae": "", "priority": "",
                 "model_version": ""}
        assert client.get("/admin/turnaround", params=empty).status_code == 200
        assert client.get("/admin/monitoring", params={"date_from": "", "date_to": "",
                                                       "period": "week"}).status_code == 200
        response = client.get("/admin/turnaround.csv", params={"priority": "STAT"})
        assert response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert [r["study_instance_uid"] for r in rows] == ["2.slow"]
        assert rows[0]["end_to_end_s"] == "601.000" and rows[0]["slowest_stage"] == "analyzed"
        full = list(csv.DictReader(io.StringIO(client.get("/admin/turnaround.csv").text)))
        assert len(full) == 7
        monitor = client.get("/admin/monitoring")
        assert monitor.status_code == 200 and 'id="agreement"' in monitor.text
        assert "NO_CERVICAL_SPINE" in monitor.text and "NOT_CERVICAL" in monitor.text
    with factory() as session:
        from service.db.tables import AuditEvent

        events = {e.event_type for e in session.query(AuditEvent).filter(
            AuditEvent.actor == "boss")}
    assert {"turnaround.view", "turnaround.export", "monitoring.view"} <= events


def test_monitoring_rates_and_agreement(db: Any) -> None:
    url, factory = db
    with factory() as session:
        slow = session.query(Study).filter_by(study_instance_uid="2.slow").one()
        _s, slow_analysis = current_analysis(session, slow)
        fast = session.query(Study).filter_by(study_instance_uid="1.fast").one()
        _s, fast_analysis = current_analysis(session, fast)
        assert slow_analysis is not None and fast_analysis is not None
        session.add_all([
            Feedback(study_id=slow.id, analysis_id=slow_analysis.id, username="rad",
                     vertebra="C2", verdict=FeedbackVerdict.AGREE),
            Feedback(study_id=slow.id, analysis_id=slow_analysis.id, username="rad",
                     vertebra="C6", verdict=FeedbackVerdict.MISSED),
            Feedback(study_id=fast.id, analysis_id=fast_analysis.id, username="rad",
                     vertebra=None, verdict=FeedbackVerdict.DISAGREE),
        ])
        session.commit()
        outcomes, verdicts = monitoring.load(session)
        # The day range bounds the answers in the database query (both dialects).
        same_day, _ = monitoring.load(session, TODAY, TODAY)
        assert len(same_day) == len(outcomes) == 6
        assert monitoring.load(session, TODAY + timedelta(days=1)) == ([], [])
        assert monitoring.load(session, None, TODAY - timedelta(days=1)) == ([], [])
    report = monitoring.summarize(outcomes, verdicts, monitoring.Period.DAY)
    rows = {r.model_version: r for r in report.rows}
    current = rows["1.5.0"]
    # 1.5.0 answered fast (negative), slow (positive), incon; scope NOT_ANALYZABLE
    assert (current.done, current.positive, current.inconclusive, current.negative) == (3, 1, 1, 1)
    assert current.positive_rate == pytest.approx(1 / 3)
    assert current.not_analyzable == 1 and current.reasons["NO_CERVICAL_SPINE"] == 1
    assert rows[monitoring.BEFORE_MODEL].reasons["NOT_CERVICAL"] == 1
    agreement = {a.model_version: a for a in report.agreement}["1.5.0"]
    assert (agreement.positives, agreement.positives_with_verdict, agreement.agreed) == (1, 1, 1)
    assert agreement.ppv == 1.0
    assert agreement.missed_on_negative == 1  # study-level DISAGREE on "no fracture found"
    assert agreement.missed_levels_on_flagged == 1


def test_positive_verdict_rules() -> None:
    when = datetime(2026, 12, 1, tzinfo=UTC)
    positive = monitoring.Outcome(key=1, model_version="m", at=when, state=AnalysisState.DONE,
                                  result=AnalysisResult.FRACTURE_SUSPECTED,
                                  suspected_levels=frozenset({"C2"}))

    def v(vertebra: str | None, verdict: FeedbackVerdict, minute: int) -> monitoring.Verdict:
        return monitoring.Verdict(1, vertebra, verdict, when + timedelta(minutes=minute))

    assert monitoring.positive_verdict(positive, []) is None
    assert monitoring.positive_verdict(positive, [v("C5", FeedbackVerdict.AGREE, 0)]) is None
    assert monitoring.positive_verdict(positive, [v("C2", FeedbackVerdict.DISAGREE, 0)]) is False
    # The latest study-level verdict decides over per-level ones.
    assert monitoring.positive_verdict(positive, [
        v("C2", FeedbackVerdict.AGREE, 0), v(None, FeedbackVerdict.AGREE, 1),
        v(None, FeedbackVerdict.DISAGREE, 2)]) is False
    assert monitoring.period_of(datetime(2026, 12, 3, 23, tzinfo=UTC),
                                monitoring.Period.WEEK) == date(2026, 11, 30)
