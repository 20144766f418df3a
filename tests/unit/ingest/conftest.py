"""Fixtures for ingest tests: a migrated database (SQLite and PostgreSQL), a spool, and
helpers that put instances in the spool the way the SCP does."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from harness.data.ctdata import SeriesSpec, ct_dataset
from service.config import Settings
from service.db.session import make_engine, make_session_factory
from service.db.types import utcnow
from service.ingest.bookkeeper import ReceivedInstance
from service.ingest.spool import Spool


@dataclass
class IngestEnv:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    spool: Spool

    def receive(self, spec: SeriesSpec, index: int, *, association_id: str | None = "a1",
                sop_uid: str | None = None, pixel_offset: int = 0) -> ReceivedInstance:
        """Store one instance in the spool and return the bookkeeping item the SCP makes."""
        ds = ct_dataset(spec, index, sop_uid=sop_uid)
        if pixel_offset:
            ds.PixelData = bytes((b + pixel_offset) % 256 for b in ds.PixelData)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        stored = self.spool.store(spec.study_uid, spec.series_uid, str(ds.SOPInstanceUID), data)
        return ReceivedInstance(
            study_instance_uid=spec.study_uid, series_instance_uid=spec.series_uid,
            sop_instance_uid=str(ds.SOPInstanceUID), stored=stored, received_at=utcnow(),
            association_id=association_id, calling_ae="TESTSCU", data=data,
            sha256=stored.sha256)


@pytest.fixture
def ingest_env(migrated_url: str, tmp_path: Path) -> Iterator[IngestEnv]:
    settings = Settings(data_dir=tmp_path / "var", database_url=migrated_url,
                        broker_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.5,
                        min_slices=10, completion_idle_after_release_s=5.0,
                        completion_idle_s=30.0, enqueue_retry_interval_s=0.01,
                        model_dir=tmp_path / "no-model")  # no manifest: version "unknown"
    engine = make_engine(migrated_url)
    spool = Spool(settings.spool_path)
    spool.prepare()
    yield IngestEnv(settings, engine, make_session_factory(engine), spool)
    engine.dispose()
