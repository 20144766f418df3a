"""Broker down when a series completes: the analysis stays PENDING; when a real redis-server
comes up on the broker URL, the tracker's sweep enqueues it by task name."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.dicom import storescu
from harness.process import free_port, wait_until
from harness.services import missing
from service.config import Settings
from service.db import migrate
from service.db.tables import Analysis, AnalysisState, Series, SeriesState
from service.dicom.runner import IngestNode
from service.embedded import EmbeddedRedis, find_redis_server
from service.queue import ANALYSIS_QUEUE, TASK_ANALYZE_SERIES

pytestmark = pytest.mark.slow


def test_pending_analysis_is_enqueued_when_the_broker_comes_back(sqlite_url: str,
                                                                  tmp_path: Path) -> None:
    try:
        find_redis_server()
    except Exception as exc:  # noqa: BLE001
        missing(f"redis-server not available: {exc}")
    migrate.upgrade(sqlite_url)
    broker_port = free_port()
    settings = Settings(data_dir=tmp_path / "var", database_url=sqlite_url, spool_min_free_mb=0,
                        broker_url=f"redis://127.0.0.1:{broker_port}/0",
                        broker_connect_timeout_s=0.5, enqueue_retry_interval_s=0.5,
                        completion_idle_after_release_s=0.3, tracker_interval_s=0.1,
                        min_slices=10)
    node = IngestNode(settings)
    port = node.start("127.0.0.1", 0)
    broker = EmbeddedRedis(tmp_path / "redis", port=broker_port)
    try:
        written = write_series(tmp_path / "in", SeriesSpec(slices=20))
        assert storescu(port, written.paths).returncode == 0
        assert node.session_factory is not None
        factory = node.session_factory

        def analysis_state() -> AnalysisState | None:
            with factory() as session:
                row = session.execute(select(Analysis)).scalar_one_or_none()
                return row.state if row is not None else None

        tracker = node.tracker
        assert tracker is not None
        # Each failed attempt claims (QUEUED) and gives back (PENDING) within one tick.
        wait_until(lambda: tracker.dispatcher.last_error
                   and analysis_state() == AnalysisState.PENDING, 30, 0.05,
                   "a failed enqueue leaving the analysis PENDING")
        assert "Connection refused" in (tracker.dispatcher.last_error or "")
        with factory() as session:
            assert session.execute(select(Series.state)).scalar_one() in (
                SeriesState.COMPLETE, SeriesState.QUEUED)

        broker.start()
        wait_until(lambda: analysis_state() == AnalysisState.QUEUED, 30, 0.1,
                   "the sweep to enqueue the pending analysis")
        with factory() as session:
            analysis = session.execute(select(Analysis)).scalar_one()
            assert session.execute(select(Series.state)).scalar_one() == SeriesState.QUEUED
        assert analysis.task_id and analysis.queued_at is not None
        client = redis.Redis.from_url(broker.url)
        messages = client.lrange(ANALYSIS_QUEUE, 0, -1)
        client.close()
        assert len(messages) == 1
        message = json.loads(messages[0])
        assert message["headers"]["task"] == TASK_ANALYZE_SERIES
        assert message["headers"]["id"] == analysis.task_id
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        assert args == [analysis.id]
    finally:
        node.stop(grace_s=2)
        broker.stop()
