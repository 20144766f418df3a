"""The database is down when the SCP starts and while it receives: every instance is still
acknowledged only once it is in the spool, and the rows appear when the database is back."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import create_engine, func, select, text

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.dicom import Scu
from harness.process import wait_until
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Instance, Series
from service.dicom import runner
from service.dicom.runner import IngestNode

pytestmark = pytest.mark.slow


def test_receiving_while_the_database_is_away(postgres_server: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "RETRY_DATABASE_S", 0.5)
    name = f"triage_test_{uuid.uuid4().hex[:12]}"
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"  # does not exist yet: "down"
    settings = Settings(data_dir=tmp_path / "var", database_url=url, spool_min_free_mb=0,
                        ingest_batch_interval_s=0.1, broker_url="redis://127.0.0.1:1/0",
                        broker_connect_timeout_s=0.3, completion_idle_s=3600,
                        completion_idle_after_release_s=3600)
    node = IngestNode(settings)
    port = node.start("127.0.0.1", 0)
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    try:
        written = write_series(tmp_path / "in", SeriesSpec(slices=8))
        scu = Scu(port)
        assoc = scu.associate([("1.2.840.10008.1.1", ExplicitVRLittleEndian)])
        assert assoc.is_established
        assoc.release()
        statuses = scu.store(written.paths)
        assert statuses == [0] * 8
        spool_files = list((tmp_path / "var" / "spool").rglob("*.dcm"))
        assert len(spool_files) == 8
        assert node.bookkeeper is not None and node.bookkeeper.backlog >= 8
        assert node.bookkeeper.last_error

        with admin.connect() as conn:  # the database comes back
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        migrate.upgrade(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)

        def rows() -> int:
            with factory() as session:
                return int(session.execute(select(func.count(Instance.id))).scalar_one())

        wait_until(lambda: rows() == 8, 60, 0.2, "the rows after the database came back")
        with factory() as session:
            series = session.execute(select(Series)).scalar_one()
        assert series.instance_count == 8
        engine.dispose()
    finally:
        node.stop(grace_s=2)
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n"), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
