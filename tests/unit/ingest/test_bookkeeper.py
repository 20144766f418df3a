"""Batched bookkeeping: rows, counters, duplicates, reopening, outages, rebuild from spool."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from harness.data.ctdata import SeriesSpec
from service.db.session import make_engine, make_session_factory
from service.db.tables import AuditEvent, Instance, Series, SeriesState, Study
from service.ingest.bookkeeper import (
    EVENT_ASSOCIATION,
    EVENT_DUPLICATE_CONFLICT,
    EVENT_REBUILD,
    EVENT_SERIES_REOPENED,
    AssociationRecord,
    AssociationRejected,
    Bookkeeper,
    rebuild_from_spool,
    write_batch,
)
from service.ingest.tracker import Tracker
from tests.unit.ingest.conftest import IngestEnv


def write(env: IngestEnv, items: list) -> None:  # type: ignore[type-arg]
    with env.factory() as session, session.begin():
        write_batch(session, items)


def one_series(session: Session) -> Series:
    return session.execute(select(Series)).scalar_one()


def test_batch_creates_study_series_instances_with_timestamps(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=5, images_in_acquisition=5)
    items = [ingest_env.receive(spec, i) for i in range(5)]
    write(ingest_env, items)
    with ingest_env.factory() as session:
        study = session.execute(select(Study)).scalar_one()
        series = one_series(session)
        assert study.study_instance_uid == spec.study_uid
        assert study.patient_id == "TEST-0001" and study.study_description == spec.study_description
        assert series.instance_count == 5
        assert series.expected_instances == 5
        assert series.state == SeriesState.RECEIVING
        assert series.bytes_received == sum(i.stored.size for i in items)
        assert series.first_received_at == min(i.received_at for i in items)
        assert series.last_received_at == max(i.received_at for i in items)
        assert series.acquired_at is not None and series.acquired_at.year == 2024
        assert series.last_association_id == "a1"
        rows = session.execute(select(Instance)).scalars().all()
        assert {r.sop_instance_uid for r in rows} == {i.sop_instance_uid for i in items}
        assert all(len(r.sha256) == 64 and r.spool_path.startswith(spec.study_uid) for r in rows)


def test_same_instance_twice_counts_once(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=2)
    item = ingest_env.receive(spec, 0, sop_uid="1.2.3.9")
    again = ingest_env.receive(spec, 0, sop_uid="1.2.3.9")
    write(ingest_env, [item])
    write(ingest_env, [again])
    with ingest_env.factory() as session:
        assert one_series(session).instance_count == 1
        assert session.execute(select(func.count(Instance.id))).scalar_one() == 1


def test_conflicting_duplicate_is_kept_flagged_and_audited(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=2)
    first = ingest_env.receive(spec, 0, sop_uid="1.2.3.9")
    other = ingest_env.receive(spec, 0, sop_uid="1.2.3.9", pixel_offset=7)
    write(ingest_env, [first, other])
    with ingest_env.factory() as session:
        rows = session.execute(select(Instance)).scalars().all()
        assert len(rows) == 2 and all(r.duplicate_conflict for r in rows)
        assert len({r.spool_path for r in rows}) == 2
        assert one_series(session).instance_count == 1
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == EVENT_DUPLICATE_CONFLICT)).scalars().all()
        assert len(events) == 1 and events[0].details["sop_instance_uid"] == "1.2.3.9"


def test_instance_after_completion_reopens(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=4)
    write(ingest_env, [ingest_env.receive(spec, i) for i in range(3)])
    with ingest_env.factory() as session, session.begin():
        series = one_series(session)
        series.state = SeriesState.NOT_ANALYZABLE
        series.qualified = False
        series.state_reason = "TOO_FEW_SLICES"
    write(ingest_env, [ingest_env.receive(spec, 3, association_id="a2")])
    with ingest_env.factory() as session:
        series = one_series(session)
        assert series.state == SeriesState.RECEIVING
        assert series.reopened_count == 1
        assert series.qualified is None and series.state_reason is None
        assert series.instance_count == 4 and series.last_association_id == "a2"
        assert session.execute(select(AuditEvent).where(
            AuditEvent.event_type == EVENT_SERIES_REOPENED)).scalar_one()


def test_association_end_starts_release_clock_and_is_audited(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=2)
    items = [ingest_env.receive(spec, i, association_id="assoc-1") for i in range(2)]
    ended_at = items[-1].received_at + timedelta(seconds=1)
    end = AssociationRecord(association_id="assoc-1", calling_ae="TESTSCU",
                           called_ae="CSPINE_TRIAGE", address="127.0.0.1", port=5000,
                           started_at=items[0].received_at, ended_at=ended_at, how="released",
                           instances=2, bytes=123, failures={"0xC210": 1})
    rejected = AssociationRejected(calling_ae="EVIL", called_ae="CSPINE_TRIAGE",
                                   address="10.0.0.9", port=4000, reason="CALLING_AE_NOT_ALLOWED",
                                   at=ended_at)
    write(ingest_env, [*items, end, rejected])
    with ingest_env.factory() as session:
        assert one_series(session).association_released_at == ended_at
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == EVENT_ASSOCIATION).order_by(AuditEvent.id)).scalars().all()
        accepted, refused = events
        assert accepted.outcome == "warning"  # one failed C-STORE in it
        assert accepted.actor == "TESTSCU" and accepted.source_ip == "127.0.0.1"
        assert accepted.details["instances"] == 2 and accepted.details["duration_s"] >= 1.0
        assert accepted.details["failures"] == {"0xC210": 1}
        assert refused.outcome == "failure" and refused.details["reason"] == \
            "CALLING_AE_NOT_ALLOWED" and refused.source_ip == "10.0.0.9"


def test_bookkeeper_thread_flushes_in_batches_and_wakes_tracker(ingest_env: IngestEnv) -> None:
    flushed = []
    keeper = Bookkeeper(ingest_env.factory, interval_s=0.05, on_flushed=flushed.append)
    keeper.start()
    spec = SeriesSpec(slices=20)
    for i in range(20):
        keeper.submit(ingest_env.receive(spec, i))
    deadline = time.monotonic() + 10
    while keeper.backlog and time.monotonic() < deadline:
        time.sleep(0.05)
    keeper.stop()
    with ingest_env.factory() as session:
        assert one_series(session).instance_count == 20
    assert flushed and sum(r.instances_new for r in flushed) == 20


def test_database_outage_keeps_items_until_it_is_back(ingest_env: IngestEnv) -> None:
    down = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    keeper = Bookkeeper(make_session_factory(down), interval_s=10)
    spec = SeriesSpec(slices=3)
    for i in range(3):
        keeper.submit(ingest_env.receive(spec, i))
    assert keeper.flush() is False
    assert keeper.backlog == 3 and keeper.last_error
    keeper._factory = ingest_env.factory  # the database is back
    assert keeper.flush() is True
    with ingest_env.factory() as session:
        assert one_series(session).instance_count == 3
    down.dispose()


def test_rebuild_recovers_spool_files_the_database_lacks(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=6)
    items = [ingest_env.receive(spec, i) for i in range(6)]
    write(ingest_env, items[:2])  # the process "died" before writing the rest
    junk_dir = ingest_env.spool.root / spec.study_uid / spec.series_uid
    (junk_dir / "1.2.3.999.dcm").write_bytes(b"not dicom")
    # A crash between link and fsync: the name made it to disk, the tail of the data did not.
    cut = ingest_env.receive(spec, 6)
    path = ingest_env.spool.path(cut.stored.relative_path)
    path.write_bytes(path.read_bytes()[:-700])
    report = rebuild_from_spool(ingest_env.spool, ingest_env.factory)
    assert report.recovered == 4 and report.quarantined == 2
    assert not path.exists()
    quarantined = sorted((ingest_env.spool.root / ".quarantine").glob("*.reason"))
    assert any("truncated" in p.read_text() for p in quarantined)
    with ingest_env.factory() as session:
        series = one_series(session)
        assert series.instance_count == 6
        assert session.execute(select(AuditEvent).where(
            AuditEvent.event_type == EVENT_REBUILD)).scalar_one().details["recovered"] == 4
    # Idempotent: a second rebuild finds nothing to do.
    again = rebuild_from_spool(ingest_env.spool, ingest_env.factory)
    assert again.recovered == 0 and again.quarantined == 0


def _factory_for(env: IngestEnv) -> sessionmaker[Session]:
    return env.factory


def test_rebuilt_series_completes_by_idle(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=12)
    for i in range(12):
        ingest_env.receive(spec, i)
    rebuild_from_spool(ingest_env.spool, ingest_env.factory)
    later = [None]

    def clock():  # type: ignore[no-untyped-def]
        from service.db.types import utcnow

        return utcnow() + timedelta(seconds=ingest_env.settings.completion_idle_s + 1)

    tracker = Tracker(ingest_env.factory, ingest_env.settings, ingest_env.spool, clock=clock)
    report = tracker.tick()
    assert report.completed and later
    with ingest_env.factory() as session:
        series = one_series(session)
        assert series.completion_reason == "idle"
        assert series.qualified is True


def test_a_poison_item_is_dropped_the_rest_written(ingest_env: IngestEnv) -> None:
    keeper = Bookkeeper(ingest_env.factory, interval_s=10)
    spec = SeriesSpec(slices=3)
    items = [ingest_env.receive(spec, i) for i in range(3)]
    poison = AssociationRecord(association_id="x", calling_ae="SCU", called_ae="CSPINE_TRIAGE",
                              address="127.0.0.1", port=1, started_at=items[0].received_at,
                              ended_at=items[0].received_at, how="released",
                              failures={"0xC210": object()})  # type: ignore[dict-item]
    for item in [items[0], poison, *items[1:]]:
        keeper.submit(item)
    assert keeper.flush() is True
    assert keeper.backlog == 0
    with ingest_env.factory() as session:
        assert one_series(session).instance_count == 3


def test_missing_schema_keeps_everything_for_later(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from service.db import migrate
    from service.ingest.spool import Spool
    from tests.unit.ingest.conftest import IngestEnv as Env

    url = f"sqlite:///{tmp_path / 'late.db'}"
    engine = make_engine(url)
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    env = Env(ingest_env_settings(tmp_path, url), engine, make_session_factory(engine), spool)
    keeper = Bookkeeper(env.factory, interval_s=10)
    spec = SeriesSpec(slices=2)
    for i in range(2):
        keeper.submit(env.receive(spec, i))
    assert keeper.flush() is False and keeper.backlog == 2  # no tables yet
    migrate.upgrade(url)
    assert keeper.flush() is True
    with env.factory() as session:
        assert one_series(session).instance_count == 2
    engine.dispose()


def ingest_env_settings(tmp_path, url):  # type: ignore[no-untyped-def]
    from service.config import Settings

    return Settings(data_dir=tmp_path / "var", database_url=url)
