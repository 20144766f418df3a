"""Celery task bodies: thin steps that call imaging, inference, results, dicom.scu, worklist.

Every task takes an ID, re-reads the state, and acts only when the state says there is
something to do, so a redelivered task (worker killed, ``acks_late``) completes the work
exactly once: findings are replaced, result objects carry deterministic UIDs, export rows are
unique per object and destination.

Errors: a series that cannot be analyzed is NOT_ANALYZABLE with a stable reason code (from
``imaging.qc``); transient infrastructure errors (database, filesystem, broker) are retried
with exponential backoff up to ``task_max_retries``; anything else, and the last retry, makes
the analysis FAILED with its error, visible through the API and retryable by an admin.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy import Engine, delete, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record
from service.config import Settings, get_settings
from service.db.session import make_engine, make_session_factory, session_scope
from service.db.tables import (
    Analysis,
    AnalysisResult,
    AnalysisState,
    Finding,
    Instance,
    SeriesState,
)
from service.db.types import utcnow
from service.heartbeat import Heartbeat
from service.model_manifest import manifest_sha256
from service.outcomes import SeriesReason, failure_codes
from service.queue import (
    EXPORT_QUEUE,
    TASK_ANALYZE_SERIES,
    TASK_EXPORT_RESULT,
    TASK_NOTIFY,
    enqueue_export,
    make_celery,
)

logger = logging.getLogger(__name__)

FINAL_STATES = {AnalysisState.DONE, AnalysisState.NOT_ANALYZABLE, AnalysisState.SUPERSEDED,
                AnalysisState.FAILED}


class TransientError(Exception):
    """Infrastructure trouble worth retrying (database, filesystem, broker)."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | TransientError | ConnectionError | TimeoutError):
        return True
    try:
        import redis

        if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, OSError) and exc.errno in {5, 11, 28, 110, 111, 112, 113, 116, 122}


@dataclass
class WorkerContext:
    """What one worker process holds: settings and database handles, created after fork."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    celery: Celery
    heartbeat: Heartbeat | None = None

    @classmethod
    def create(cls, settings: Settings, celery: Celery) -> WorkerContext:
        engine = make_engine(settings.db_url)
        return cls(settings=settings, engine=engine,
                   session_factory=make_session_factory(engine), celery=celery)


# --------------------------------------------------------------------------- analysis


@dataclass
class _Claim:
    analysis_id: int
    series_instance_uid: str
    study_instance_uid: str
    paths: list[Path]
    attempt: int


def _claim(ctx: WorkerContext, analysis_id: int, task_id: str | None) -> _Claim | None:
    """Move the analysis to RUNNING if there is work to do; None when there is not."""
    with session_scope(ctx.session_factory) as session:
        analysis = session.get(Analysis, analysis_id, with_for_update=True)
        if analysis is None:
            logger.warning("analysis %d does not exist; dropping the task", analysis_id)
            return None
        if analysis.state in FINAL_STATES:
            logger.info("analysis %d is already %s; nothing to do", analysis_id,
                        analysis.state.value)
            return None
        if (analysis.state is AnalysisState.RUNNING and task_id and analysis.task_id
                and analysis.task_id != task_id and analysis.started_at is not None
                and (utcnow() - analysis.started_at).total_seconds()
                < ctx.settings.task_time_limit_s):
            # A second message for an analysis another task is running (the dispatcher
            # re-sent it after a broker restart, and the first message survived): skip it.
            # The same task id is the broker redelivering after a worker died: take over.
            logger.info("analysis %d is running as task %s; duplicate task %s skipped",
                        analysis_id, analysis.task_id, task_id)
            return None
        series = analysis.series
        now = utcnow()
        analysis.state = AnalysisState.RUNNING
        analysis.started_at = now
        analysis.attempts += 1
        analysis.task_id = task_id
        analysis.error = None
        if analysis.queued_at is None:
            analysis.queued_at = now
        if series.state in (SeriesState.COMPLETE, SeriesState.QUEUED, SeriesState.RUNNING):
            series.state = SeriesState.RUNNING  # not when the series reopened meanwhile
        instances = session.execute(
            select(Instance.spool_path).where(Instance.series_id == series.id)
            .order_by(Instance.id)
        ).scalars().all()
        spool = ctx.settings.spool_path
        return _Claim(analysis_id=analysis.id, series_instance_uid=series.series_instance_uid,
                      study_instance_uid=series.study.study_instance_uid,
                      paths=[spool / p for p in instances], attempt=analysis.attempts)


def _finish_not_analyzable(ctx: WorkerContext, analysis_id: int, reason: str,
                           detail: str) -> None:
    from service.worklist.priority import PriorityPolicy, apply_priority

    with session_scope(ctx.session_factory) as session:
        analysis = session.get(Analysis, analysis_id, with_for_update=True)
        if analysis is None:
            return
        now = utcnow()
        analysis.state = AnalysisState.NOT_ANALYZABLE
        analysis.reason_code = reason
        analysis.error = detail[:4000]
        analysis.finished_at = now
        series = analysis.series
        current = _is_current(session, analysis) and series.state is not SeriesState.RECEIVING
        if current:
            series.state = SeriesState.NOT_ANALYZABLE
            series.state_reason = reason
            series.state_detail = detail[:4000]
            apply_priority(session, series.study, PriorityPolicy.not_analyzed(reason),
                           analysis=analysis, now=now, actor=ctx.settings.ae_title)
        record(session, "analysis.not_analyzable", outcome="failure",
               actor=ctx.settings.ae_title,
               study_instance_uid=series.study.study_instance_uid,
               series_instance_uid=series.series_instance_uid,
               details={"analysis_id": analysis_id, "reason": reason, "detail": detail[:500]})
    logger.info("analysis %d NOT_ANALYZABLE: %s (%s)", analysis_id, reason, detail)


def _finish_failed(ctx: WorkerContext, analysis_id: int, error: str) -> None:
    with session_scope(ctx.session_factory) as session:
        analysis = session.get(Analysis, analysis_id, with_for_update=True)
        if analysis is None:
            return
        analysis.state = AnalysisState.FAILED
        analysis.error = error[:4000]
        analysis.finished_at = utcnow()
        series = analysis.series
        if _is_current(session, analysis) and series.state is not SeriesState.RECEIVING:
            series.state = SeriesState.FAILED
            series.state_reason = SeriesReason.ANALYSIS_FAILED.value
            series.state_detail = error[:4000]
        record(session, "analysis.failed", outcome="failure", actor=ctx.settings.ae_title,
               study_instance_uid=series.study.study_instance_uid,
               series_instance_uid=series.series_instance_uid,
               details={"analysis_id": analysis_id, "attempts": analysis.attempts,
                        "error": error[:500]})
    logger.error("analysis %d FAILED: %s", analysis_id, error)


def _is_current(session: Session, analysis: Analysis) -> bool:
    """True unless a newer analysis of the same series exists (a reopened series)."""
    newer = session.execute(
        select(Analysis.id).where(Analysis.series_id == analysis.series_id,
                                  Analysis.id > analysis.id,
                                  Analysis.state != AnalysisState.FAILED).limit(1)
    ).scalar_one_or_none()
    return newer is None and analysis.state is not AnalysisState.SUPERSEDED


def _load_and_infer(ctx: WorkerContext, claim: _Claim) -> tuple[Any, Any, dict[str, float]]:
    """Load the series and run the model; returns (volume, findings, durations)."""
    from service.imaging.qc import check_cervical_spine
    from service.imaging.volume import load_series
    from service.inference.pipeline import run_pipeline
    from service.inference.runtime import get_runtime

    durations: dict[str, float] = {}
    started = time.perf_counter()
    volume = load_series(claim.paths, ctx.settings)
    durations["load"] = time.perf_counter() - started
    runtime = get_runtime(ctx.settings)
    findings = run_pipeline(volume, runtime, ctx.settings, load_seconds=durations["load"])
    durations.update(findings.stage_durations)
    # Decided after segmentation, before any flag: a field of view with no or too little
    # cervical spine is outside the service's scope (NOT_ANALYZABLE with its reason), neither
    # a failure nor a negative.
    check_cervical_spine(findings.in_view,
                         skull_base_in_view=findings.anatomy.get("skull_base_mm") is not None)
    return volume, findings, durations


def _store_results(ctx: WorkerContext, volume: Any, findings: Any) -> dict[Any, Any]:
    from service.results.build import build_and_store
    from service.results.common import AlgorithmInfo

    algorithm = AlgorithmInfo(name=findings.model_name, version=findings.model_version)
    return build_and_store(volume, findings, ctx.settings, algorithm=algorithm)


def _record_findings(ctx: WorkerContext, claim: _Claim, findings: Any,
                     durations: dict[str, float], inferred_at: datetime,
                     warnings: list[str]) -> tuple[bool, bool]:
    """Write findings and the answer and flag the study, before any SR or SEG is built.

    The worklist flag does not wait for the paperwork: a radiologist can act on the answer
    while the result objects are written. Returns (still ours, flagged now for the first
    time); the analysis stays RUNNING until :func:`_record_results`.
    """
    from service.worklist.priority import PriorityPolicy, apply_priority

    with session_scope(ctx.session_factory) as session:
        analysis = session.get(Analysis, claim.analysis_id, with_for_update=True)
        if analysis is None or analysis.state is not AnalysisState.RUNNING:
            logger.warning("analysis %d changed state while running; results kept, not flagged",
                           claim.analysis_id)
            return False, False
        first_flag = analysis.flagged_at is None
        session.execute(delete(Finding).where(Finding.analysis_id == analysis.id))
        for v in findings.vertebrae:
            session.add(Finding(
                analysis_id=analysis.id, vertebra=v.vertebra, in_view=v.in_view,
                probability=v.probability, suspected=v.suspected,
                slice_start=v.slice_range[0] if v.slice_range else None,
                slice_end=v.slice_range[1] if v.slice_range else None,
                bbox=list(v.bbox) if v.bbox else None, key_slices=list(v.key_slices),
                plausible=v.plausible, plausibility_reasons=list(v.plausibility_reasons)))
        analysis.patient_probability = float(findings.patient_probability)
        analysis.suspected = findings.result is AnalysisResult.FRACTURE_SUSPECTED
        analysis.result = findings.result
        analysis.plausibility = findings.anatomy or None
        analysis.execution_provider = findings.execution_provider
        analysis.stage_durations = {k: round(float(s), 4) for k, s in durations.items()}
        analysis.warnings = sorted(set(warnings))
        analysis.inferred_at = inferred_at
        series = analysis.series
        if _is_current(session, analysis):
            apply_priority(session, series.study,
                           PriorityPolicy.from_settings(ctx.settings).decide(findings),
                           analysis=analysis, actor=ctx.settings.ae_title)
        return True, first_flag and analysis.flagged_at is not None


def _record_results(ctx: WorkerContext, claim: _Claim, findings: Any, stored: dict[Any, Any],
                    durations: dict[str, float], results_stored_at: datetime) -> bool:
    """The SR and SEG are stored: plan their exports, DONE. True when exports are planned."""
    from service.dicom.scu import export_targets, plan_exports

    with session_scope(ctx.session_factory) as session:
        analysis = session.get(Analysis, claim.analysis_id, with_for_update=True)
        if analysis is None or analysis.state is not AnalysisState.RUNNING:
            logger.warning("analysis %d changed state while its results were built; results "
                           "kept, not exported", claim.analysis_id)
            return False
        analysis.stage_durations = {k: round(float(s), 4) for k, s in durations.items()}
        analysis.results_stored_at = results_stored_at
        rows = plan_exports(session, analysis.id, stored, export_targets(ctx.settings))
        analysis.state = AnalysisState.DONE
        analysis.finished_at = utcnow()
        analysis.reason_code = None
        series = analysis.series
        if _is_current(session, analysis) and series.state is not SeriesState.RECEIVING:
            series.state = SeriesState.DONE
            series.state_reason = None
            series.state_detail = None
        record(session, "analysis.done", actor=ctx.settings.ae_title,
               study_instance_uid=series.study.study_instance_uid,
               series_instance_uid=series.series_instance_uid,
               details={"analysis_id": analysis.id, "result": findings.result.value,
                        "suspected": findings.suspected_vertebrae,
                        "inconclusive_reasons": findings.inconclusive_reasons,
                        "patient_probability": round(float(findings.patient_probability), 4),
                        "provider": findings.execution_provider,
                        "objects": sorted(str(k.value) for k in stored)})
        return bool(rows)


def _end_on_error(ctx: WorkerContext, analysis_id: int, exc: BaseException) -> str:
    """The final state for an error of loading, inference or result building (re-raises
    transient errors for the task to retry)."""
    from service.imaging.qc import VolumeError
    from service.inference.manifest import ManifestError
    from service.inference.runtime import ModelIntegrityError

    if isinstance(exc, VolumeError):
        _finish_not_analyzable(ctx, analysis_id, exc.reason.value, exc.detail)
        return AnalysisState.NOT_ANALYZABLE.value
    if isinstance(exc, ModelIntegrityError | ManifestError):
        _finish_failed(ctx, analysis_id, f"model unusable: {exc}")
        return AnalysisState.FAILED.value
    if isinstance(exc, SoftTimeLimitExceeded):
        _finish_failed(ctx, analysis_id,
                       f"time limit of {ctx.settings.task_soft_time_limit_s} s exceeded")
        return AnalysisState.FAILED.value
    if _is_transient(exc):
        raise exc
    logger.error("analysis %d: unexpected error", analysis_id, exc_info=exc)
    _finish_failed(ctx, analysis_id, f"{type(exc).__name__}: {exc}\n"
                   + "".join(traceback.format_exception(exc, limit=5)))
    return AnalysisState.FAILED.value


def _send_notification(ctx: WorkerContext, analysis_id: int) -> None:
    if ctx.settings.webhook_url or (ctx.settings.hl7_host and ctx.settings.hl7_port):
        try:
            ctx.celery.send_task(TASK_NOTIFY, args=[analysis_id], queue=EXPORT_QUEUE,
                                 retry=False)
        except Exception:  # noqa: BLE001 - the flag is on the worklist either way
            logger.exception("analysis %d: could not enqueue the notification", analysis_id)


def analyze(ctx: WorkerContext, analysis_id: int, *, task_id: str | None = None,
            enqueue: Callable[[int], object] | None = None) -> str:
    """Run one analysis to a final state; returns that state's name.

    Order: load and infer, write the findings and flag the study (and send its
    notification), then build and store the SR and SEG, plan their exports, DONE. An error
    while building the results leaves the flag standing (the findings are sound) and ends
    the analysis FAILED with the error, retryable by an admin.
    Raises only transient errors (for the task to retry); everything else ends in a state.
    """
    claim = _claim(ctx, analysis_id, task_id)
    if claim is None:
        return "SKIPPED"
    try:
        volume, findings, durations = _load_and_infer(ctx, claim)
    except Exception as exc:  # noqa: BLE001 - every error becomes a state or a retry
        return _end_on_error(ctx, analysis_id, exc)
    ours, first_flag = _record_findings(ctx, claim, findings, durations, utcnow(),
                                        list(volume.warnings) + list(findings.warnings))
    if not ours:
        return AnalysisState.DONE.value
    if first_flag:
        _send_notification(ctx, analysis_id)
    try:
        started = time.perf_counter()
        stored = _store_results(ctx, volume, findings)
        durations["results"] = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - every error becomes a state or a retry
        return _end_on_error(ctx, analysis_id, exc)
    if _record_results(ctx, claim, findings, stored, durations, utcnow()):
        try:
            (enqueue or (lambda i: enqueue_export(ctx.celery, i)))(analysis_id)
        except Exception:  # noqa: BLE001 - rows stay PENDING; `triage export retry` resends
            logger.exception("analysis %d: could not enqueue the export", analysis_id)
    return AnalysisState.DONE.value


def notify_analysis(ctx: WorkerContext, analysis_id: int) -> dict[str, str | None]:
    """Tell the RIS / webhook that the study was flagged; audited per channel.

    Raises ``TransientError`` when a channel failed, so the task retries with backoff.
    """
    from service.worklist.notify import Notification, notify

    with ctx.session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        # Sent when the study is flagged, which comes before the SR and SEG exist (RUNNING
        # with its answer recorded), or for a DONE analysis.
        if analysis is None or not (
                analysis.state is AnalysisState.DONE
                or (analysis.state is AnalysisState.RUNNING and analysis.result is not None)):
            return {}
        study = analysis.series.study
        sr = next((e.sop_instance_uid for e in analysis.exports if e.object_kind == "SR"),
                  None)
        notification = Notification(
            study_instance_uid=study.study_instance_uid, priority=study.priority.value,
            reason=study.priority_reason or "", patient_suspected=bool(analysis.suspected),
            patient_probability=analysis.patient_probability,
            flagged_at=analysis.flagged_at or utcnow(),
            accession_number=study.accession_number, patient_id=study.patient_id,
            patient_name=study.patient_name,
            suspected_vertebrae=sorted(f.vertebra for f in analysis.findings if f.suspected),
            model_version=analysis.model_version, sr_sop_instance_uid=sr,
            result=analysis.result.value if analysis.result is not None else None,
            inconclusive_reasons=failure_codes(analysis.plausibility)
            if analysis.result is AnalysisResult.INCONCLUSIVE else [])
    outcome = notify(notification, ctx.settings, control_id=f"CSPT{analysis_id}")
    with session_scope(ctx.session_factory) as session:
        for channel, error in outcome.items():
            record(session, "notify.sent" if error is None else "notify.failed",
                   outcome="success" if error is None else "failure",
                   actor=ctx.settings.ae_title,
                   study_instance_uid=notification.study_instance_uid,
                   details={"analysis_id": analysis_id, "channel": channel,
                            **({"error": error[:300]} if error else {})})
    failed = {c: e for c, e in outcome.items() if e}
    if failed:
        raise TransientError(f"notification failed: {failed}")
    return outcome


def export(ctx: WorkerContext, analysis_id: int,
           sleep: Callable[[float], None] = time.sleep) -> dict[str, str]:
    """Send the analysis's result objects to every destination. The export task passes a
    ``sleep`` that raises ``ExportDeferred``: the backoff wait happens in the broker, not in
    a worker process (a PACS down for minutes would otherwise hold the process that also
    runs analyses, and outlive the task's time limit)."""
    from service.dicom.scu import export_analysis

    summary = export_analysis(ctx.session_factory, analysis_id, ctx.settings, sleep=sleep)
    return {f"{dest}/{kind}": state.value for (dest, kind), state in summary.states.items()}


def retry_analysis(session: Session, analysis_id: int, *, actor: str) -> Analysis:
    """Admin action: put a FAILED (or NOT_ANALYZABLE) analysis back to PENDING."""
    analysis = session.get(Analysis, analysis_id, with_for_update=True)
    if analysis is None:
        raise LookupError(f"analysis {analysis_id} does not exist")
    if analysis.state not in (AnalysisState.FAILED, AnalysisState.NOT_ANALYZABLE):
        raise ValueError(f"analysis {analysis_id} is {analysis.state.value}, not retryable")
    analysis.state = AnalysisState.PENDING
    analysis.error = None
    analysis.reason_code = None
    analysis.attempts = 0
    analysis.series.state = SeriesState.QUEUED
    record(session, "analysis.retry", actor=actor,
           study_instance_uid=analysis.series.study.study_instance_uid,
           series_instance_uid=analysis.series.series_instance_uid,
           details={"analysis_id": analysis_id})
    return analysis


# --------------------------------------------------------------------------- celery app


def _announce(ctx: WorkerContext) -> None:
    """Start this process's heartbeat (``service.heartbeat``): host, pid, model name,
    version and manifest hash, execution provider; read by ``/healthz`` and the admin status
    page. Best effort: a worker whose model fails to load still announces itself, with the
    error."""
    if ctx.heartbeat is not None or not ctx.settings.broker_url:
        return
    try:
        from service.inference.runtime import get_runtime

        info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(),
                                "started_at": utcnow().isoformat(),
                                "model_sha256": manifest_sha256(ctx.settings.model_dir)}
        try:
            info.update(get_runtime(ctx.settings).describe())
        except Exception as exc:  # noqa: BLE001 - reported, the worker keeps serving
            info["model_error"] = f"{type(exc).__name__}: {exc}"[:300]
        ctx.heartbeat = Heartbeat(ctx.settings.broker_url, info).start()
    except Exception:  # noqa: BLE001
        logger.warning("could not announce the worker on the broker", exc_info=True)


def _warm_results() -> None:
    """Load what the first SR/SEG build would otherwise load inside an analysis (issue 22:
    the flag does not wait for it, the SR in the PACS does). Best effort."""
    try:
        from service.results import hdcache

        hdcache.warm()
    except Exception:  # noqa: BLE001 - the first analysis loads it instead
        logger.warning("could not preload the result builders' tables", exc_info=True)


def create_worker_app(settings: Settings | None = None) -> Celery:
    """The Celery app with the task bodies registered (used by ``triage worker``)."""
    settings = settings or get_settings()
    app = make_celery(settings)
    contexts: dict[int, WorkerContext] = {}

    def context() -> WorkerContext:
        # One context per process: engines must not cross a fork.
        pid = os.getpid()
        if pid not in contexts:
            contexts.clear()
            contexts[pid] = WorkerContext.create(settings, app)
        return contexts[pid]

    @worker_process_init.connect(weak=False)
    def _init_process(**_kwargs: Any) -> None:
        _announce(context())  # each prefork child: the processes that run the model
        _warm_results()

    @worker_ready.connect(weak=False)
    def _ready(sender: Any = None, **_kwargs: Any) -> None:
        # solo and threads pools run tasks in this process and fire no worker_process_init;
        # a prefork parent must not load the model (nor CUDA) before it forks.
        pool = getattr(sender, "pool", None)
        if pool is not None and "prefork" not in type(pool).__module__:
            _announce(context())
            _warm_results()

    @worker_process_shutdown.connect(weak=False)
    @worker_shutdown.connect(weak=False)
    def _stop_heartbeat(**_kwargs: Any) -> None:
        ctx = contexts.get(os.getpid())
        if ctx is not None and ctx.heartbeat is not None:
            ctx.heartbeat.stop()
            ctx.heartbeat = None

    @app.task(name=TASK_ANALYZE_SERIES, bind=True, max_retries=settings.task_max_retries,
              acks_late=True)
    def analyze_series(self: Task, analysis_id: int) -> str:
        ctx = context()
        try:
            return analyze(ctx, analysis_id, task_id=self.request.id)
        except Exception as exc:
            if self.request.retries >= settings.task_max_retries:
                _finish_failed(ctx, analysis_id,
                               f"transient error after {self.request.retries + 1} attempts: "
                               f"{type(exc).__name__}: {exc}")
                return AnalysisState.FAILED.value
            countdown = settings.task_retry_backoff_s * 2 ** self.request.retries
            logger.warning("analysis %d: transient %s; retry in %d s", analysis_id,
                           type(exc).__name__, countdown)
            raise self.retry(exc=exc, countdown=countdown) from exc

    # max_retries=None: the export rows count the tries and end FAILED themselves; Celery's
    # own limit (3 by default) would drop a deferred export with its rows left RETRYING.
    @app.task(name=TASK_EXPORT_RESULT, bind=True, acks_late=True, queue=EXPORT_QUEUE,
              max_retries=None)
    def export_result(self: Task, analysis_id: int) -> dict[str, str]:
        from service.dicom.scu import ExportDeferred

        def defer(seconds: float) -> None:
            raise ExportDeferred(seconds)

        try:
            return export(context(), analysis_id, sleep=defer)
        except ExportDeferred as deferred:
            # Rows are RETRYING and carry their attempts; the export's own limit ends them
            # FAILED, so the broker may retry without a count of its own.
            raise self.retry(countdown=deferred.seconds) from None

    @app.task(name=TASK_NOTIFY, bind=True, acks_late=True, queue=EXPORT_QUEUE,
              max_retries=settings.export_max_retries)
    def notify_task(self: Task, analysis_id: int) -> dict[str, str | None]:
        try:
            return notify_analysis(context(), analysis_id)
        except TransientError as exc:
            if self.request.retries >= settings.export_max_retries:
                logger.error("analysis %d: notification abandoned: %s", analysis_id, exc)
                return {"error": str(exc)}
            raise self.retry(exc=exc, countdown=settings.export_retry_backoff_s
                             * 2 ** self.request.retries) from exc

    app.conf.worker_context_factory = context  # for tests and the CLI
    return app


def run_worker(settings: Settings, *, queues: list[str], concurrency: int | None = None,
               pool: str = "prefork", hostname: str | None = None) -> None:
    app = create_worker_app(settings)
    argv = ["worker", "--loglevel", settings.log_level, "-Q", ",".join(queues),
            "--concurrency", str(concurrency or settings.worker_concurrency), "--pool", pool,
            "--without-gossip", "--without-mingle"]
    if hostname:
        argv += ["--hostname", hostname]
    app.worker_main(argv)
