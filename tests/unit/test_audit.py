"""The audit trail: the chain, the database's refusal to change it, and the anchors that catch
a rewrite by someone who can bypass the database (SQLite and the real PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from service.audit import read_anchors, record, verify_chain, write_anchor
from service.audit.trail import _digest
from service.cli import build_parser, cmd_audit_anchor, cmd_audit_verify
from service.config import Settings
from service.db.session import make_engine, make_session_factory, session_scope
from service.db.tables import AuditEvent

PG_TRIGGERS = ("audit_event_append_only", "audit_event_no_truncate")


@pytest.fixture
def trail(migrated_url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for i in range(5):
            record(session, "dicom.association", actor=f"AE{i}", source_ip="127.0.0.1",
                   details={"instances": i, "bytes": i * 100})
    yield engine, factory
    engine.dispose()


def bypass_triggers(session: Session) -> None:
    """What a superuser or the table's owner can do (the runtime role cannot: see
    tests/integration/test_audit_roles.py): take the append-only triggers out of the way."""
    if session.get_bind().dialect.name == "postgresql":
        for trigger in PG_TRIGGERS:
            session.execute(text(f"ALTER TABLE audit_event DISABLE TRIGGER {trigger}"))
    else:
        session.execute(text("DROP TRIGGER audit_event_no_update"))
        session.execute(text("DROP TRIGGER audit_event_no_delete"))


def rechain_from(session: Session, first_id: int) -> None:
    """Recompute every hash from ``first_id`` on, as an attacker who read trail.py would."""
    prev = session.execute(select(AuditEvent.hash).where(AuditEvent.id < first_id)
                           .order_by(AuditEvent.id.desc()).limit(1)).scalar_one()
    for event in session.execute(select(AuditEvent).where(AuditEvent.id >= first_id)
                                 .order_by(AuditEvent.id)).scalars():
        event.prev_hash = prev
        event.hash = _digest(prev, event)
        prev = event.hash
    session.flush()


def test_chain_verifies_and_detects_tampering(trail: tuple[Engine, sessionmaker[Session]]
                                              ) -> None:
    _, factory = trail
    with factory() as session:
        report = verify_chain(session)
        assert report.intact and report.events == 5
    with session_scope(factory) as session:
        bypass_triggers(session)
        session.execute(update(AuditEvent).where(AuditEvent.id == 3)
                        .values(details={"instances": 999}))
    with factory() as session:
        report = verify_chain(session)
    assert not report.intact
    assert report.first_broken_id == 3
    assert report.events == 5


def test_deleted_event_breaks_the_chain(trail: tuple[Engine, sessionmaker[Session]]) -> None:
    _, factory = trail
    with session_scope(factory) as session:
        bypass_triggers(session)
        session.delete(session.get(AuditEvent, 2))
    with factory() as session:
        assert verify_chain(session).first_broken_id == 3


@pytest.mark.parametrize("statement", [
    "UPDATE audit_event SET actor = 'forged' WHERE id = 3",
    "UPDATE audit_event SET actor = actor",
    "DELETE FROM audit_event WHERE id = 5",
    "DELETE FROM audit_event",
])
def test_the_database_refuses_changes(trail: tuple[Engine, sessionmaker[Session]],
                                      statement: str) -> None:
    engine, factory = trail
    with engine.connect() as conn, pytest.raises(DBAPIError, match="append-only"):
        conn.execute(text(statement))
    with factory() as session:
        report = verify_chain(session)
        assert report.intact and report.events == 5
        assert session.get(AuditEvent, 3).actor == "AE2"  # type: ignore[union-attr]


def test_postgresql_refuses_truncate(postgres_url: str) -> None:
    from service.db import migrate

    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    with session_scope(make_session_factory(engine)) as session:
        record(session, "login", actor="alice")
    with engine.connect() as conn, pytest.raises(DBAPIError, match="append-only: TRUNCATE"):
        conn.execute(text("TRUNCATE audit_event"))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_event")).scalar_one() == 1
    engine.dispose()


def test_appending_still_works_after_refusals(trail: tuple[Engine, sessionmaker[Session]]
                                              ) -> None:
    """The SQLite writer lock in ``record`` is an UPDATE matching no row: not refused."""
    _, factory = trail
    with session_scope(factory) as session:
        event = record(session, "login", actor="bob")
    with factory() as session:
        report = verify_chain(session)
    assert report.intact and report.events == 6 and event.id == 6


def test_rechained_rewrite_passes_the_chain_but_not_the_anchor(
        trail: tuple[Engine, sessionmaker[Session]], tmp_path: Path) -> None:
    _, factory = trail
    anchors = tmp_path / "anchors.jsonl"
    with factory() as session:
        first = write_anchor(session, anchors)
    with session_scope(factory) as session:
        record(session, "login", actor="carol")
    with factory() as session:
        second = write_anchor(session, anchors)
    assert first is not None and second is not None
    assert (first.event_id, second.event_id) == (5, 6)
    assert [a.event_id for a in read_anchors(anchors)] == [5, 6]

    with session_scope(factory) as session:  # a superuser rewrites event 3 and re-chains
        bypass_triggers(session)
        session.execute(update(AuditEvent).where(AuditEvent.id == 3)
                        .values(actor="someone-else"))
        rechain_from(session, 3)
    with factory() as session:
        alone = verify_chain(session)
        anchored = verify_chain(session, read_anchors(anchors))
    assert alone.intact, "a re-chained rewrite verifies without anchors: that is the point"
    assert not anchored.intact and anchored.first_broken_id is None
    assert anchored.anchor_mismatch is not None
    assert anchored.anchor_mismatch.event_id == 5
    assert anchored.anchor_mismatch.expected_hash == first.hash
    assert anchored.anchor_mismatch.found_hash not in (None, first.hash)
    assert anchored.anchor_mismatch.last_good_event_id == 0
    assert anchored.anchors_checked == 2


def test_removed_tail_is_caught_by_the_anchor(trail: tuple[Engine, sessionmaker[Session]],
                                              tmp_path: Path) -> None:
    """Deleting the newest events leaves a valid chain; only an anchor remembers them."""
    _, factory = trail
    anchors = tmp_path / "anchors.jsonl"
    with factory() as session:
        write_anchor(session, anchors)
    with session_scope(factory) as session:
        bypass_triggers(session)
        session.execute(text("DELETE FROM audit_event WHERE id >= 4"))
    with factory() as session:
        assert verify_chain(session).intact
        report = verify_chain(session, read_anchors(anchors))
    assert report.anchor_mismatch is not None
    assert report.anchor_mismatch.event_id == 5 and report.anchor_mismatch.found_hash is None


def test_cli_anchor_and_verify(trail: tuple[Engine, sessionmaker[Session]], tmp_path: Path,
                               migrated_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``triage audit anchor`` appends the head; ``verify`` exits 1 naming the broken link."""
    _, factory = trail
    settings = Settings(data_dir=tmp_path / "var", database_url=migrated_url)
    parser = build_parser()
    assert cmd_audit_anchor(parser.parse_args(["audit", "anchor"]), settings) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["event_id"] == 5 and settings.audit_anchor_path.is_file()
    assert written["anchor_file"] == str(tmp_path / "var" / "audit-anchors.jsonl")

    assert cmd_audit_verify(parser.parse_args(["audit", "verify"]), settings) == 0
    assert json.loads(capsys.readouterr().out)["anchors_checked"] == 1

    with session_scope(factory) as session:
        bypass_triggers(session)
        session.execute(update(AuditEvent).where(AuditEvent.id == 2).values(outcome="failure"))
    assert cmd_audit_verify(parser.parse_args(["audit", "verify"]), settings) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_broken_id"] == 2 and out["intact"] is False

    with session_scope(factory) as session:
        rechain_from(session, 2)
    assert cmd_audit_verify(parser.parse_args(["audit", "verify", "--no-anchors"]),
                            settings) == 0
    capsys.readouterr()
    assert cmd_audit_verify(parser.parse_args(["audit", "verify"]), settings) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_broken_id"] is None
    assert out["anchor_mismatch"]["event_id"] == 5


def test_anchor_file_edits_are_refused(tmp_path: Path) -> None:
    from service.audit import AuditError

    path = tmp_path / "anchors.jsonl"
    path.write_text('{"event_id": 1, "hash": "aa", "anchored_at": "x"}\nnot json\n')
    with pytest.raises(AuditError, match=":2:"):
        read_anchors(path)
    assert read_anchors(tmp_path / "absent.jsonl") == []


def test_the_tracker_anchors_at_start_and_every_interval(
        trail: tuple[Engine, sessionmaker[Session]], tmp_path: Path, migrated_url: str) -> None:
    import time

    from service.ingest.spool import Spool
    from service.ingest.tracker import Tracker

    _, factory = trail
    settings = Settings(data_dir=tmp_path / "var", database_url=migrated_url,
                        tracker_interval_s=0.05, audit_anchor_interval_s=0.3)
    spool = Spool(settings.spool_path)
    spool.prepare()
    tracker = Tracker(factory, settings, spool)
    tracker.start()
    try:
        deadline = time.monotonic() + 20
        while len(read_anchors(settings.audit_anchor_path)) < 3:
            assert time.monotonic() < deadline, "the tracker wrote fewer than 3 anchors"
            time.sleep(0.05)
    finally:
        tracker.stop()
    anchors = read_anchors(settings.audit_anchor_path)
    with factory() as session:
        assert verify_chain(session, anchors).intact
    assert {a.event_id for a in anchors} == {5}

    off = Settings(data_dir=tmp_path / "off", database_url=migrated_url,
                   tracker_interval_s=0.05, audit_anchor_interval_s=0)
    tracker = Tracker(factory, off, spool)
    tracker.start()
    time.sleep(0.5)
    tracker.stop()
    assert not off.audit_anchor_path.exists()
