"""A real Celery worker on the real Redis runs analyses end to end (issue 7).

Each test writes a synthetic series into the spool, lets the bookkeeper register it, creates
the PENDING analysis as the tracker would, and enqueues it through the same dispatcher the
SCP uses; `triage worker` runs in its own process with the shipped ONNX model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import func, select

from harness.worker import (
    WorkerProcess,
    count_events,
    shipped_model_dir,
    spool_series,
    wait_for_state,
    worker_env,
)
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import AnalysisState, Finding, Priority, SeriesState, Study
from service.ingest.dispatch import AnalysisDispatcher
from service.synthetic import (
    FractureSpec,
    FractureType,
    PhantomOptions,
    generate_phantom,
    write_series,
)

pytestmark = pytest.mark.slow


def _series(tmp_path: Path, *, seed: int, matrix: int = 256, fractured: bool = True) -> list[Path]:
    fractures = ([FractureSpec(FractureType.BODY, "C5"),
                  FractureSpec(FractureType.DENS_TYPE_II, "C2")] if fractured else 0)
    options = PhantomOptions(seed=seed, matrix=matrix, pixel_spacing=0.8 * 256 / matrix,
                             slice_spacing=1.25, n_slices=None, fractures=fractures)
    return write_series(generate_phantom(options), tmp_path / f"series-{seed}")


@pytest.fixture
def env(tmp_path: Path, postgres_url: str, redis_url: str, settings_factory):  # type: ignore[no-untyped-def]
    migrate.upgrade(postgres_url)
    settings = settings_factory(database_url=postgres_url, broker_url=redis_url,
                                model_dir=shipped_model_dir(), broker_visibility_timeout_s=5,
                                task_retry_backoff_s=1)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    yield settings, factory
    engine.dispose()


def test_worker_runs_an_analysis_end_to_end(tmp_path: Path, env) -> None:  # type: ignore[no-untyped-def]
    settings, factory = env
    analysis_id = spool_series(settings, _series(tmp_path, seed=501), factory)
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
    try:
        assert AnalysisDispatcher(factory, settings).dispatch(analysis_id)
        analysis = wait_for_state(factory, analysis_id, {AnalysisState.DONE,
                                                         AnalysisState.FAILED,
                                                         AnalysisState.NOT_ANALYZABLE}, worker)
    finally:
        worker.stop()
    assert analysis.state is AnalysisState.DONE, (analysis.error, worker.output())
    # CUDA is first in the default provider list; this machine has none: CPU fallback.
    assert analysis.execution_provider == "CPUExecutionProvider"
    assert analysis.attempts == 1
    for stamp in ("queued_at", "started_at", "inferred_at", "results_stored_at", "flagged_at"):
        assert getattr(analysis, stamp) is not None, stamp
    assert analysis.queued_at <= analysis.started_at <= analysis.inferred_at
    assert analysis.inferred_at <= analysis.results_stored_at
    # The flag does not wait for the SR and SEG (issue 22).
    assert analysis.inferred_at <= analysis.flagged_at <= analysis.results_stored_at
    assert {"load", "segmentation", "classification", "results"} <= set(
        analysis.stage_durations or {})
    with factory() as session:
        findings = session.execute(select(Finding).where(Finding.analysis_id == analysis_id)
                                   ).scalars().all()
        study = session.execute(select(Study)).scalar_one()
        series_state = study.series[0].state
    assert sorted(f.vertebra for f in findings) == [f"C{i}" for i in range(1, 8)]
    assert sum(f.in_view for f in findings) >= 5
    assert series_state is SeriesState.DONE
    assert study.priority in (Priority.STAT, Priority.ROUTINE, Priority.URGENT)
    assert study.flagged_at is not None
    results = list(settings.results_path.rglob("*.dcm"))
    assert len(results) >= 2, results  # the SR and the SEG
    assert count_events(factory, "analysis.done") == 1


def test_sigkill_mid_task_is_redelivered_and_completes_once(tmp_path: Path, env) -> None:  # type: ignore[no-untyped-def]
    settings, factory = env
    analysis_id = spool_series(settings, _series(tmp_path, seed=502, matrix=512), factory)
    log = tmp_path / "worker.log"
    first = WorkerProcess(worker_env(settings), log, pool="prefork").start()
    try:
        assert AnalysisDispatcher(factory, settings).dispatch(analysis_id)
        wait_for_state(factory, analysis_id, {AnalysisState.RUNNING}, first)
        first.kill9()
    finally:
        first.stop()
    with factory() as session:
        from service.db.tables import Analysis

        killed = session.get(Analysis, analysis_id)
        assert killed is not None and killed.state is AnalysisState.RUNNING, \
            "the analysis finished before the kill: nothing was tested"
    second = WorkerProcess(worker_env(settings), log, pool="prefork").start()
    try:
        analysis = wait_for_state(factory, analysis_id, {AnalysisState.DONE,
                                                         AnalysisState.FAILED}, second,
                                  timeout_s=300)
    finally:
        second.stop()
    assert analysis.state is AnalysisState.DONE, analysis.error
    assert analysis.attempts == 2  # the killed run and the redelivered one
    with factory() as session:
        n = session.execute(select(func.count()).select_from(Finding)
                            .where(Finding.analysis_id == analysis_id)).scalar_one()
    assert n == 7  # replaced, not duplicated
    assert count_events(factory, "analysis.done") == 1
    assert len(list(settings.results_path.rglob("*.dcm"))) == 2  # same UIDs: overwritten


def test_corrupted_model_fails_clearly_and_worker_keeps_serving(tmp_path: Path, env) -> None:  # type: ignore[no-untyped-def]
    settings, factory = env
    model_dir = tmp_path / "model"
    shutil.copytree(settings.model_dir, model_dir)
    good = (model_dir / "seg.onnx").read_bytes()
    (model_dir / "seg.onnx").write_bytes(good[: len(good) // 2])  # truncated
    settings = settings.model_copy(update={"model_dir": model_dir})
    analysis_id = spool_series(settings, _series(tmp_path, seed=503), factory)
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log").start()
    try:
        dispatcher = AnalysisDispatcher(factory, settings)
        assert dispatcher.dispatch(analysis_id)
        failed = wait_for_state(factory, analysis_id, {AnalysisState.FAILED,
                                                       AnalysisState.DONE}, worker)
        assert failed.state is AnalysisState.FAILED
        assert failed.error is not None and "seg.onnx" in failed.error
        assert "sha256" in failed.error or "truncated" in failed.error
        assert worker.alive()
        # An admin repairs the model and retries: the same worker process serves it.
        (model_dir / "seg.onnx").write_bytes(good)
        from service.worker import retry_analysis

        with factory() as session, session.begin():
            retry_analysis(session, analysis_id, actor="test-admin")
        assert dispatcher.dispatch(analysis_id)
        done = wait_for_state(factory, analysis_id, {AnalysisState.DONE,
                                                     AnalysisState.FAILED}, worker)
        assert done.state is AnalysisState.DONE, done.error
    finally:
        worker.stop()
    assert count_events(factory, "analysis.failed") == 1
    assert count_events(factory, "analysis.retry") == 1
