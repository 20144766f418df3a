"""Series completeness: decide, as early as is safe, that a series has stopped arriving.

A RECEIVING series is complete, in this order of preference (the name is what
``series.completion_reason`` stores and the audit event ``ingest.series.completed`` says):

1. ``mpps`` - at once when a Modality Performed Procedure Step COMPLETED (or DISCONTINUED)
   lists the series and every instance it lists is here: the sender's own inventory;
2. ``expected_count`` - at once when the instance count reaches Images in Acquisition
   (0020,1002) or ``TRIAGE_EXPECTED_INSTANCES_HINT``, and the stack checks out (below);
3. ``number_of_frames`` - the same for multi-frame (enhanced) images, whose header says how
   many objects hold the stack: one, or In-concatenation Total Number (0020,9163);
4. ``association_idle`` - when the association that last delivered to it has been released
   (or aborted) and nothing arrived for ``completion_idle_after_release_s`` (default 5 s);
5. ``idle`` - when nothing arrived for ``completion_idle_s`` (default 30 s), whatever the
   associations did (a sender that never releases, an SCP killed mid-association).

A count hint is trusted only with a complete stack (:func:`stack_verdict`): the series'
headers are read once, and the slices must be exactly the hinted number, evenly spaced along
the slice normal, with no gap and no shared position. Images in Acquisition counts the images
of an *acquisition*, which a scanner may spread over several series or several acquisitions
over one; a hint that does not match the stack is set aside for that (count, last arrival)
and the timers decide. The first instance's geometry gives the count of the stack only for a
multi-frame object (3): a single-frame CT header says where its slice is, not where the stack
ends, so no count is derived from it.

An association release with a gap-free stack is *not* on its own a reason to complete: a
sender that splits a series over two associations (a PACS forwarding in parts, a scanner
sending as it reconstructs) leaves, after the first, a stack that is itself complete and
gap-free, and the second continues it. Only a hint (1-3) completes early; otherwise the
release starts the short timer (4). ``tests/integration/test_ingest_completion.py`` sends a
series in two associations with a pause between them and checks it is not cut short.

All state is in the database, so any number of tracker loops (one per SCP process, several
pods) may run: completion is claimed with one atomic ``UPDATE .. WHERE state='RECEIVING' AND
instance_count=:seen AND last_received_at=:seen`` and only the process whose update matched
goes on to qualify the series and create its analysis. An instance arriving in between makes
the update match nothing; one arriving afterwards reopens the series (bookkeeper) and the next
completion creates a new analysis that supersedes the old one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import distinct, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record, write_anchor
from service.audit.atna import AtnaForwarder
from service.config import Settings
from service.db.tables import (
    AnalysisState,
    Instance,
    MppsStatus,
    PerformedProcedureStep,
    PerformedProcedureStepReference,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow
from service.imaging.geometry import slice_normal
from service.ingest.dispatch import (
    AnalysisDispatcher,
    affected_rows,
    create_analysis,
    input_fingerprint,
    model_version,
    series_state_for,
    supersede_series_analyses,
)
from service.ingest.header import UnreadableHeader, integer, read_header
from service.ingest.rules import (
    Decision,
    RuleSet,
    describe_preference,
    evaluate,
    load_rules,
    metrics_from_detail,
    preference_key,
    slices_from_dataset,
)
from service.ingest.spool import Spool
from service.outcomes import SeriesReason

logger = logging.getLogger(__name__)

EVENT_COMPLETED = "ingest.series.completed"
EVENT_QUALIFICATION = "ingest.series.qualification"
STALE_COMPLETE_S = 60.0
"""A series COMPLETE this long without a qualification decision lost its tracker: redo it."""


class CompletionReason(StrEnum):
    """Which signal completed a series (``series.completion_reason``); see the module doc."""

    EXPECTED_COUNT = "expected_count"
    NUMBER_OF_FRAMES = "number_of_frames"
    MPPS = "mpps"
    ASSOCIATION_IDLE = "association_idle"
    IDLE = "idle"


HINTED = frozenset({CompletionReason.EXPECTED_COUNT, CompletionReason.NUMBER_OF_FRAMES})
"""The reasons that rest on a count hint and so need :func:`stack_verdict` to agree."""


@dataclass(frozen=True)
class SeriesProgress:
    """The columns of a RECEIVING series that completion depends on."""

    id: int
    series_instance_uid: str
    instance_count: int
    expected_instances: int | None
    last_received_at: datetime | None
    association_released_at: datetime | None


def due_reason(progress: SeriesProgress, now: datetime, *, expected_hint: int | None,
               idle_after_release_s: float, idle_s: float,
               mpps_complete: bool = False, hint_set_aside: bool = False
               ) -> CompletionReason | None:
    """Why ``progress`` is complete at ``now``, or ``None`` if it must wait (pure function).

    A count hint gives :attr:`CompletionReason.EXPECTED_COUNT` here; the tracker confirms it
    on the stack (and names multi-frame ones) before claiming. ``hint_set_aside``: the stack
    did not confirm the hint at this count, so only MPPS and the timers apply.
    """
    if progress.instance_count <= 0:
        return None
    if mpps_complete:
        return CompletionReason.MPPS
    expected = progress.expected_instances or expected_hint
    if expected and progress.instance_count >= expected and not hint_set_aside:
        return CompletionReason.EXPECTED_COUNT
    last = progress.last_received_at
    if last is None:
        return None
    released = progress.association_released_at
    if released is not None:
        quiet_since = max(last, released)
        if (now - quiet_since).total_seconds() >= idle_after_release_s:
            return CompletionReason.ASSOCIATION_IDLE
    if (now - last).total_seconds() >= idle_s:
        return CompletionReason.IDLE
    return None


@dataclass(frozen=True)
class StackVerdict:
    """Whether a series' headers are the whole stack a count hint announced, and why not."""

    complete: bool
    multiframe: bool
    detail: str


def stack_verdict(datasets: Sequence[Dataset], expected: int, *, max_gap_factor: float,
                  unreadable: int = 0) -> StackVerdict:
    """Check that ``datasets`` (one header per instance) are exactly the hinted stack.

    Complete means: every header readable, as many instances as ``expected``, each slice (each
    frame of a multi-frame object) with a position and orientation, all slices on one normal,
    and their positions along it evenly spaced: no two at the same place, no step more than
    ``max_gap_factor`` times the median step (the qualification rules' gap factor), none less
    than the median divided by it. Localizers are left out. Positions are LPS millimetres
    projected on the first slice's normal.
    """
    multiframe = any((integer(ds, "NumberOfFrames") or 1) > 1 for ds in datasets)

    def no(detail: str) -> StackVerdict:
        return StackVerdict(False, multiframe, detail)

    if unreadable:
        return no(f"{unreadable} unreadable headers")
    if len(datasets) != expected:
        return no(f"{len(datasets)} instances, the hint says {expected}")
    slices = [s for ds in datasets for s in slices_from_dataset(ds) if not s.is_localizer]
    if not slices:
        return no("no image slices")
    if any(s.orientation is None or s.position is None for s in slices):
        return no("slices without Image Position/Orientation (Patient)")
    normals = [slice_normal(tuple(s.orientation)) for s in slices if s.orientation]
    reference = normals[0]
    if reference is None or any(n is None or abs(float(n @ reference)) < 0.999
                                for n in normals):
        return no("slices not parallel")
    positions = sorted(float(reference @ s.position) for s in slices if s.position)
    steps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    if not steps:
        return StackVerdict(True, multiframe, "one slice")
    median = sorted(steps)[len(steps) // 2]
    if min(steps) < 1e-3:
        return no("two slices share a position")
    if max(steps) > max_gap_factor * median or min(steps) < median / max_gap_factor:
        return no(f"uneven spacing: steps {min(steps):.3f} to {max(steps):.3f} mm "
                  f"around {median:.3f} mm")
    return StackVerdict(True, multiframe,
                        f"{len(slices)} slices evenly spaced {median:.3f} mm, no gap")


@dataclass(frozen=True)
class SeriesHeaders:
    """What the tracker read of one series: its count, (SOP UID, sha256) per row, headers."""

    count: int
    instances: list[tuple[str, str]]
    datasets: list[Dataset]
    unreadable: int


@dataclass
class TickReport:
    completed: list[int] = field(default_factory=list)
    qualified: list[int] = field(default_factory=list)
    not_analyzable: list[int] = field(default_factory=list)
    analyses_created: list[int] = field(default_factory=list)
    enqueued: int = 0


class Tracker:
    """Completion, qualification and analysis creation; one :meth:`tick` per interval."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, spool: Spool,
                 *, rules: RuleSet | None = None, dispatcher: AnalysisDispatcher | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self._factory = session_factory
        self._settings = settings
        self._spool = spool
        self._rules = rules or load_rules(settings)
        self._clock = clock
        self.dispatcher = dispatcher or AnalysisDispatcher(session_factory, settings,
                                                           clock=clock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hint_set_aside: dict[int, tuple[int, datetime | None]] = {}
        """Series id -> (instance count, last arrival) at which its count hint failed the
        stack check; process-local (another tracker checks for itself)."""
        self._prefetched: dict[int, tuple[tuple[int, datetime | None], SeriesHeaders]] = {}
        """Series id -> ((instance count, last arrival), headers read at that point): read
        while the release timer runs, so qualification after the claim reads nothing."""
        self._released_waiting: list[SeriesProgress] = []
        self._hinted_waiting: list[SeriesProgress] = []
        self._header_cache: dict[int, dict[str, Dataset]] = {}
        """Series id -> spool path -> header, for RECEIVING series: a spool file never
        changes under its name, so each header is read once however often it is needed."""

    # --- loop -------------------------------------------------------------------------------
    def wake(self, *_: Any) -> None:
        """Ask for a tick now (the bookkeeper calls this after a flush)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-tracker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        failures = 0
        anchored_at: float | None = None
        forwarded_at: float | None = None
        while not self._stop.is_set():
            delay = self._settings.tracker_interval_s * (2 ** min(failures, 5))
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.tick()
                failures = 0
            except Exception:  # noqa: BLE001 - the loop survives a database outage
                failures += 1
                logger.exception("tracker tick failed (%d in a row)", failures)
            anchored_at = self._anchor_if_due(anchored_at)
            forwarded_at = self._forward_atna_if_due(forwarded_at)

    def _forward_atna_if_due(self, forwarded_at: float | None) -> float | None:
        """Send the committed audit events to the ATNA syslog collector, when one is set.

        A collector (or database) that is down is retried every ``audit_syslog_interval_s``
        from the same offset, so nothing is lost and nothing is sent twice while it is down.
        """
        interval = self._settings.audit_syslog_interval_s
        now = time.monotonic()
        if not self._settings.audit_syslog_host or (
                forwarded_at is not None and now - forwarded_at < interval):
            return forwarded_at
        try:
            with self._factory() as session:
                AtnaForwarder(self._settings).forward(session)
        except Exception as exc:  # noqa: BLE001 - collector or database down: retried
            logger.warning("ATNA syslog: %s; retrying", str(exc).splitlines()[0][:200])
        return now

    def _anchor_if_due(self, anchored_at: float | None) -> float | None:
        """Anchor the audit chain head at start and every ``audit_anchor_interval_s``.

        The tracker loop is the one periodic loop a deployment runs exactly once (in
        ``triage scp`` or ``triage tracker``) and it already survives a database outage, so
        the anchor needs no process of its own; ``triage audit anchor`` does the same on
        demand (cron, to write a copy where the database's administrators cannot).
        Returns when it last anchored (monotonic seconds).
        """
        interval = self._settings.audit_anchor_interval_s
        now = time.monotonic()
        if interval <= 0 or (anchored_at is not None and now - anchored_at < interval):
            return anchored_at
        try:
            with self._factory() as session:
                write_anchor(session, self._settings.audit_anchor_path)
        except Exception as exc:  # noqa: BLE001 - an anchor missed now is taken next tick
            logger.warning("audit anchor failed (%s); retrying", str(exc).splitlines()[0][:200])
            return anchored_at
        return now

    def tick(self) -> TickReport:
        report = TickReport()
        for progress, reason in self.due():
            headers = self._prefetched_for(progress)
            if reason in HINTED:
                headers = headers or self._read_headers(progress.id)
                expected = progress.expected_instances or self._settings.expected_instances_hint
                verdict = stack_verdict(headers.datasets, expected or 0,
                                        max_gap_factor=self._rules.max_gap_factor,
                                        unreadable=headers.unreadable)
                if not verdict.complete:
                    # Not trusted at this (count, last arrival): the timers decide, unless
                    # more instances come and the stack is checked again.
                    self._hint_set_aside[progress.id] = (progress.instance_count,
                                                         progress.last_received_at)
                    logger.info("series %s: count hint %s not confirmed by the stack (%s); "
                                "waiting for the timers", progress.series_instance_uid,
                                expected, verdict.detail)
                    continue
                if verdict.multiframe:
                    reason = CompletionReason.NUMBER_OF_FRAMES
            if self._claim(progress, reason):
                self._prefetched.pop(progress.id, None)
                report.completed.append(progress.id)
                self._qualify(progress.id, report, headers)
        self._prefetch()
        for series_id in self._stale_complete():
            self._qualify(series_id, report)
        for analysis_id in report.analyses_created:
            if self.dispatcher.dispatch(analysis_id):
                report.enqueued += 1
        report.enqueued += self.dispatcher.sweep()
        return report

    # --- completion ---------------------------------------------------------------------------
    @staticmethod
    def _point(progress: SeriesProgress) -> tuple[int, datetime | None]:
        return progress.instance_count, progress.last_received_at

    def _prefetched_for(self, progress: SeriesProgress) -> SeriesHeaders | None:
        """Headers read earlier for exactly this (count, last arrival), else ``None``."""
        cached = self._prefetched.get(progress.id)
        if cached is None or cached[0] != self._point(progress):
            return None
        return cached[1]

    def _prefetch(self) -> None:
        """Read the headers of series whose sender has released while their release timer
        runs (the wait is there anyway; reading 300 headers takes seconds on a loaded CPU).

        Only released series: reading during reception would compete with the SCP's
        threads in this process. A header set is kept only if nothing arrived while it was
        read (its row count matches), and it is used only at the same (count, last arrival).
        """
        for progress in self._released_waiting:
            if self._stop.is_set():
                return
            if self._prefetched_for(progress) is not None:
                continue
            headers = self._read_headers(progress.id)
            if headers.count == progress.instance_count:
                self._prefetched[progress.id] = (self._point(progress), headers)
        # A series with a count hint is checked the moment the count is reached: its headers
        # are read as they arrive, a tick's worth at a time, so that check reads only the
        # last few. (Series without a hint are not read during reception: see above.)
        for progress in self._hinted_waiting:
            if self._stop.is_set():
                return
            self._read_headers(progress.id)

    def due(self) -> list[tuple[SeriesProgress, CompletionReason]]:
        """RECEIVING series that are complete now, with why."""
        now = self._clock()
        with self._factory() as session:
            rows = session.execute(
                select(Series.id, Series.series_instance_uid, Series.instance_count,
                       Series.expected_instances, Series.last_received_at,
                       Series.association_released_at)
                .where(Series.state == SeriesState.RECEIVING)).all()
            if not rows:
                self._hint_set_aside.clear()
                self._prefetched.clear()
                self._header_cache.clear()
                self._released_waiting = []
                self._hinted_waiting = []
                return []
            mpps_done = self._mpps_complete(session)
        out = []
        receiving = set()
        waiting: list[SeriesProgress] = []
        hinted: list[SeriesProgress] = []
        for row in rows:
            progress = SeriesProgress(*row)
            receiving.add(progress.id)
            set_aside = self._hint_set_aside.get(progress.id) == (progress.instance_count,
                                                                  progress.last_received_at)
            reason = due_reason(
                progress, now, expected_hint=self._settings.expected_instances_hint,
                idle_after_release_s=self._settings.completion_idle_after_release_s,
                idle_s=self._settings.completion_idle_s,
                mpps_complete=progress.series_instance_uid in mpps_done,
                hint_set_aside=set_aside)
            if reason is not None:
                out.append((progress, reason))
            elif progress.association_released_at is not None:
                waiting.append(progress)
            elif progress.expected_instances or self._settings.expected_instances_hint:
                hinted.append(progress)
        for series_id in set(self._hint_set_aside) - receiving:
            del self._hint_set_aside[series_id]
        for series_id in set(self._prefetched) - receiving:
            del self._prefetched[series_id]
        for series_id in set(self._header_cache) - receiving:
            del self._header_cache[series_id]
        self._released_waiting = waiting
        self._hinted_waiting = hinted
        return out

    @staticmethod
    def _mpps_complete(session: Session) -> set[str]:
        """RECEIVING series every image of which a finished MPPS lists is present."""
        ref = PerformedProcedureStepReference
        present = (select(Instance.sop_instance_uid)
                   .where(Instance.series_id == Series.id).correlate(Series))
        rows = session.execute(
            select(ref.series_instance_uid,
                   func.count(distinct(ref.sop_instance_uid)),
                   func.count(distinct(ref.sop_instance_uid))
                   .filter(ref.sop_instance_uid.in_(present.scalar_subquery())))
            .join(PerformedProcedureStep, PerformedProcedureStep.id == ref.mpps_id)
            .join(Series, Series.series_instance_uid == ref.series_instance_uid)
            .where(PerformedProcedureStep.status.in_([MppsStatus.COMPLETED,
                                                      MppsStatus.DISCONTINUED]),
                   Series.state == SeriesState.RECEIVING)
            .group_by(ref.series_instance_uid)).all()
        return {uid for uid, listed, here in rows if listed and here >= listed}

    def _claim(self, progress: SeriesProgress, reason: CompletionReason) -> bool:
        now = self._clock()
        with self._factory() as session, session.begin():
            conditions = [Series.id == progress.id, Series.state == SeriesState.RECEIVING,
                          Series.instance_count == progress.instance_count]
            if progress.last_received_at is None:
                conditions.append(Series.last_received_at.is_(None))
            else:
                conditions.append(Series.last_received_at == progress.last_received_at)
            claimed = affected_rows(session.execute(
                update(Series).where(*conditions)
                .values(state=SeriesState.COMPLETE, completed_at=now,
                        completion_reason=reason.value, updated_at=now)))
            if not claimed:
                return False
            study_uid = session.execute(
                select(Study.study_instance_uid).join(Series, Series.study_id == Study.id)
                .where(Series.id == progress.id)).scalar_one()
            record(session, EVENT_COMPLETED, study_instance_uid=study_uid,
                   series_instance_uid=progress.series_instance_uid,
                   details={"reason": reason.value, "instances": progress.instance_count,
                            "expected": progress.expected_instances})
        logger.info("series %s complete (%s, %d instances)", progress.series_instance_uid,
                    reason.value, progress.instance_count)
        return True

    def _stale_complete(self) -> list[int]:
        """COMPLETE series left without a decision by a process that died: claim them again."""
        cutoff = self._clock() - timedelta(seconds=STALE_COMPLETE_S)
        with self._factory() as session:
            rows = session.execute(
                select(Series.id, Series.completed_at)
                .where(Series.state == SeriesState.COMPLETE, Series.qualified.is_(None),
                       Series.completed_at < cutoff)).all()
        claimed = []
        for series_id, completed_at in rows:
            with self._factory() as session, session.begin():
                if affected_rows(session.execute(
                        update(Series)
                        .where(Series.id == series_id, Series.state == SeriesState.COMPLETE,
                               Series.qualified.is_(None), Series.completed_at == completed_at)
                        .values(completed_at=self._clock()))):
                    claimed.append(series_id)
        return claimed

    # --- qualification and analysis --------------------------------------------------------
    def _read_headers(self, series_id: int) -> SeriesHeaders:
        """Every instance row of the series and its spool file's header (pixels not read)."""
        with self._factory() as session:
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.sha256, Instance.spool_path)
                .where(Instance.series_id == series_id)).all()
            count = session.execute(select(Series.instance_count)
                                    .where(Series.id == series_id)).scalar_one()
        cache = self._header_cache.setdefault(series_id, {})
        datasets = []
        unreadable = 0
        for _sop, _sha, spool_path in sorted(instances, key=lambda r: r.spool_path):
            header = cache.get(spool_path)
            if header is None:
                try:
                    header = cache[spool_path] = read_header(self._spool.path(spool_path))
                except (UnreadableHeader, OSError) as exc:
                    unreadable += 1
                    logger.warning("series %d: %s", series_id, exc)
                    continue
            datasets.append(header)
        return SeriesHeaders(count, [(sop, sha) for sop, sha, _ in instances], datasets,
                             unreadable)

    def _qualify(self, series_id: int, report: TickReport,
                 headers: SeriesHeaders | None = None) -> None:
        """Decide on a claimed series; ``headers`` read before the claim are reused (the
        claim matched the same instance count, so they are the same instances)."""
        if headers is None:
            headers = self._read_headers(series_id)
        # Claimed, so no longer RECEIVING: its cached headers are not needed again. Dropped
        # now, not at the next tick, or a flood of series due at once (10 000 one-slice
        # series) holds every header in memory until the tick ends.
        self._header_cache.pop(series_id, None)
        uids = [sop for sop, _ in headers.instances]
        conflicting = len(uids) - len(set(uids))
        decision = evaluate(headers.datasets, self._rules, unreadable=headers.unreadable,
                            conflicting=conflicting)
        fingerprint = input_fingerprint(headers.instances)
        self._record_decision(series_id, headers.count, decision, fingerprint, report)

    def _record_decision(self, series_id: int, count: int, decision: Decision,
                         fingerprint: str, report: TickReport) -> None:
        now = self._clock()
        with self._factory() as session, session.begin():
            study_id = session.execute(select(Series.study_id)
                                       .where(Series.id == series_id)).scalar_one()
            # Lock the study first: two series of one study deciding at once must not both
            # believe they are the selected one.
            session.execute(update(Study).where(Study.id == study_id).values(updated_at=now))
            guard = [Series.id == series_id, Series.state == SeriesState.COMPLETE,
                     Series.instance_count == count]
            values: dict[str, Any] = {
                "qualified": decision.qualified,
                "qualification_reason": decision.reason.value,
                "qualification_detail": decision.detail_json(), "updated_at": now}
            if not decision.qualified:
                values.update(state=SeriesState.NOT_ANALYZABLE,
                              state_reason=decision.reason.value, state_detail=decision.detail)
            if not affected_rows(session.execute(update(Series).where(*guard).values(**values))):
                logger.info("series %d changed while it was being qualified: later", series_id)
                return
            series_uid, study_uid, selected_id = session.execute(
                select(Series.series_instance_uid, Study.study_instance_uid,
                       Study.selected_series_id)
                .join(Study, Study.id == Series.study_id).where(Series.id == series_id)).one()
            details: dict[str, Any] = {"qualified": decision.qualified,
                                       "reason": decision.reason.value,
                                       "detail": decision.detail}
            if not decision.qualified:
                report.not_analyzable.append(series_id)
                record(session, EVENT_QUALIFICATION, outcome="warning",
                       study_instance_uid=study_uid, series_instance_uid=series_uid,
                       details=details)
                logger.info("series %s not analyzable: %s (%s)", series_uid,
                            decision.reason.value, decision.detail)
                return
            report.qualified.append(series_id)
            chosen, why = self._select(session, study_id, series_id, selected_id,
                                       decision.metrics)
            details["selected"] = chosen == series_id
            details["selection"] = why
            if chosen != series_id:
                session.execute(update(Series).where(Series.id == series_id).values(
                    state=SeriesState.NOT_ANALYZABLE, state_reason=SeriesReason.NOT_SELECTED.value,
                    state_detail=why))
                record(session, EVENT_QUALIFICATION, study_instance_uid=study_uid,
                       series_instance_uid=series_uid, details=details)
                logger.info("series %s qualifies but is not selected: %s", series_uid, why)
                return
            analysis, created = create_analysis(session, series_id,
                                                model_version(self._settings), fingerprint)
            if selected_id is not None and selected_id != series_id:
                supersede_series_analyses(session, selected_id, analysis.id)
            session.execute(update(Study).where(Study.id == study_id)
                            .values(selected_series_id=series_id, selection_reason=why[:256]))
            state = series_state_for(analysis)
            if state != SeriesState.COMPLETE:
                session.execute(update(Series).where(Series.id == series_id)
                                .values(state=state))
            details.update(analysis_id=analysis.id, fingerprint=fingerprint,
                           model_version=analysis.model_version, new_analysis=created)
            record(session, EVENT_QUALIFICATION, study_instance_uid=study_uid,
                   series_instance_uid=series_uid, details=details)
        if analysis.state == AnalysisState.PENDING:
            report.analyses_created.append(analysis.id)
        logger.info("series %s qualified (%s); analysis %d %s", series_uid, why, analysis.id,
                    "created" if created else "reused")

    @staticmethod
    def _select(session: Session, study_id: int, series_id: int, selected_id: int | None,
                metrics: dict[str, Any]) -> tuple[int, str]:
        """The study's preferred qualifying series (bone kernel, thin, many slices) and why."""
        others = session.execute(
            select(Series.id, Series.series_instance_uid, Series.qualification_detail)
            .where(Series.study_id == study_id, Series.id != series_id,
                   Series.qualified.is_(True))).all()
        mine = preference_key(metrics)
        best_other = None
        for other_id, other_uid, detail in others:
            other_metrics = metrics_from_detail(detail)
            key = preference_key(other_metrics)
            # Ties keep the series already selected, so a re-sent series does not flap.
            beats_mine = key < mine or (key == mine and other_id == selected_id)
            if beats_mine and (best_other is None or key < best_other[0]):
                best_other = (key, other_id, other_uid, other_metrics)
        if best_other is None:
            if others:
                return series_id, (f"selected ({describe_preference(metrics)}) over "
                                   f"{len(others)} other qualifying series")
            return series_id, f"only qualifying series ({describe_preference(metrics)})"
        _, other_id, other_uid, other_metrics = best_other
        return other_id, (f"series {other_uid} preferred "
                          f"({describe_preference(other_metrics)} vs "
                          f"{describe_preference(metrics)})")
