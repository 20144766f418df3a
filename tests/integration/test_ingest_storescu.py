"""DCMTK storescu sends a 300-slice 512x512 CT to the SCP: in one association, and split
over several concurrent associations. Completion, qualification and bookkeeping are checked
on the database the way production runs it."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from sqlalchemy import func, select

from harness.data.ctdata import SeriesSpec, WrittenSeries, write_series
from harness.peers.dicom import storescu
from harness.process import wait_until
from service.config import Settings
from service.db import migrate
from service.db.tables import Analysis, AuditEvent, Instance, Series, SeriesState
from service.dicom.runner import IngestNode
from service.ingest.bookkeeper import EVENT_ASSOCIATION

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ct300(tmp_path_factory: pytest.TempPathFactory) -> WrittenSeries:
    return write_series(tmp_path_factory.mktemp("ct300"),
                        SeriesSpec(slices=300, rows=512, columns=512, thickness_mm=1.0))


def dataset_digest(raw: bytes) -> str:
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return hashlib.sha256(raw[fp.tell():]).hexdigest()


@pytest.fixture
def node(migrated_url: str, tmp_path: Path) -> Iterator[IngestNode]:
    settings = Settings(data_dir=tmp_path / "var", database_url=migrated_url,
                        spool_min_free_mb=0, completion_idle_after_release_s=1.0,
                        tracker_interval_s=0.2, broker_url="redis://127.0.0.1:1/0",
                        broker_connect_timeout_s=0.3)
    migrate.upgrade(settings.db_url)
    node = IngestNode(settings)
    node.start("127.0.0.1", 0)
    yield node
    node.stop(grace_s=5)


def _check_complete(node: IngestNode, ct300: WrittenSeries, associations: int) -> None:
    assert node.session_factory is not None and node.spool is not None
    factory = node.session_factory

    def complete() -> Series | None:
        with factory() as session:
            series = session.execute(select(Series)).scalar_one_or_none()
            decided = series is not None and series.state != SeriesState.RECEIVING \
                and series.qualified is not None
            return series if decided else None

    series = wait_until(complete, 60, 0.2, "the series to complete and be qualified")
    assert series.instance_count == 300
    assert series.completion_reason == "association_idle"
    assert series.qualified is True, series.qualification_detail
    assert series.first_received_at <= series.last_received_at < series.completed_at
    assert series.acquired_at is not None
    with factory() as session:
        rows = session.execute(select(Instance)).scalars().all()
        analyses = session.execute(select(func.count(Analysis.id))).scalar_one()
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == EVENT_ASSOCIATION)).scalars().all()
    assert analyses == 1
    assert {r.sop_instance_uid for r in rows} == set(ct300.sop_uids)
    assert sum(e.details["instances"] for e in events) == 300
    assert len(events) == associations and all(e.outcome == "success" for e in events)
    # What is on disk is what was sent, byte for byte (dataset part; file meta is ours).
    source = {uid: path for uid, path in zip(ct300.sop_uids, ct300.paths, strict=True)}
    for row in rows[::25]:
        stored = node.spool.path(row.spool_path).read_bytes()
        assert dataset_digest(stored) == dataset_digest(source[row.sop_instance_uid].read_bytes())


def test_storescu_300_slices_in_one_association(node: IngestNode,
                                                ct300: WrittenSeries) -> None:
    assert node.scp is not None
    result = storescu(node.scp.port, [ct300.paths[0].parent], extra=["+sd"])
    assert result.returncode == 0, result.stderr[-2000:]
    _check_complete(node, ct300, associations=1)


def test_storescu_300_slices_split_over_concurrent_associations(
        node: IngestNode, ct300: WrittenSeries) -> None:
    assert node.scp is not None
    parts = [ct300.paths[i::3] for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda files: storescu(node.scp.port, files),  # type: ignore[union-attr]
                                parts))
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    _check_complete(node, ct300, associations=3)
