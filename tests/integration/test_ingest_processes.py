"""Several receiver processes share the DICOM port (SO_REUSEPORT): four concurrent storescu
associations land on them, and each series is completed and analysed exactly once."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
from sqlalchemy import func, select

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.dicom import ScpProcess, storescu
from harness.process import free_port, wait_until
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, Instance, Series

pytestmark = pytest.mark.slow


def test_two_receiver_processes_four_associations(database_url: str, tmp_path: Path) -> None:
    migrate.upgrade(database_url)
    port = free_port()
    log = tmp_path / "scp.log"
    scp = ScpProcess({
        "TRIAGE_DATA_DIR": str(tmp_path / "var"), "TRIAGE_DATABASE_URL": database_url,
        "TRIAGE_DICOM_HOST": "127.0.0.1", "TRIAGE_DICOM_PORT": str(port),
        "TRIAGE_SCP_PROCESSES": "2", "TRIAGE_SPOOL_MIN_FREE_MB": "0",
        "TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0", "TRIAGE_BROKER_CONNECT_TIMEOUT_S": "0.3",
        "TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S": "0.5", "TRIAGE_TRACKER_INTERVAL_S": "0.2",
        "TRIAGE_MIN_SLICES": "10",
    }, tmp_path, log).start()
    try:
        wait_until(lambda: log.read_text().count("listening on 127.0.0.1") >= 2, 60, 0.2,
                   "two receivers listening")
        series = [write_series(tmp_path / f"s{i}", SeriesSpec(slices=40, rows=128,
                                                               columns=128))
                  for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda w: storescu(port, w.paths), series))
        assert all(r.returncode == 0 for r in results), [r.stderr[-500:] for r in results]
        engine = make_engine(database_url)
        factory = make_session_factory(engine)

        def all_decided() -> bool:
            with factory() as session:
                rows = session.execute(select(Series)).scalars().all()
            return len(rows) == 4 and all(r.qualified is not None for r in rows)

        wait_until(all_decided, 60, 0.2, "four series decided")
        with factory() as session:
            counts = dict(session.execute(select(Series.series_instance_uid,
                                                 Series.instance_count)).all())
            per_series = dict(session.execute(
                select(Analysis.series_id, func.count(Analysis.id))
                .group_by(Analysis.series_id)).all())
            total = session.execute(select(func.count(Instance.id))).scalar_one()
        engine.dispose()
        assert counts == {w.spec.series_uid: 40 for w in series}
        assert total == 160
        assert sorted(per_series.values()) == [1, 1, 1, 1]
    finally:
        assert scp.stop() == 0
