"""Analysis rows and their hand-over to the broker.

An :class:`~service.db.tables.Analysis` is created PENDING in the same transaction that
qualifies its series; it is put on the broker only after that transaction commits (the worker
must find the row). Enqueueing is claim-then-send: one atomic ``UPDATE .. WHERE
state='PENDING'`` moves it to QUEUED and commits, so of several SCP / tracker processes only
one sends it; then the task goes to the broker by name through :mod:`service.queue`. If the
broker is down, the claim is undone (PENDING again) and :meth:`AnalysisDispatcher.sweep`
retries every ``enqueue_retry_interval_s``. A process that dies between claim and send leaves
a QUEUED row without ``task_id``; the sweep returns those to PENDING after
``STALE_CLAIM_S``. The worker may therefore, rarely, receive a task twice, and must claim the
analysis atomically itself (``PENDING``/``QUEUED`` -> ``RUNNING``).

The broker is not the source of truth: a Redis that restarts without persistence (or loses
its last second of append-only file) forgets queued messages, and a QUEUED analysis whose
message is gone would wait forever. The sweep therefore watches the broker's identity (Redis
``run_id``, new at every server start): when it changes, every QUEUED analysis goes back to
PENDING and is sent again, and every finished analysis with result objects not yet sent gets
a new export task. A message that did survive is then delivered twice; the worker skips the
copy (the analysis is RUNNING under the other task id, or already final) and a second export
task finds nothing left to send or re-sends the same UIDs. Exports whose task was never sent
(broker down when the analysis finished) are re-sent after ``STALE_EXPORT_S``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Result, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record
from service.config import Settings
from service.db.tables import Analysis, AnalysisState, Export, ExportState, Series, SeriesState
from service.db.types import utcnow
from service.model_manifest import model_version as manifest_model_version

logger = logging.getLogger(__name__)

STALE_CLAIM_S = 120.0
STALE_EXPORT_S = 60.0
"""A DONE analysis whose export rows are still PENDING this long after it finished lost its
export task (broker down when the worker tried to enqueue it): enqueue it again."""
BROKER_CHECK_S = 2.0
"""How often the sweep asks the broker for its identity (one small round trip)."""
EVENT_ENQUEUED = "analysis.enqueued"


def affected_rows(result: Result[Any]) -> int:
    """Rows matched by an UPDATE (typed access to ``CursorResult.rowcount``)."""
    return int(cast(CursorResult[Any], result).rowcount)


def model_version(settings: Settings) -> str:
    """``version`` from ``<model_dir>/manifest.json``; ``unknown`` when absent or unreadable."""
    return manifest_model_version(settings.model_dir)


def input_fingerprint(pairs: Iterable[tuple[str, str]]) -> str:
    """SHA-256 of the sorted ``(sop_instance_uid, sha256)`` pairs of a series.

    The same instances give the same fingerprint whatever their arrival order, so a re-run
    on unchanged input is recognised; any added or changed instance gives a new one.
    """
    digest = hashlib.sha256()
    for sop_uid, sha in sorted(pairs):
        digest.update(f"{sop_uid}\t{sha}\n".encode())
    return digest.hexdigest()


_ANALYSIS_TO_SERIES = {
    AnalysisState.QUEUED: SeriesState.QUEUED,
    AnalysisState.RUNNING: SeriesState.RUNNING,
    AnalysisState.DONE: SeriesState.DONE,
    AnalysisState.FAILED: SeriesState.FAILED,
    AnalysisState.NOT_ANALYZABLE: SeriesState.NOT_ANALYZABLE,
}


def create_analysis(session: Session, series_id: int, version: str,
                    fingerprint: str) -> tuple[Analysis, bool]:
    """The analysis for this input, created PENDING if new (in the caller's transaction).

    Returns ``(analysis, created)``. A new analysis supersedes every earlier analysis of the
    same series that is not superseded yet.
    """
    existing = session.execute(
        select(Analysis).where(Analysis.series_id == series_id,
                               Analysis.model_version == version,
                               Analysis.input_fingerprint == fingerprint)).scalar_one_or_none()
    if existing is not None:
        if existing.state == AnalysisState.SUPERSEDED:
            existing.state = AnalysisState.PENDING
            existing.superseded_by_id = None
            existing.queued_at = None
            existing.task_id = None
        supersede_series_analyses(session, series_id, existing.id)
        return existing, False
    analysis = Analysis(series_id=series_id, model_version=version,
                        input_fingerprint=fingerprint, state=AnalysisState.PENDING,
                        attempts=0, created_at=utcnow())
    session.add(analysis)
    session.flush()
    supersede_series_analyses(session, series_id, analysis.id)
    return analysis, True


def supersede_series_analyses(session: Session, series_id: int, by_analysis_id: int) -> int:
    result = session.execute(
        update(Analysis)
        .where(Analysis.series_id == series_id, Analysis.id != by_analysis_id,
               Analysis.state != AnalysisState.SUPERSEDED)
        .values(state=AnalysisState.SUPERSEDED, superseded_by_id=by_analysis_id))
    count = affected_rows(result)
    if count:
        logger.info("analysis %d supersedes %d earlier analyses of series %d", by_analysis_id,
                    count, series_id)
    return count


def series_state_for(analysis: Analysis) -> SeriesState:
    return _ANALYSIS_TO_SERIES.get(analysis.state, SeriesState.COMPLETE)


class AnalysisDispatcher:
    """Puts PENDING analyses on the broker; see the module docstring for the protocol."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, *,
                 app_factory: Callable[[], Any] | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._factory = session_factory
        self._settings = settings
        self._app_factory = app_factory or self._default_app
        self._app: Any = None
        self._clock = clock
        self._lock = threading.Lock()
        self._broker_down_until = 0.0
        self._broker_identity: str | None = None
        self._broker_checked = 0.0
        self._exports_checked = 0.0
        self._exports_sent_at: dict[int, float] = {}
        self.last_error: str | None = None
        self.broker_restarts = 0

    def _default_app(self) -> Any:
        from service.queue import make_celery

        return make_celery(self._settings)

    @property
    def broker_backoff(self) -> bool:
        return time.monotonic() < self._broker_down_until

    def dispatch(self, analysis_id: int) -> bool:
        """Try to put one analysis on the broker now; ``True`` if this call sent it."""
        if self.broker_backoff:
            return False
        now = self._clock()
        with self._factory() as session, session.begin():
            claimed = affected_rows(session.execute(
                update(Analysis)
                .where(Analysis.id == analysis_id, Analysis.state == AnalysisState.PENDING)
                .values(state=AnalysisState.QUEUED, queued_at=now, task_id=None)))
            if not claimed:
                return False
            series_id = session.execute(select(Analysis.series_id)
                                        .where(Analysis.id == analysis_id)).scalar_one()
            session.execute(update(Series)
                            .where(Series.id == series_id, Series.state == SeriesState.COMPLETE)
                            .values(state=SeriesState.QUEUED, updated_at=now))
        try:
            task_id = self._send(analysis_id)
        except Exception as exc:  # noqa: BLE001 - any broker failure keeps the row PENDING
            self._unclaim(analysis_id, series_id)
            self._broker_down_until = time.monotonic() + self._settings.enqueue_retry_interval_s
            self.last_error = f"{type(exc).__name__}: {str(exc)[:200]}"
            logger.warning("broker unavailable, analysis %d stays PENDING (%s); retry in %.0f s",
                           analysis_id, self.last_error, self._settings.enqueue_retry_interval_s)
            with self._lock:
                self._app = None
            return False
        self.last_error = None
        with self._factory() as session, session.begin():
            session.execute(update(Analysis).where(Analysis.id == analysis_id)
                            .values(task_id=task_id[:64]))
            record(session, EVENT_ENQUEUED, details={"analysis_id": analysis_id,
                                                     "series_id": series_id,
                                                     "task_id": task_id})
        logger.info("analysis %d enqueued as task %s", analysis_id, task_id)
        return True

    def _send(self, analysis_id: int) -> str:
        from service.queue import enqueue_analysis

        with self._lock:
            if self._app is None:
                self._app = self._app_factory()
            app = self._app
        return enqueue_analysis(app, analysis_id)

    def _unclaim(self, analysis_id: int, series_id: int) -> None:
        with self._factory() as session, session.begin():
            undone = affected_rows(session.execute(
                update(Analysis)
                .where(Analysis.id == analysis_id, Analysis.state == AnalysisState.QUEUED,
                       Analysis.task_id.is_(None))
                .values(state=AnalysisState.PENDING, queued_at=None)))
            if undone:
                session.execute(update(Series)
                                .where(Series.id == series_id,
                                       Series.state == SeriesState.QUEUED)
                                .values(state=SeriesState.COMPLETE, updated_at=self._clock()))

    def sweep(self, limit: int = 100) -> int:
        """Return stale claims to PENDING, then try to enqueue PENDING analyses, oldest first."""
        self._release_stale_claims()
        if self.broker_backoff:
            return 0
        restarted = self._broker_restarted()
        if restarted:
            self._requeue_lost()
        if restarted or time.monotonic() - self._exports_checked >= STALE_EXPORT_S / 4:
            self._exports_checked = time.monotonic()
            self._resend_exports(all_unsent=restarted)
        with self._factory() as session:
            pending = list(session.execute(
                select(Analysis.id).where(Analysis.state == AnalysisState.PENDING)
                .order_by(Analysis.created_at, Analysis.id).limit(limit)).scalars())
        sent = 0
        for analysis_id in pending:
            if self.dispatch(analysis_id):
                sent += 1
            elif self.broker_backoff:
                break
        return sent

    def _release_stale_claims(self) -> None:
        cutoff = self._clock() - timedelta(seconds=STALE_CLAIM_S)
        with self._factory() as session:
            stale = list(session.execute(
                select(Analysis.id, Analysis.series_id)
                .where(Analysis.state == AnalysisState.QUEUED, Analysis.task_id.is_(None),
                       Analysis.queued_at < cutoff)).all())
        for analysis_id, series_id in stale:
            logger.warning("analysis %d claimed but never sent: back to PENDING", analysis_id)
            self._unclaim(analysis_id, series_id)

    # --- messages the broker lost ----------------------------------------------------------
    def _broker_restarted(self) -> bool:
        """True once after the broker server restarted (its ``run_id`` changed)."""
        if time.monotonic() - self._broker_checked < BROKER_CHECK_S:
            return False
        self._broker_checked = time.monotonic()
        identity = self.broker_identity()
        if identity is None:
            return False
        previous, self._broker_identity = self._broker_identity, identity
        if previous is None or previous == identity:
            return False
        self.broker_restarts += 1
        logger.warning("the broker restarted (run_id %s -> %s): re-sending what it may have "
                       "lost", previous[:8], identity[:8])
        return True

    def broker_identity(self) -> str | None:
        """The Redis server's ``run_id`` (new at every start); None when unknown (down, or
        not a Redis URL)."""
        url = self._settings.broker_url
        if not url or not url.startswith(("redis://", "rediss://", "unix://")):
            return None
        try:
            import redis

            timeout = self._settings.broker_connect_timeout_s
            client = redis.Redis.from_url(url, socket_timeout=timeout,
                                          socket_connect_timeout=timeout)
            try:
                return str(client.info("server")["run_id"])
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - down: dispatch() notices and backs off
            logger.debug("broker identity unavailable: %s", exc)
            return None

    def _requeue_lost(self) -> None:
        """Every QUEUED analysis back to PENDING: its message may be gone with the broker."""
        now = self._clock()
        with self._factory() as session, session.begin():
            rows = session.execute(
                select(Analysis.id, Analysis.series_id)
                .where(Analysis.state == AnalysisState.QUEUED)).all()
            for analysis_id, series_id in rows:
                if affected_rows(session.execute(
                        update(Analysis)
                        .where(Analysis.id == analysis_id,
                               Analysis.state == AnalysisState.QUEUED)
                        .values(state=AnalysisState.PENDING, queued_at=None, task_id=None))):
                    session.execute(update(Series)
                                    .where(Series.id == series_id,
                                           Series.state == SeriesState.QUEUED)
                                    .values(state=SeriesState.COMPLETE, updated_at=now))
            if rows:
                record(session, "analysis.requeued",
                       details={"reason": "broker restarted",
                                "analysis_ids": [r[0] for r in rows][:200]})
        if rows:
            logger.warning("broker restarted: %d queued analyses enqueued again", len(rows))

    def _resend_exports(self, *, all_unsent: bool) -> None:
        """Enqueue the export of DONE analyses whose rows wait for a task that never came:
        after a broker restart every PENDING or RETRYING row, otherwise PENDING rows of an
        analysis finished more than ``STALE_EXPORT_S`` ago (each analysis at most once per
        ``STALE_EXPORT_S``)."""
        states = [ExportState.PENDING, ExportState.RETRYING] if all_unsent else \
            [ExportState.PENDING]
        query = (select(Analysis.id).join(Export, Export.analysis_id == Analysis.id)
                 .where(Analysis.state == AnalysisState.DONE, Export.state.in_(states))
                 .distinct())
        if not all_unsent:
            query = query.where(Analysis.finished_at
                                < self._clock() - timedelta(seconds=STALE_EXPORT_S))
        with self._factory() as session:
            analysis_ids = list(session.execute(query.limit(100)).scalars())
        now = time.monotonic()
        for analysis_id in analysis_ids:
            last = self._exports_sent_at.get(analysis_id)
            if not all_unsent and last is not None and now - last < STALE_EXPORT_S:
                continue
            try:
                from service.queue import enqueue_export

                with self._lock:
                    if self._app is None:
                        self._app = self._app_factory()
                    app = self._app
                enqueue_export(app, analysis_id)
            except Exception as exc:  # noqa: BLE001 - broker down: the next sweep retries
                logger.warning("export of analysis %d not enqueued: %s", analysis_id, exc)
                return
            self._exports_sent_at[analysis_id] = now
            logger.info("export of analysis %d enqueued again (%s)", analysis_id,
                        "broker restarted" if all_unsent else "its task never came")
