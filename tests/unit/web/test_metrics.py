"""``/metrics``: scraped and parsed with prometheus-client's own parser; values checked against
the seeded database and broker; who may scrape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from harness.data.admin_seed import make_export_failed, make_failed
from harness.data.worklist_seed import ALL, FRACTURED, INCONCLUSIVE, seed
from harness.web import bearer, login, make_user
from service.db.session import make_engine, make_session_factory
from service.db.tables import Role
from service.heartbeat import Heartbeat
from service.queue import ANALYSIS_QUEUE
from service.web.app import create_app
from service.web.metrics import LATENCY_BUCKETS_S, histogram_buckets, stage_durations

TOKEN = "scrape-secret-0123456789"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def factory(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_url)
    yield make_session_factory(engine)
    engine.dispose()


def _parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_reflect_the_database_and_the_broker(
        migrated_url: str, settings_factory: Any, factory: sessionmaker[Session],
        redis_url: str) -> None:
    with factory() as session:
        seed(session)
        make_failed(session, FRACTURED)
        make_export_failed(session, INCONCLUSIVE)
    import redis

    client = redis.Redis.from_url(redis_url)
    client.rpush(ANALYSIS_QUEUE, b"{}", b"{}", b"{}")
    client.hset("unacked", "tag-1", json.dumps([{"body": "..."}, "", "export"]))
    client.close()
    Heartbeat(redis_url, {"host": "h", "pid": 1, "execution_provider": "CPUExecutionProvider",
                          "version": "1.5.0"}, ttl_s=30, interval_s=10).beat()
    app = create_app(settings_factory(database_url=migrated_url, broker_url=redis_url,
                                      metrics_token=TOKEN))
    with TestClient(app) as http:
        response = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = _parse(response.text)

    assert _get(samples, "cspine_instances_received_total") == len(ALL)  # one each
    assert _get(samples, "cspine_series", state="DONE") == 2  # NORMAL, INCONCLUSIVE
    assert _get(samples, "cspine_series", state="FAILED") == 1
    assert _get(samples, "cspine_series", state="RECEIVING") == 1  # WAITING
    assert _get(samples, "cspine_series", state="QUEUED") == 0
    assert _get(samples, "cspine_analyses", state="DONE", result="NO_FRACTURE_FOUND",
                model_version="1.5.0") == 1
    assert _get(samples, "cspine_analyses", state="DONE", result="INCONCLUSIVE",
                model_version="1.5.0") == 1
    assert _get(samples, "cspine_analyses", state="FAILED", result="",
                model_version="1.5.0") == 1
    assert _get(samples, "cspine_exports", state="SENT", destination="PACS") == 5
    assert _get(samples, "cspine_exports", state="FAILED", destination="PACS") == 1
    assert _get(samples, "cspine_queue_depth", queue="analysis") == 3
    assert _get(samples, "cspine_queue_depth", queue="export") == 0
    assert _get(samples, "cspine_queue_in_progress", queue="export") == 1
    assert _get(samples, "cspine_queue_in_progress", queue="analysis") == 0
    assert _get(samples, "cspine_workers", execution_provider="CPUExecutionProvider",
                model_version="1.5.0") == 1
    assert _get(samples, "cspine_scrape_ok", source="database") == 1
    assert _get(samples, "cspine_scrape_ok", source="broker") == 1
    # The seed's timeline: inference 13 s, results 2 s, export 8 s, last image -> flag 35 s,
    # on the three seeded analyses (the FAILED one keeps its timestamps).
    count = _get(samples, "cspine_stage_latency_seconds_count", stage="inference")
    assert count == 3
    assert _get(samples, "cspine_stage_latency_seconds_sum", stage="inference") == \
        pytest.approx(39.0)
    assert _get(samples, "cspine_stage_latency_seconds_bucket", stage="inference",
                le="10.0") == 0
    assert _get(samples, "cspine_stage_latency_seconds_bucket", stage="inference",
                le="20.0") == 3
    assert _get(samples, "cspine_stage_latency_seconds_bucket", stage="received_to_flag",
                le="30.0") == 0
    assert _get(samples, "cspine_stage_latency_seconds_bucket", stage="received_to_flag",
                le="60.0") == 3
    assert _get(samples, "cspine_stage_latency_seconds_count", stage="acquisition_to_flag") == 3


def test_broker_down_is_reported_not_zero(migrated_url: str, settings_factory: Any) -> None:
    app = create_app(settings_factory(database_url=migrated_url, metrics_token=TOKEN,
                                      broker_url="redis://127.0.0.1:1/0",
                                      broker_connect_timeout_s=0.5))
    with TestClient(app) as http:
        samples = _parse(http.get("/metrics", headers={
            "Authorization": f"Bearer {TOKEN}"}).text)
    assert _get(samples, "cspine_scrape_ok", source="broker") == 0
    assert not any(name == "cspine_queue_depth" for name, _ in samples)


@pytest.mark.parametrize("configured", [True, False])
def test_who_may_scrape(migrated_url: str, settings_factory: Any, configured: bool) -> None:
    make_user(migrated_url, "rad", Role.RADIOLOGIST)
    make_user(migrated_url, "adm", Role.ADMIN)
    app = create_app(settings_factory(database_url=migrated_url,
                                      metrics_token=TOKEN if configured else None))
    with TestClient(app) as http:
        assert http.get("/metrics").status_code == 401
        right = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert right.status_code == (200 if configured else 401)
        assert http.get("/metrics", headers={
            "Authorization": f"Bearer {TOKEN}x"}).status_code == 401
        assert http.get("/metrics", headers=bearer(migrated_url, "rad")).status_code == 403
        assert http.get("/metrics", headers=bearer(migrated_url, "adm", Role.ADMIN)
                        ).status_code == 200
    with TestClient(app) as rad:
        login(rad, migrated_url, "rad")
        assert rad.get("/metrics").status_code == 403
    with TestClient(app) as adm:
        login(adm, migrated_url, "adm", Role.ADMIN)
        assert adm.get("/metrics").status_code == 200


def test_histogram_arithmetic() -> None:
    buckets, total = histogram_buckets([0.5, 10.0, 10.5, 500.0, 7200.0])
    as_dict = dict(buckets)
    assert as_dict["1.0"] == 1 and as_dict["10.0"] == 2 and as_dict["20.0"] == 3
    assert as_dict["480.0"] == 3 and as_dict["600.0"] == 4 and as_dict["3600.0"] == 4
    assert buckets[-1] == ("+Inf", 5) and total == pytest.approx(7721.0)
    assert len(buckets) == len(LATENCY_BUCKETS_S) + 1
    from datetime import UTC, datetime, timedelta

    t0 = datetime(2026, 12, 3, 12, tzinfo=UTC)
    rows = [{"analysis.started_at": t0, "analysis.inferred_at": t0 + timedelta(seconds=12)},
            {"analysis.started_at": t0, "analysis.inferred_at": None},  # still running
            {"analysis.started_at": t0, "analysis.inferred_at": t0 - timedelta(seconds=1)}]
    assert stage_durations(rows)["inference"] == [12.0]  # missing and negative skipped
