"""The admin's status page and its two actions: retry an analysis, resend an export.

Domain layer (no ``HTTPException``): :class:`ActionRefused` says why an action cannot be done.
Everything is read at request time from the places other processes write to: the database,
the broker (queue lengths, worker heartbeats from :mod:`service.heartbeat`) and the data
directory. Nothing here imports the worker or the model side.

Actions hand work over the same way the pipeline does:

* **retry** puts a FAILED or NOT_ANALYZABLE analysis back to PENDING (audited
  ``analysis.retry`` with the admin as actor, committed), then lets
  :class:`service.ingest.dispatch.AnalysisDispatcher` claim it and send the task by name, as
  the tracker does for a new series. With the broker down the analysis stays PENDING and the
  tracker's sweep sends it when the broker is back.
* **resend** puts a FAILED or RETRYING export row back to PENDING with its attempt count
  reset (audited ``export.resend``, committed), then sends the analysis's export task by name
  (:func:`service.queue.enqueue_export`), as the worker does after an analysis. The export
  task sends every row not yet SENT. With the broker down the row goes back to FAILED with
  that reason, so the button stays there.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record
from service.config import Settings
from service.db.tables import (
    Analysis,
    AnalysisState,
    AuditEvent,
    Export,
    ExportState,
    Instance,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow
from service.heartbeat import read_heartbeats
from service.ingest.dispatch import AnalysisDispatcher
from service.queue import ANALYSIS_QUEUE, EXPORT_QUEUE, enqueue_export

logger = logging.getLogger(__name__)

QUEUES = (ANALYSIS_QUEUE, EXPORT_QUEUE)
PRIORITY_SEP = "\x06\x16"
"""Kombu's Redis transport keeps each priority level of a queue in its own list,
``<queue>\\x06\\x16<level>``; the plain name holds level 0 (the default)."""
PRIORITY_LEVELS = (3, 6, 9)
RETRYABLE = (AnalysisState.FAILED, AnalysisState.NOT_ANALYZABLE)
RESENDABLE = (ExportState.FAILED, ExportState.RETRYING)
TREE_WALK_LIMIT = 50_000
"""Files counted per directory tree before the count is reported as a lower bound."""


class ActionRefused(Exception):
    """A retry or resend that cannot be done: the object is not in a retryable state."""


class UnknownObject(ActionRefused):
    """No analysis or export with that id."""


def _redis(settings: Settings) -> Any:
    import redis

    timeout = settings.broker_connect_timeout_s
    return redis.Redis.from_url(str(settings.broker_url), socket_connect_timeout=timeout,
                                socket_timeout=timeout)


def queue_depths(client: Any) -> dict[str, int]:
    """Messages waiting on each queue (every priority level), not counting the ones a worker
    has taken and not yet acknowledged."""
    out: dict[str, int] = {}
    for queue in QUEUES:
        names = [queue, *(f"{queue}{PRIORITY_SEP}{level}" for level in PRIORITY_LEVELS)]
        pipe = client.pipeline()
        for name in names:
            pipe.llen(name)
        out[queue] = int(sum(pipe.execute()))
    return out


UNACKED_KEY = "unacked"
"""Kombu's Redis hash of the messages a worker has taken and not yet acknowledged (with
``acks_late``: the tasks running now), each ``[message, exchange, routing_key]``."""


def queue_in_progress(client: Any) -> dict[str, int]:
    """Tasks taken by a worker and not yet acknowledged, per queue (routing key)."""
    import json

    out = dict.fromkeys(QUEUES, 0)
    for raw in client.hvals(UNACKED_KEY):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key in out:
            out[routing_key] += 1
    return out


@dataclass
class BrokerView:
    status: str
    """``up``, ``down`` or ``not_configured``."""
    queues: dict[str, int] = field(default_factory=dict)
    """Tasks waiting per queue."""
    in_progress: dict[str, int] = field(default_factory=dict)
    """Tasks taken by a worker, not yet acknowledged, per queue."""
    workers: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _age_s(stamp: Any, now: datetime) -> float | None:
    try:
        then = datetime.fromisoformat(str(stamp))
    except ValueError:
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return round((now - then).total_seconds(), 1)


def broker_view(settings: Settings) -> BrokerView:
    """Queue depths and live workers; ``down`` with the error when Redis cannot be reached."""
    if not settings.broker_url:
        return BrokerView(status="not_configured")
    try:
        client = _redis(settings)
        try:
            queues = queue_depths(client)
            taken = queue_in_progress(client)
            workers = read_heartbeats(client)
        finally:
            client.close()
    except Exception as exc:  # noqa: BLE001 - shown on the page, not raised
        return BrokerView(status="down", error=f"{type(exc).__name__}: {str(exc)[:200]}")
    now = datetime.now(UTC)
    for worker in workers:
        worker["age_s"] = _age_s(worker.get("at"), now)
    workers.sort(key=lambda w: (str(w.get("host")), int(w.get("pid") or 0)))
    return BrokerView(status="up", queues=queues, in_progress=taken, workers=workers)


@dataclass(frozen=True)
class DiskUse:
    name: str
    path: str
    tree_bytes: int | None
    """Bytes under ``path`` (the spool: the received instances on record)."""
    tree_files: int | None
    partial: bool
    """The walk stopped at :data:`TREE_WALK_LIMIT` files: the counts are lower bounds."""
    fs_total: int | None
    fs_free: int | None

    @property
    def fs_used_fraction(self) -> float | None:
        if not self.fs_total or self.fs_free is None:
            return None
        return 1 - self.fs_free / self.fs_total


def _walk(root: Path, limit: int = TREE_WALK_LIMIT) -> tuple[int, int, bool]:
    total = files = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
                    files += 1
                    if files >= limit:
                        return total, files, True
            except OSError:
                continue
    return total, files, False


def _filesystem(path: Path) -> tuple[int | None, int | None]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None, None
    return usage.total, usage.free


def disk_use(session: Session, settings: Settings) -> list[DiskUse]:
    """Spool (from the instance rows, each with its file's size: walking a spool of millions
    of files per page view would cost more than the page) and result store (walked, bounded),
    each with its filesystem's size and free space."""
    spool_bytes, spool_files = session.execute(
        select(func.coalesce(func.sum(Instance.size_bytes), 0), func.count(Instance.id))).one()
    out = []
    fs_total, fs_free = _filesystem(settings.spool_path)
    out.append(DiskUse("spool", str(settings.spool_path), int(spool_bytes), int(spool_files),
                       False, fs_total, fs_free))
    results = settings.results_path
    tree_bytes, tree_files, partial = _walk(results) if results.is_dir() else (0, 0, False)
    fs_total, fs_free = _filesystem(results)
    out.append(DiskUse("result store", str(results), tree_bytes, tree_files, partial,
                       fs_total, fs_free))
    return out


@dataclass(frozen=True)
class AnalysisRow:
    analysis_id: int
    state: str
    reason_code: str | None
    error: str | None
    attempts: int
    model_version: str
    finished_at: datetime | None
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None


@dataclass(frozen=True)
class ExportRow:
    export_id: int
    analysis_id: int
    state: str
    object_kind: str
    destination: str
    attempts: int
    last_error: str | None
    updated_at: datetime | None
    study_instance_uid: str


@dataclass
class StatusSnapshot:
    broker: BrokerView
    disks: list[DiskUse]
    series_by_state: dict[str, int]
    analyses_by_state: dict[str, int]
    retryable: list[AnalysisRow]
    export_failures: list[ExportRow]
    recent_failures: list[AuditEvent]
    generated_at: datetime

    def studies_shown(self) -> list[str]:
        uids = [row.study_instance_uid for row in self.retryable]
        uids += [row.study_instance_uid for row in self.export_failures]
        uids += [e.study_instance_uid for e in self.recent_failures if e.study_instance_uid]
        return list(dict.fromkeys(uids))


def _counts(session: Session, column: Any) -> dict[str, int]:
    return {str(getattr(state, "value", state)): int(n) for state, n in
            session.execute(select(column, func.count()).group_by(column)).all()}


def status_snapshot(session: Session, settings: Settings, *, limit: int = 50,
                    failures_since: timedelta = timedelta(hours=24)) -> StatusSnapshot:
    """Everything the status page shows, read now."""
    now = utcnow()
    analyses = session.execute(
        select(Analysis, Series.series_instance_uid, Study.study_instance_uid,
               Study.patient_id)
        .join(Series, Series.id == Analysis.series_id).join(Study, Study.id == Series.study_id)
        .where(Analysis.state.in_(RETRYABLE))
        .order_by(func.coalesce(Analysis.finished_at, Analysis.created_at).desc(),
                  Analysis.id.desc()).limit(limit)).all()
    retryable = [AnalysisRow(a.id, a.state.value, a.reason_code, a.error, a.attempts,
                             a.model_version, a.finished_at, study_uid, series_uid, pid)
                 for a, series_uid, study_uid, pid in analyses]
    exports = session.execute(
        select(Export, Study.study_instance_uid)
        .join(Analysis, Analysis.id == Export.analysis_id)
        .join(Series, Series.id == Analysis.series_id).join(Study, Study.id == Series.study_id)
        .where(Export.state.in_(RESENDABLE))
        .order_by(Export.updated_at.desc(), Export.id.desc()).limit(limit)).all()
    export_rows = [ExportRow(e.id, e.analysis_id, e.state.value, e.object_kind, e.destination,
                             e.attempts, e.last_error, e.updated_at, study_uid)
                   for e, study_uid in exports]
    failures = list(session.execute(
        select(AuditEvent).where(AuditEvent.outcome != "success",
                                 AuditEvent.occurred_at >= now - failures_since)
        .order_by(AuditEvent.id.desc()).limit(20)).scalars())
    return StatusSnapshot(
        broker=broker_view(settings), disks=disk_use(session, settings),
        series_by_state=_counts(session, Series.state),
        analyses_by_state=_counts(session, Analysis.state),
        retryable=retryable, export_failures=export_rows, recent_failures=failures,
        generated_at=now)


def audit_status_read(session: Session, actor: str, source_ip: str | None,
                      snapshot: StatusSnapshot) -> None:
    """The page lists studies (UIDs, patient IDs) that need action: the read is audited like
    a worklist read."""
    record(session, "admin.status.view", actor=actor, source_ip=source_ip,
           details={"studies": snapshot.studies_shown()[:200]})
    session.commit()


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActionResult:
    queued: bool
    """The task is on the broker (else: see ``message``)."""
    message: str
    study_instance_uid: str | None = None


def retry_analysis(session_factory: sessionmaker[Session], settings: Settings,
                   analysis_id: int, *, actor: str, source_ip: str | None,
                   app_factory: Callable[[], Celery]) -> ActionResult:
    """Back to PENDING (audited, committed), then claimed and sent by the dispatcher."""
    with session_factory() as session, session.begin():
        analysis = session.get(Analysis, analysis_id, with_for_update=True)
        if analysis is None:
            raise UnknownObject(f"analysis {analysis_id} does not exist")
        if analysis.state not in RETRYABLE:
            raise ActionRefused(f"analysis {analysis_id} is {analysis.state.value}, "
                                "not FAILED or NOT_ANALYZABLE")
        series = analysis.series
        study_uid = series.study.study_instance_uid
        previous = {"state": analysis.state.value, "reason_code": analysis.reason_code,
                    "attempts": analysis.attempts}
        analysis.state = AnalysisState.PENDING
        analysis.error = None
        analysis.reason_code = None
        analysis.attempts = 0
        analysis.finished_at = None
        analysis.queued_at = None
        analysis.task_id = None
        if series.state in (SeriesState.FAILED, SeriesState.NOT_ANALYZABLE):
            # COMPLETE is what the dispatcher's claim moves to QUEUED.
            series.state = SeriesState.COMPLETE
            series.state_reason = None
            series.state_detail = None
        record(session, "analysis.retry", actor=actor, source_ip=source_ip,
               study_instance_uid=study_uid, series_instance_uid=series.series_instance_uid,
               details={"analysis_id": analysis_id, "previous": previous})
    dispatcher = AnalysisDispatcher(session_factory, settings, app_factory=app_factory)
    if dispatcher.dispatch(analysis_id):
        logger.info("analysis %d retried by an admin and queued", analysis_id)
        return ActionResult(True, f"Analysis {analysis_id} queued again.", study_uid)
    return ActionResult(False, f"Analysis {analysis_id} is PENDING: the broker did not take "
                        f"it ({dispatcher.last_error or 'claimed elsewhere'}); the tracker "
                        "sends it when the broker is back.", study_uid)


def resend_export(session_factory: sessionmaker[Session], export_id: int, *, actor: str,
                  source_ip: str | None, app_factory: Callable[[], Celery]) -> ActionResult:
    """Back to PENDING (audited, committed), then the analysis's export task is sent."""
    with session_factory() as session, session.begin():
        row = session.get(Export, export_id, with_for_update=True)
        if row is None:
            raise UnknownObject(f"export {export_id} does not exist")
        if row.state not in RESENDABLE:
            raise ActionRefused(f"export {export_id} is {row.state.value}, "
                                "not FAILED or RETRYING")
        analysis = row.analysis
        series = analysis.series
        study_uid = series.study.study_instance_uid
        details = {"export_id": export_id, "analysis_id": analysis.id,
                   "object_kind": row.object_kind, "destination": row.destination,
                   "previous_state": row.state.value, "attempts": row.attempts}
        row.state = ExportState.PENDING
        row.attempts = 0
        row.last_error = None
        analysis_id = analysis.id
        record(session, "export.resend", actor=actor, source_ip=source_ip,
               study_instance_uid=study_uid, series_instance_uid=series.series_instance_uid,
               details=details)
    try:
        task_id = enqueue_export(app_factory(), analysis_id)
    except Exception as exc:  # noqa: BLE001 - any broker failure: say so, keep the button
        error = f"resend not queued: {type(exc).__name__}: {str(exc)[:200]}"
        with session_factory() as session, session.begin():
            row = session.get(Export, export_id, with_for_update=True)
            if row is not None and row.state is ExportState.PENDING:
                row.state = ExportState.FAILED
                row.last_error = error
            record(session, "export.resend", outcome="failure", actor=actor,
                   source_ip=source_ip, study_instance_uid=study_uid,
                   details={"export_id": export_id, "error": error})
        logger.warning("export %d: %s", export_id, error)
        return ActionResult(False, f"Export {export_id} not queued: the broker is "
                            "unreachable.", study_uid)
    logger.info("export %d resent by an admin as task %s", export_id, task_id)
    return ActionResult(True, f"Export {export_id} queued again (analysis {analysis_id}).",
                        study_uid)
