from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.db.session import make_engine, make_session_factory, session_scope
from service.db.tables import Analysis, AnalysisState, Finding, Instance, Series, Study


def _study(session):  # type: ignore[no-untyped-def]
    study = Study(study_instance_uid="1.2.3", patient_id="P1")
    series = Series(study=study, series_instance_uid="1.2.3.4", modality="CT",
                    acquired_at=datetime(2026, 1, 1, 12, 0, tzinfo=UTC))
    session.add_all([study, series])
    session.flush()
    return study, series


def test_timestamps_round_trip_as_aware_utc(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        _study(session)
    with factory() as session:
        series = session.execute(select(Series)).scalar_one()
        assert series.acquired_at == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        assert series.created_at.tzinfo is not None
        assert series.created_at - series.acquired_at > timedelta(0)
    engine.dispose()


def test_naive_datetime_refused(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with pytest.raises(Exception, match="naive"), session_scope(make_session_factory(engine)) as s:
        s.add(Study(study_instance_uid="9", flagged_at=datetime(2026, 1, 1)))
    engine.dispose()


def test_unique_constraints_keep_tasks_idempotent(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        _, series = _study(session)
        session.add(Analysis(series=series, model_version="v1", input_fingerprint="abc"))
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        series = session.execute(select(Series)).scalar_one()
        session.add(Analysis(series=series, model_version="v1", input_fingerprint="abc"))
    with session_scope(factory) as session:
        analysis = session.execute(select(Analysis)).scalar_one()
        assert analysis.state is AnalysisState.PENDING
        analysis.findings.append(Finding(vertebra="C2", in_view=True, probability=0.9,
                                         suspected=True, bbox=[1, 2, 3, 4, 5, 6]))
    with factory() as session:
        finding = session.execute(select(Finding)).scalar_one()
        assert finding.bbox == [1, 2, 3, 4, 5, 6]
    engine.dispose()


def test_same_sop_uid_different_bytes_both_kept(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        _, series = _study(session)
        for digest in ("a" * 64, "b" * 64):
            session.add(Instance(series=series, sop_instance_uid="1.9", sop_class_uid="1.2",
                                 spool_path=f"x/{digest}", size_bytes=1, sha256=digest))
    with pytest.raises(IntegrityError), session_scope(factory) as session:
        series = session.execute(select(Series)).scalar_one()
        session.add(Instance(series=series, sop_instance_uid="1.9", sop_class_uid="1.2",
                             spool_path="x/dup", size_bytes=1, sha256="a" * 64))
    engine.dispose()
