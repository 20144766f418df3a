from __future__ import annotations

from sqlalchemy import update

from service.audit import record, verify_chain
from service.db.session import make_engine, make_session_factory, session_scope
from service.db.tables import AuditEvent


def test_chain_verifies_and_detects_tampering(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for i in range(5):
            record(session, "dicom.association", actor=f"AE{i}", source_ip="127.0.0.1",
                   details={"instances": i, "bytes": i * 100})
    with factory() as session:
        report = verify_chain(session)
        assert report.intact and report.events == 5
    with session_scope(factory) as session:
        session.execute(update(AuditEvent).where(AuditEvent.id == 3)
                        .values(details={"instances": 999}))
    with factory() as session:
        report = verify_chain(session)
        assert not report.intact
        assert report.first_broken_id == 3
    engine.dispose()


def test_deleted_event_breaks_the_chain(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for i in range(3):
            record(session, "login", actor=f"user{i}")
    with session_scope(factory) as session:
        session.delete(session.get(AuditEvent, 2))
    with factory() as session:
        assert verify_chain(session).first_broken_id == 3
    engine.dispose()
