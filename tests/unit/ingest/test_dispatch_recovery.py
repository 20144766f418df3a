"""What a restarted broker forgot is sent again from the database (issue 20's fault table).

The broker is not the source of truth: when its identity (Redis ``run_id``) changes, QUEUED
analyses are enqueued again and DONE analyses with unsent exports get an export task; an
export whose task never went out is re-sent after ``STALE_EXPORT_S``, once per period.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select

from harness.data.ctdata import SeriesSpec
from service.db.tables import Analysis, AnalysisState, AuditEvent, Export, ExportState
from service.db.types import utcnow
from service.ingest.dispatch import STALE_EXPORT_S
from service.queue import EXPORT_QUEUE, TASK_ANALYZE_SERIES, TASK_EXPORT_RESULT
from tests.unit.ingest.conftest import IngestEnv
from tests.unit.ingest.test_tracker import FakeBroker, analyses, make_tracker, receive_series


def _identities(tracker, *values: str) -> list[str]:  # type: ignore[no-untyped-def]
    """Make the dispatcher see these broker identities, one per check, checks not throttled."""
    queue = list(values)
    seen: list[str] = []

    def identity() -> str:
        seen.append(queue[0] if len(queue) == 1 else queue.pop(0))
        return seen[-1]

    tracker.dispatcher.broker_identity = identity
    return seen


def _tick(tracker) -> None:  # type: ignore[no-untyped-def]
    tracker.dispatcher._broker_checked = 0.0
    tracker.tick()


def test_queued_analysis_is_sent_again_after_a_broker_restart(ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    receive_series(ingest_env, SeriesSpec(slices=12, images_in_acquisition=12))
    tracker = make_tracker(ingest_env, broker)
    _identities(tracker, "run-A", "run-A", "run-B")
    _tick(tracker)  # completes, enqueues, learns run-A
    (first,) = analyses(ingest_env)
    assert first.state is AnalysisState.QUEUED and len(broker.sent) == 1
    _tick(tracker)  # same broker: nothing re-sent
    assert len(broker.sent) == 1
    _tick(tracker)  # run-B: the broker restarted and may have lost the message
    (again,) = analyses(ingest_env)
    assert [name for name, _, _ in broker.sent] == [TASK_ANALYZE_SERIES] * 2
    assert again.state is AnalysisState.QUEUED and again.task_id != first.task_id
    assert tracker.dispatcher.broker_restarts == 1
    with ingest_env.factory() as session:
        events = session.execute(select(AuditEvent).where(
            AuditEvent.event_type == "analysis.requeued")).scalars().all()
    assert len(events) == 1 and events[0].details["analysis_ids"] == [first.id]


def _done_with_export(env: IngestEnv, tracker, *, finished_ago_s: float) -> int:  # type: ignore[no-untyped-def]
    _tick(tracker)
    with env.factory() as session, session.begin():
        analysis = session.execute(select(Analysis)).scalar_one()
        analysis.state = AnalysisState.DONE
        analysis.finished_at = utcnow() - timedelta(seconds=finished_ago_s)
        session.add(Export(analysis_id=analysis.id, object_kind="SR", sop_instance_uid="1.2.3",
                           destination="pacs", state=ExportState.PENDING, attempts=0))
        return analysis.id


def test_unsent_exports_get_a_task_after_a_restart_or_when_stale(
        ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    receive_series(ingest_env, SeriesSpec(slices=12, images_in_acquisition=12))
    tracker = make_tracker(ingest_env, broker)
    _identities(tracker, "run-A", "run-A", "run-A", "run-A", "run-B")
    analysis_id = _done_with_export(ingest_env, tracker, finished_ago_s=1)
    _tick(tracker)  # just finished: its own export task is on its way
    exports = [s for s in broker.sent if s[0] == TASK_EXPORT_RESULT]
    assert exports == []
    with ingest_env.factory() as session, session.begin():
        session.get(Analysis, analysis_id).finished_at = (  # type: ignore[union-attr]
            utcnow() - timedelta(seconds=STALE_EXPORT_S + 1))
    tracker.dispatcher._exports_checked = 0.0
    _tick(tracker)  # stale: its task never came
    tracker.dispatcher._exports_checked = 0.0
    _tick(tracker)  # not again within the period
    exports = [s for s in broker.sent if s[0] == TASK_EXPORT_RESULT]
    assert exports == [(TASK_EXPORT_RESULT, [analysis_id], EXPORT_QUEUE)]
    _tick(tracker)  # run-B: every unsent export again, whatever its age
    exports = [s for s in broker.sent if s[0] == TASK_EXPORT_RESULT]
    assert len(exports) == 2
