from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from harness.data.results_inputs import make_case
from service.config import Settings
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, AuditEvent, Priority, Series, Study
from service.worklist.priority import PriorityPolicy, apply_priority

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)


def test_default_policy_stat_routine_not_analyzed() -> None:
    policy = PriorityPolicy.from_settings(Settings())
    suspected = make_case(20, 16, 16, suspected={"C2": 0.9, "C6": 0.7}).findings
    decision = policy.decide(suspected)
    assert decision.priority is Priority.STAT
    assert "C2, C6" in decision.reason and "p=0.90" in decision.reason
    negative = make_case(20, 16, 16).findings
    assert policy.decide(negative).priority is Priority.ROUTINE
    nothing_in_view = make_case(20, 16, 16, in_view=()).findings
    assert policy.decide(nothing_in_view).priority is Priority.NOT_ANALYZED
    not_analyzed = policy.not_analyzed("GANTRY_TILT")
    assert not_analyzed.priority is Priority.NOT_ANALYZED
    assert "GANTRY_TILT" in not_analyzed.reason


def test_inconclusive_is_its_own_priority_and_never_stat() -> None:
    import dataclasses

    from service.outcomes import AnalysisResult

    policy = PriorityPolicy.from_settings(Settings(priority_urgent_probability=0.3))
    case = make_case(20, 16, 16, suspected={"C4": 0.99}).findings
    vertebrae = [dataclasses.replace(v, suspected=False, plausible=False,
                                     plausibility_reasons=("LEVELS_OUT_OF_ORDER",))
                 if v.in_view else v for v in case.vertebrae]
    inconclusive = dataclasses.replace(
        case, vertebrae=vertebrae, patient_suspected=False, result=AnalysisResult.INCONCLUSIVE,
        anatomy={"failures": [{"code": "LEVELS_OUT_OF_ORDER", "level": None, "detail": "x"},
                              {"code": "LEVEL_EXTENT_OUT_OF_RANGE", "level": "C5",
                               "detail": "y"}]})
    decision = policy.decide(inconclusive)
    # Neither STAT (the classifier said 0.99) nor URGENT (above 0.3) nor ROUTINE (cleared).
    assert decision.priority is Priority.INCONCLUSIVE
    assert decision.reason == ("inconclusive, not cleared: anatomy not plausible "
                               "(LEVELS_OUT_OF_ORDER, LEVEL_EXTENT_OUT_OF_RANGE:C5)")
    order = list(Priority)
    assert order.index(Priority.URGENT) < order.index(Priority.INCONCLUSIVE) \
        < order.index(Priority.ROUTINE)


def test_configurable_policy() -> None:
    settings = Settings(priority_when_suspected="urgent", priority_urgent_probability=0.3)
    policy = PriorityPolicy.from_settings(settings)
    assert policy.decide(make_case(20, 16, 16, suspected={"C1": 0.8}).findings).priority \
        is Priority.URGENT
    borderline = make_case(20, 16, 16, suspected={"C3": 0.4}).findings  # 0.4 < 0.5: not suspected
    decision = policy.decide(borderline)
    assert decision.priority is Priority.URGENT and ">= 0.30" in decision.reason
    with pytest.raises(ValueError):
        PriorityPolicy.from_settings(Settings(priority_when_suspected="VERY_HIGH"))


def test_apply_timestamps_and_audits_every_change(migrated_url: str) -> None:
    factory = make_session_factory(make_engine(migrated_url))
    policy = PriorityPolicy()
    with factory() as session:
        study = Study(study_instance_uid="1.2.3.4")
        series = Series(study=study, series_instance_uid="1.2.3.4.1")
        analysis = Analysis(series=series, model_version="1", input_fingerprint="x")
        session.add_all([study, series, analysis])
        session.flush()
        assert study.priority is Priority.PENDING

        stat = policy.decide(make_case(20, 16, 16, suspected={"C2": 0.9}).findings)
        assert apply_priority(session, study, stat, analysis=analysis, now=T0)
        assert (study.priority, study.flagged_at, analysis.flagged_at) == (Priority.STAT, T0, T0)
        # The same decision again is no change: no new timestamp, no audit event.
        assert not apply_priority(session, study, stat, analysis=analysis,
                                  now=T0 + timedelta(minutes=1))
        assert study.flagged_at == T0
        routine = policy.decide(make_case(20, 16, 16).findings)
        later = T0 + timedelta(minutes=5)
        assert apply_priority(session, study, routine, now=later)
        assert study.priority is Priority.ROUTINE and study.flagged_at == later
        assert analysis.flagged_at == T0
        session.commit()
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == "worklist.priority").order_by(AuditEvent.id)).scalars().all()
        assert [(e.details or {}).get("to") for e in events] == ["STAT", "ROUTINE"]
        assert [(e.details or {}).get("from") for e in events] == ["PENDING", "STAT"]
        assert all(e.study_instance_uid == "1.2.3.4" for e in events)
