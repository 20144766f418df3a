"""Run real ``triage worker`` processes against the real Redis and a migrated database, and
put a series into the spool as the SCP would (the integration tests and ``bench.e2e``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from harness.process import wait_until
from service import shipped
from service.config import Settings
from service.db.tables import (
    Analysis,
    AnalysisState,
    AuditEvent,
    Instance,
    Series,
    SeriesState,
)
from service.db.types import utcnow
from service.ingest.bookkeeper import rebuild_from_spool
from service.ingest.dispatch import create_analysis, input_fingerprint, model_version
from service.ingest.spool import Spool

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = Path(os.environ.get("CSPINE_TEST_MODEL_DIR") or shipped.model_dir())
"""The shipped artifacts (where the service finds them); CSPINE_TEST_MODEL_DIR points the
tests and ``bench.e2e`` at another export."""


def shipped_model_dir() -> Path:
    """The model the tests run; skips the test when its artifacts are absent."""
    import pytest

    if not (SHIPPED_MODEL / "manifest.json").is_file():
        pytest.skip(f"shipped model artifacts absent ({SHIPPED_MODEL})")
    return SHIPPED_MODEL


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({
        "TRIAGE_DATA_DIR": str(settings.data_dir),
        "TRIAGE_DATABASE_URL": settings.db_url,
        "TRIAGE_BROKER_URL": str(settings.broker_url),
        "TRIAGE_MODEL_DIR": str(settings.model_dir),
        "TRIAGE_BROKER_VISIBILITY_TIMEOUT_S": str(settings.broker_visibility_timeout_s),
        "TRIAGE_TASK_RETRY_BACKOFF_S": str(settings.task_retry_backoff_s),
        "TRIAGE_ORT_INTRA_OP_THREADS": "2",
    })
    env.update(extra)
    return env


class WorkerProcess:
    """`python -m service.cli worker` in its own process group."""

    def __init__(self, env: dict[str, str], log: Path, *, pool: str = "solo") -> None:
        self.env = env
        self.log = log
        self.pool = pool
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--pool", self.pool,
             "--concurrency", "1"],
            cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True)
        handle.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def spool_series(settings: Settings, files: list[Path],
                 factory: sessionmaker[Session]) -> int:
    """Put files into the spool as the SCP would, let the bookkeeper register them, and
    create the PENDING analysis the tracker would; returns the analysis id."""
    from pydicom import dcmread

    spool = Spool(settings.spool_path)
    spool.prepare()
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        spool.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                    path.read_bytes())
    rebuild_from_spool(spool, factory)
    with factory() as session, session.begin():
        series = session.execute(select(Series)).scalars().one()
        series.state = SeriesState.COMPLETE  # as the tracker would decide
        series.completed_at = utcnow()
        pairs = session.execute(select(Instance.sop_instance_uid, Instance.sha256)
                                .where(Instance.series_id == series.id)).all()
        analysis, _ = create_analysis(session, series.id, model_version(settings),
                                      input_fingerprint((a, b) for a, b in pairs))
        return analysis.id


def wait_for_state(factory: sessionmaker[Session], analysis_id: int,
                   states: set[AnalysisState], worker: WorkerProcess | None = None,
                   timeout_s: float = 240) -> Analysis:
    def check() -> Analysis | None:
        if worker is not None and not worker.alive():
            raise AssertionError(f"worker exited:\n{worker.output()}")
        with factory() as session:
            analysis = session.get(Analysis, analysis_id)
            return analysis if analysis is not None and analysis.state in states else None

    try:
        result: Analysis = wait_until(check, timeout_s, 0.05, f"analysis in {states}")
    except AssertionError:
        if worker is not None:
            print(worker.output())
        raise
    return result


def count_events(factory: sessionmaker[Session], event_type: str) -> int:
    with factory() as session:
        return int(session.execute(select(func.count()).select_from(AuditEvent)
                                   .where(AuditEvent.event_type == event_type)).scalar_one())


Predicate = Callable[[], Any]
