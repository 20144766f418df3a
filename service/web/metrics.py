"""Prometheus metrics for ``/metrics``: a custom collector that reads the database and the
broker at scrape time.

Why a collector and not counters incremented in each process: the SCP, the tracker, the
workers and the web app are separate processes (often on separate hosts, several of each),
and everything worth counting is already durable in the database (instance rows, series and
analysis states, stage timestamps, export rows) or in Redis (queue lists, worker heartbeats).
prometheus-client's multiprocess mode would need a shared ``PROMETHEUS_MULTIPROC_DIR`` on
every host, cleaned at each restart, and would lose the counts of a process that died; the
collector has no such state, gives the same answer from any web replica, and its numbers agree
with the dashboard's because they come from the same rows. The cost is a few aggregate queries
per scrape, and one pass over the stage timestamps of the analyses that finished (the
latency histograms are computed in Python so the arithmetic is the same on PostgreSQL and
SQLite).

Counters and gauges come from rows, so they follow the rows: counts of current states are
gauges; ``cspine_instances_received_total`` is a counter of instance rows on record.

A source that cannot be read is reported by ``cspine_scrape_ok{source}`` = 0 and its metrics
are left out rather than reported as zero (a dead broker is not an empty queue).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.tables import (
    Analysis,
    AnalysisState,
    Export,
    ExportState,
    Instance,
    Series,
    SeriesState,
)
from service.web.admin_status import QUEUES, broker_view

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0, 480.0, 600.0,
                     900.0, 1800.0, 3600.0)
"""Upper bounds in seconds; 180 and 480 are the 3-8 minute reference band."""

STAGES: dict[str, tuple[str, str]] = {
    "receive": ("series.first_received_at", "series.last_received_at"),
    "completion_wait": ("series.last_received_at", "series.completed_at"),
    "queue_wait": ("analysis.queued_at", "analysis.started_at"),
    "inference": ("analysis.started_at", "analysis.inferred_at"),
    "results": ("analysis.inferred_at", "analysis.results_stored_at"),
    "export": ("analysis.results_stored_at", "analysis.exported_at"),
    "received_to_flag": ("series.last_received_at", "analysis.flagged_at"),
    "acquisition_to_flag": ("series.acquired_at", "analysis.flagged_at"),
}
"""Stage name -> (start, end) timestamps, both on the series or its analysis. An analysis
counts in a stage when both ends are known and the end is not before the start."""

_SERIES_COLUMNS = ("first_received_at", "last_received_at", "completed_at", "acquired_at")
_ANALYSIS_COLUMNS = ("queued_at", "started_at", "inferred_at", "results_stored_at",
                     "exported_at", "flagged_at")


def histogram_buckets(values: Iterable[float], bounds: tuple[float, ...] = LATENCY_BUCKETS_S
                      ) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` pairs ending with ``+Inf``, and the sum of the values."""
    data = sorted(values)
    buckets: list[tuple[str, float]] = []
    index = 0
    for bound in bounds:
        while index < len(data) and data[index] <= bound:
            index += 1
        buckets.append((repr(float(bound)), float(index)))
    buckets.append(("+Inf", float(len(data))))
    return buckets, float(sum(data))


def stage_durations(rows: Iterable[dict[str, datetime | None]]) -> dict[str, list[float]]:
    """Seconds per stage over ``rows`` (``series.x`` / ``analysis.x`` keys, as in
    :data:`STAGES`); a stage with a missing end or a negative duration is skipped."""
    out: dict[str, list[float]] = {name: [] for name in STAGES}
    for row in rows:
        for name, (start_key, end_key) in STAGES.items():
            start, end = row.get(start_key), row.get(end_key)
            if start is None or end is None:
                continue
            seconds = (end - start).total_seconds()
            if seconds >= 0:
                out[name].append(seconds)
    return out


class TriageCollector(Collector):
    """Collects at every scrape; see the module docstring."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only: nothing to run at registration

    def collect(self) -> Iterator[Metric]:
        ok = GaugeMetricFamily("cspine_scrape_ok", "1 when the source could be read at this "
                               "scrape, 0 when not (its metrics are then absent)",
                               labels=["source"])
        try:
            with Session(self._engine) as session:
                families = list(self._database(session))
        except Exception:  # noqa: BLE001 - a scrape reports, it does not fail
            logger.warning("metrics: database not readable", exc_info=True)
            families = []
            ok.add_metric(["database"], 0)
        else:
            ok.add_metric(["database"], 1)
        yield from families
        broker = broker_view(self._settings)
        if broker.status == "up":
            ok.add_metric(["broker"], 1)
            yield from self._broker(broker.queues, broker.in_progress, broker.workers)
        elif broker.status == "down":
            ok.add_metric(["broker"], 0)
        yield ok

    def _database(self, session: Session) -> Iterator[Metric]:
        instances, received_bytes = session.execute(
            select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
        ).one()
        yield CounterMetricFamily("cspine_instances_received",
                                  "DICOM instances received and on record", value=instances)
        yield CounterMetricFamily("cspine_received_bytes",
                                  "Bytes of the DICOM instances on record",
                                  value=received_bytes)

        series = GaugeMetricFamily("cspine_series", "Series by state", labels=["state"])
        counts = dict(session.execute(select(Series.state, func.count())
                                      .group_by(Series.state)).all())
        for series_state in SeriesState:
            series.add_metric([series_state.value], counts.get(series_state, 0))
        yield series

        analyses = GaugeMetricFamily(
            "cspine_analyses", "Analyses by state, answer (empty until DONE) and model version",
            labels=["state", "result", "model_version"])
        for state, result, version, n in session.execute(
                select(Analysis.state, Analysis.result, Analysis.model_version, func.count())
                .group_by(Analysis.state, Analysis.result, Analysis.model_version)).all():
            analyses.add_metric([state.value, result.value if result else "", version], n)
        yield analyses

        exports = GaugeMetricFamily("cspine_exports",
                                    "Result objects per destination by export state",
                                    labels=["state", "destination"])
        export_counts = {(state, dest): n for state, dest, n in session.execute(
            select(Export.state, Export.destination, func.count())
            .group_by(Export.state, Export.destination)).all()}
        for destination in sorted({dest for _state, dest in export_counts}):
            for export_state in ExportState:
                exports.add_metric([export_state.value, destination],
                                   export_counts.get((export_state, destination), 0))
        yield exports

        latency = HistogramMetricFamily(
            "cspine_stage_latency_seconds",
            "Seconds spent in each pipeline stage, over the analyses not superseded "
            "(stages in service.web.metrics.STAGES)", labels=["stage"])
        for stage, values in stage_durations(self._timelines(session)).items():
            buckets, total = histogram_buckets(values)
            latency.add_metric([stage], buckets, total)
        yield latency

    @staticmethod
    def _timelines(session: Session) -> Iterator[dict[str, datetime | None]]:
        columns = ([getattr(Series, c) for c in _SERIES_COLUMNS]
                   + [getattr(Analysis, c) for c in _ANALYSIS_COLUMNS])
        keys = ([f"series.{c}" for c in _SERIES_COLUMNS]
                + [f"analysis.{c}" for c in _ANALYSIS_COLUMNS])
        query = (select(*columns).join(Series, Series.id == Analysis.series_id)
                 .where(Analysis.state != AnalysisState.SUPERSEDED))
        for row in session.execute(query.execution_options(yield_per=2000)):
            yield dict(zip(keys, row, strict=True))

    @staticmethod
    def _broker(queues: dict[str, int], in_progress: dict[str, int],
                workers: list[dict[str, Any]]) -> Iterator[Metric]:
        depth = GaugeMetricFamily("cspine_queue_depth",
                                  "Tasks waiting on the broker queue (not yet taken)",
                                  labels=["queue"])
        running = GaugeMetricFamily("cspine_queue_in_progress",
                                    "Tasks taken by a worker and not yet acknowledged",
                                    labels=["queue"])
        for queue in QUEUES:
            depth.add_metric([queue], queues.get(queue, 0))
            running.add_metric([queue], in_progress.get(queue, 0))
        yield depth
        yield running
        live = GaugeMetricFamily("cspine_workers",
                                 "Workers with a live heartbeat, by execution provider and "
                                 "model version", labels=["execution_provider", "model_version"])
        grouped: dict[tuple[str, str], int] = {}
        for worker in workers:
            key = (str(worker.get("execution_provider") or ""), str(worker.get("version") or ""))
            grouped[key] = grouped.get(key, 0) + 1
        for (provider, version), n in sorted(grouped.items()):
            live.add_metric([provider, version], n)
        yield live
