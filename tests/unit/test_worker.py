"""Worker task bodies in-process (no broker): states, reasons and idempotence.

The real Celery worker, SIGKILL redelivery and the shipped model are exercised in
tests/integration/test_worker.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from harness.worker import count_events, spool_series
from service.db.session import make_engine, make_session_factory
from service.db.tables import (
    Analysis,
    AnalysisState,
    Priority,
    Series,
    SeriesState,
    Study,
)
from service.queue import make_celery
from service.synthetic import PhantomOptions, generate_phantom, write_series
from service.worker import WorkerContext, analyze, notify_analysis, retry_analysis


@pytest.fixture
def ctx(tmp_path: Path, migrated_url: str, settings_factory):  # type: ignore[no-untyped-def]
    settings = settings_factory(database_url=migrated_url, broker_url="redis://127.0.0.1:1/0",
                                model_dir=tmp_path / "no-model", min_slices=20)
    context = WorkerContext.create(settings, make_celery(settings))
    yield context
    context.engine.dispose()


def _small_series(tmp_path: Path, n_slices: int) -> list[Path]:
    options = PhantomOptions(seed=7, matrix=64, pixel_spacing=3.2, slice_spacing=3.0,
                             n_slices=n_slices, shoulders=False)
    return write_series(generate_phantom(options), tmp_path / "series")


def test_unloadable_series_is_not_analyzable_with_its_reason(tmp_path: Path, ctx) -> None:  # type: ignore[no-untyped-def]
    analysis_id = spool_series(ctx.settings, _small_series(tmp_path, 8), ctx.session_factory)
    assert analyze(ctx, analysis_id) == "NOT_ANALYZABLE"
    with ctx.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None
        assert analysis.reason_code == "TOO_FEW_SLICES"
        assert analysis.series.state is SeriesState.NOT_ANALYZABLE
        assert analysis.series.state_reason == "TOO_FEW_SLICES"
        study = analysis.series.study
        assert study.priority is Priority.NOT_ANALYZED
        assert "TOO_FEW_SLICES" in (study.priority_reason or "")
    # A redelivered task finds a final state and does nothing.
    assert analyze(ctx, analysis_id) == "SKIPPED"
    assert count_events(ctx.session_factory, "analysis.not_analyzable") == 1


def test_missing_model_fails_with_a_clear_error_and_can_be_retried(  # type: ignore[no-untyped-def]
        tmp_path: Path, ctx) -> None:
    analysis_id = spool_series(ctx.settings, _small_series(tmp_path, 30), ctx.session_factory)
    assert analyze(ctx, analysis_id) == "FAILED"
    with ctx.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.error is not None
        assert "model unusable" in analysis.error and "manifest" in analysis.error
        assert analysis.series.state is SeriesState.FAILED
    with ctx.session_factory() as session, session.begin():
        retry_analysis(session, analysis_id, actor="admin")
    with ctx.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        assert analysis is not None and analysis.state is AnalysisState.PENDING
    with ctx.session_factory() as session, session.begin(), pytest.raises(ValueError):
        retry_analysis(session, analysis_id, actor="admin")  # PENDING is not retryable


def test_unknown_analysis_is_dropped(ctx) -> None:  # type: ignore[no-untyped-def]
    assert analyze(ctx, 999_999) == "SKIPPED"


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_notification_carries_the_flag_and_is_audited(migrated_url: str, settings_factory) -> None:  # type: ignore[no-untyped-def]
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # A plain-http local receiver: allowed in development mode only (test_notify covers the
    # https-only rule and the signature).
    settings = settings_factory(database_url=migrated_url, broker_url="redis://127.0.0.1:1/0",
                                webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                                development_mode=True)
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with factory() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", patient_id="P", priority=Priority.STAT,
                      priority_reason="fracture suspected: C2")
        series = Series(study=study, series_instance_uid="1.2.3.4", state=SeriesState.DONE)
        session.add(Analysis(series=series, model_version="v1", input_fingerprint="f",
                             state=AnalysisState.DONE, suspected=True,
                             patient_probability=0.93))
    with factory() as session:
        analysis_id = session.execute(select(Analysis.id)).scalar_one()
    context = WorkerContext(settings=settings, engine=engine, session_factory=factory,
                            celery=make_celery(settings))
    try:
        assert notify_analysis(context, analysis_id) == {"webhook": None}
    finally:
        server.shutdown()
        engine.dispose()
    payload = _Hook.received[-1]
    assert json.dumps(payload).find("1.2.3") >= 0
    assert payload.get("patient_id") is None  # the webhook carries no patient identifiers
    assert count_events(factory, "notify.sent") == 1


def test_the_flag_does_not_wait_for_the_paperwork(tmp_path: Path, migrated_url: str,  # type: ignore[no-untyped-def]
                                                  settings_factory, monkeypatch) -> None:
    """The study is flagged (priority, flagged_at, findings, answer) before the SR and SEG
    are built; a failure while building them leaves the flag standing and ends FAILED."""
    import service.worker as worker_module
    from harness.worker import shipped_model_dir
    from service.synthetic import FractureSpec, FractureType

    settings = settings_factory(database_url=migrated_url, broker_url="redis://127.0.0.1:1/0",
                                model_dir=shipped_model_dir())
    context = WorkerContext.create(settings, make_celery(settings))
    options = PhantomOptions(seed=501, matrix=256, pixel_spacing=0.8, slice_spacing=1.25,
                             n_slices=None, fractures=[FractureSpec(FractureType.BODY, "C5")])
    files = write_series(generate_phantom(options), tmp_path / "series")
    analysis_id = spool_series(settings, files, context.session_factory)
    seen: dict[str, Any] = {}

    def results_fail(ctx, volume, findings):  # type: ignore[no-untyped-def]
        with ctx.session_factory() as session:
            analysis = session.get(Analysis, analysis_id)
            study = session.execute(select(Study)).scalar_one()
            seen.update(state=analysis.state, result=analysis.result,
                        flagged_at=analysis.flagged_at, inferred_at=analysis.inferred_at,
                        priority=study.priority, findings=len(analysis.findings))
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(worker_module, "_store_results", results_fail)
    try:
        assert analyze(context, analysis_id) == "FAILED"
    finally:
        context.engine.dispose()
    # While the results were being built, the answer and the flag were already there.
    assert seen["state"] is AnalysisState.RUNNING and seen["result"] is not None
    assert seen["flagged_at"] is not None and seen["inferred_at"] <= seen["flagged_at"]
    assert seen["priority"] is not Priority.PENDING and seen["findings"] == 7
    factory = make_session_factory(make_engine(migrated_url))
    with factory() as session:
        analysis = session.get(Analysis, analysis_id)
        study = session.execute(select(Study)).scalar_one()
        assert analysis.state is AnalysisState.FAILED and "disk on fire" in analysis.error
        assert study.priority is seen["priority"]  # the flag stands
        assert analysis.results_stored_at is None
