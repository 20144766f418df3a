"""0005: stored reason codes of the volume loader take the one vocabulary's names, and back."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from sqlalchemy import select

from alembic import command
from service.db import migrate
from service.db.session import make_engine, make_session_factory, session_scope
from service.db.tables import Analysis, AnalysisState, Priority, Series, SeriesState, Study
from service.outcomes import SeriesReason

ROOT = Path(__file__).resolve().parents[3]


def _migration():  # type: ignore[no-untyped-def]
    path = ROOT / "alembic" / "versions" / "0005_reason_vocabulary.py"
    spec = importlib.util.spec_from_file_location("reason_vocabulary_0005", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_retired_code_maps_to_a_member_and_is_no_member() -> None:
    renamed = _migration().RENAMED
    members = {r.value for r in SeriesReason}
    assert set(renamed.values()) <= members
    assert not set(renamed) & members


def _seed(url: str, code: str, *, qualified: bool, uid: str) -> None:
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as session:
        study = Study(study_instance_uid=f"1.2.{uid}", priority=Priority.NOT_ANALYZED,
                      priority_reason=f"not analyzed: {code}")
        series = Series(study=study, series_instance_uid=f"1.2.{uid}.1",
                        state=SeriesState.NOT_ANALYZABLE, state_reason=code, qualified=qualified)
        session.add_all([study, series, Analysis(series=series, model_version="v",
                                                 input_fingerprint=uid, reason_code=code,
                                                 state=AnalysisState.NOT_ANALYZABLE)])


def _stored(url: str) -> dict[str, tuple[str | None, str | None, str | None]]:
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as session:
        rows = session.execute(select(Study.study_instance_uid, Series.state_reason,
                                      Analysis.reason_code, Study.priority_reason)
                               .join(Series, Series.study_id == Study.id)
                               .join(Analysis, Analysis.series_id == Series.id)).all()
        return {uid: (state, code, priority) for uid, state, code, priority in rows}


@pytest.mark.parametrize("old,new", sorted(_migration().RENAMED.items()))
def test_upgrade_rewrites_and_downgrade_restores(database_url: str, old: str, new: str) -> None:
    migrate.upgrade(database_url, "0004_web_auth")
    _seed(database_url, old, qualified=True, uid="1")  # the loader refused a qualified series
    _seed(database_url, "NOT_CT", qualified=False, uid="2")  # the ingest rules refused it
    migrate.upgrade(database_url)
    stored = _stored(database_url)
    assert stored["1.2.1"] == (new, new, f"not analyzed: {new}")
    assert stored["1.2.2"] == ("NOT_CT", "NOT_CT", "not analyzed: NOT_CT")
    command.downgrade(migrate.alembic_config(database_url), "0004_web_auth")
    stored = _stored(database_url)
    assert stored["1.2.1"] == (old, old, f"not analyzed: {old}")
    if old != "NO_CT_IMAGES":  # the analysis of an unqualified series cannot be told apart
        assert stored["1.2.2"][0] == "NOT_CT"
    migrate.upgrade(database_url)
