"""Turnaround arithmetic: acquisition -> flag per study, stage by stage, and its percentiles.

Pure functions over :class:`StudyTimes` (the milestones one study reached, read from the
database by :mod:`service.web.turnaround_query`): no database, no web, so the figures can be
tested on fixed timelines and used by any caller (the admin pages, ``GET /api/turnaround``,
the CSV export, a CLI).

The milestones, in the order the pipeline reaches them today:

``acquired`` (the DICOM header) -> ``received`` (last image) -> ``complete`` (series judged
complete) -> ``queued`` -> ``analyzed`` (the model's answer) -> ``flagged`` (the worklist
priority set) -> ``stored`` (SR and SEG written) -> ``sent`` (every export delivered).

The worker flags the study *before* it builds the SR and SEG, so the path an admin is
measured on (acquisition -> flag, against the 3-8 minute reference) is ``received``,
``complete``, ``queued``, ``analyzed``, ``flagged``; those five stages add up to the end to
end time. ``stored`` and ``sent`` are the paperwork after the answer, measured from
``analyzed`` and ``stored``. Each stage is named after the milestone that ends it.

Where the figures refuse to guess:

* a study with no acquisition time in its headers has no end to end time; it is counted
  apart (``missing_acquisition``) and judged on receipt -> flag, a lower bound;
* an acquisition time later than the last image's receipt (a scanner clock or time zone
  that is wrong) is no acquisition time either (``acquisition_after_receipt``);
* an acquisition time that is the study's start (Study Date + Time: the last fallback of the
  header chain the ingest code and the volume loader share) is kept but marked
  (``study_start``): an early bound, so the figure errs long, never short;
* studies still in flight, and studies that ended without a flag (analysis FAILED, or not
  analyzable before any model ran), never enter the percentiles; they are counted, and an
  in-flight study already over the target is listed with the stage it is waiting in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

logger = logging.getLogger(__name__)


class AcquisitionSource(StrEnum):
    """Where a study's start came from."""

    HEADER = "header"
    """Acquisition DateTime, Acquisition / Content / Series Date + Time of the images."""
    STUDY_START = "study_start"
    """Study Date + Time, the chain's last fallback: the study's start, an early bound."""
    AFTER_RECEIPT = "acquisition_after_receipt"
    """The header's time is later than the receipt: unusable (clock or time zone wrong)."""
    MISSING = "missing"
    """No acquisition time in the headers: receipt stands in, end to end not measured."""


class Status(StrEnum):
    FLAGGED = "flagged"
    """The answer is on the worklist: the turnaround is complete."""
    IN_FLIGHT = "in_flight"
    """Still receiving, waiting or running."""
    NOT_FLAGGED = "not_flagged"
    """Ended without a worklist answer: the analysis FAILED, or the series was not
    analyzable before any model ran."""


MILESTONES: tuple[str, ...] = ("acquired", "received", "complete", "queued", "analyzed",
                               "flagged", "stored", "sent")


@dataclass(frozen=True)
class Stage:
    key: str
    label: str
    start: str
    end: str
    to_flag: bool
    """On the acquisition -> flag path (the five such stages add up to the end to end)."""


STAGES: tuple[Stage, ...] = (
    Stage("received", "acquisition \u2192 last image received", "acquired", "received", True),
    Stage("complete", "last image \u2192 series complete", "received", "complete", True),
    Stage("queued", "complete \u2192 queued", "complete", "queued", True),
    Stage("analyzed", "queued \u2192 analyzed (queue wait, load, model)", "queued", "analyzed",
          True),
    Stage("flagged", "analyzed \u2192 flagged on the worklist", "analyzed", "flagged", True),
    Stage("stored", "analyzed \u2192 SR and SEG stored", "analyzed", "stored", False),
    Stage("sent", "stored \u2192 sent to the PACS", "stored", "sent", False),
)
STAGE_KEYS: tuple[str, ...] = tuple(s.key for s in STAGES)
END_TO_END = "end_to_end"
"""Acquisition -> flag: the figure the 3-8 minute reference is about."""


@dataclass(frozen=True)
class StudyTimes:
    """One study's milestones (aware UTC datetimes) and what the filters look at."""

    study_instance_uid: str
    acquired: datetime | None = None
    acquisition_source: AcquisitionSource = AcquisitionSource.HEADER
    """How ``acquired`` was derived (ignored when ``acquired`` is None)."""
    first_received: datetime | None = None
    received: datetime | None = None
    complete: datetime | None = None
    queued: datetime | None = None
    analyzed: datetime | None = None
    flagged: datetime | None = None
    stored: datetime | None = None
    sent: datetime | None = None
    ended_unflagged: bool = False
    """The analysis FAILED, or the series ended NOT_ANALYZABLE without an analysis."""
    calling_aes: tuple[str, ...] = ()
    priority: str | None = None
    model_version: str | None = None
    series_state: str | None = None
    analysis_state: str | None = None

    def at(self, milestone: str) -> datetime | None:
        value: datetime | None = getattr(self, milestone)
        return value


@dataclass(frozen=True)
class Filters:
    """Which studies count: all given conditions hold. Days are UTC and inclusive, on the
    study's first receipt (always known, unlike the acquisition time)."""

    date_from: date | None = None
    date_to: date | None = None
    calling_ae: str | None = None
    priority: str | None = None
    model_version: str | None = None

    def matches(self, times: StudyTimes) -> bool:
        start = times.first_received or times.received
        if self.date_from is not None and (start is None or _day(start) < self.date_from):
            return False
        if self.date_to is not None and (start is None or _day(start) > self.date_to):
            return False
        if self.calling_ae and self.calling_ae not in times.calling_aes:
            return False
        if self.priority and times.priority != self.priority:
            return False
        return not (self.model_version and times.model_version != self.model_version)

    def window(self) -> tuple[datetime | None, datetime | None]:
        """The date range as [start, end) UTC datetimes, for a database query."""
        start = (datetime.combine(self.date_from, datetime.min.time(), UTC)
                 if self.date_from else None)
        end = (datetime.combine(self.date_to, datetime.min.time(), UTC) + timedelta(days=1)
               if self.date_to else None)
        return start, end


def _day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


@dataclass(frozen=True)
class StudyTurnaround:
    """One study's figures (seconds)."""

    times: StudyTimes
    status: Status
    acquisition: AcquisitionSource
    stages: dict[str, float | None]
    end_to_end_s: float | None
    """Acquisition -> flag; None without a usable acquisition time or a flag."""
    from_receipt_s: float | None
    """First image received -> flag: the service's own share, measured for every flag."""
    judged_s: float | None
    """What the target is judged on: end to end, else (acquisition unknown) from receipt;
    for a study in flight, the time elapsed so far."""
    breach: bool
    slowest_stage: str | None
    """The acquisition -> flag stage that took longest (for an in-flight study: the stage
    it is waiting in)."""

    @property
    def start(self) -> datetime | None:
        if self.acquisition in (AcquisitionSource.HEADER, AcquisitionSource.STUDY_START):
            return self.times.acquired
        return self.times.first_received or self.times.received


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start is not None and end is not None else None


def acquisition_of(times: StudyTimes) -> AcquisitionSource:
    if times.acquired is None:
        return AcquisitionSource.MISSING
    receipt = times.received or times.first_received
    if receipt is not None and times.acquired > receipt:
        return AcquisitionSource.AFTER_RECEIPT
    return times.acquisition_source


def study_turnaround(times: StudyTimes, *, target_s: float, now: datetime) -> StudyTurnaround:
    """Stage durations, end to end, status and breach of one study."""
    source = acquisition_of(times)
    usable = source in (AcquisitionSource.HEADER, AcquisitionSource.STUDY_START)
    stages: dict[str, float | None] = {}
    for stage in STAGES:
        start = times.at(stage.start) if stage.start != "acquired" or usable else None
        stages[stage.key] = _seconds(start, times.at(stage.end))
    if times.flagged is not None:
        status = Status.FLAGGED
    elif times.ended_unflagged:
        status = Status.NOT_FLAGGED
    else:
        status = Status.IN_FLIGHT
    end_to_end = _seconds(times.acquired, times.flagged) if usable else None
    from_receipt = _seconds(times.first_received or times.received, times.flagged)
    slowest: str | None = None
    judged: float | None = None
    if status is Status.FLAGGED:
        judged = end_to_end if end_to_end is not None else from_receipt
        on_path = [(stages[s.key], s.key) for s in STAGES if s.to_flag
                   and stages[s.key] is not None]
        slowest = max(on_path, key=lambda pair: pair[0] or 0.0)[1] if on_path else None
    elif status is Status.IN_FLIGHT:
        start = times.acquired if usable else (times.first_received or times.received)
        judged = _seconds(start, now)
        slowest = next((s.key for s in STAGES if s.to_flag and times.at(s.end) is None), None)
    breach = judged is not None and judged > target_s and status is not Status.NOT_FLAGGED
    return StudyTurnaround(times=times, status=status, acquisition=source, stages=stages,
                           end_to_end_s=end_to_end, from_receipt_s=from_receipt,
                           judged_s=judged, breach=breach, slowest_stage=slowest)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between the closest ranks (numpy's
    default), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Stats:
    count: int
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        return cls(count=len(values), p50_s=percentile(values, 50),
                   p90_s=percentile(values, 90), p99_s=percentile(values, 99))


@dataclass(frozen=True)
class Summary:
    target_s: float
    studies: list[StudyTurnaround]
    stages: dict[str, Stats]
    """Per stage, over the studies where both its milestones are known (in flight or not)."""
    end_to_end: Stats
    """Acquisition -> flag, over the flagged studies with a usable acquisition time."""
    from_receipt: Stats
    """First receipt -> flag, over every flagged study."""
    counts: dict[str, int]
    breaches: list[StudyTurnaround] = field(default_factory=list)
    """Over the target, slowest first: flagged studies, and in-flight ones already late."""


def summarize(rows: Iterable[StudyTimes], *, target_s: float, now: datetime,
              filters: Filters | None = None) -> Summary:
    """The aggregate over the studies ``filters`` admits."""
    filters = filters or Filters()
    studies = [study_turnaround(t, target_s=target_s, now=now)
               for t in rows if filters.matches(t)]
    per_stage: dict[str, list[float]] = {key: [] for key in STAGE_KEYS}
    for study in studies:
        for key, value in study.stages.items():
            if value is not None:
                per_stage[key].append(value)
    flagged = [s for s in studies if s.status is Status.FLAGGED]
    counts = {
        "studies": len(studies),
        "flagged": len(flagged),
        "in_flight": sum(s.status is Status.IN_FLIGHT for s in studies),
        "not_flagged": sum(s.status is Status.NOT_FLAGGED for s in studies),
        "missing_acquisition": sum(s.acquisition is AcquisitionSource.MISSING for s in flagged),
        "acquisition_after_receipt": sum(s.acquisition is AcquisitionSource.AFTER_RECEIPT
                                         for s in flagged),
        "acquisition_from_study_start": sum(s.acquisition is AcquisitionSource.STUDY_START
                                            for s in flagged),
        "breaches": sum(s.breach for s in studies),
        "in_flight_over_target": sum(s.breach and s.status is Status.IN_FLIGHT
                                     for s in studies),
    }
    breaches = sorted((s for s in studies if s.breach), key=lambda s: -(s.judged_s or 0.0))
    return Summary(
        target_s=target_s, studies=studies,
        stages={key: Stats.of(values) for key, values in per_stage.items()},
        end_to_end=Stats.of([s.end_to_end_s for s in flagged if s.end_to_end_s is not None]),
        from_receipt=Stats.of([s.from_receipt_s for s in flagged
                               if s.from_receipt_s is not None]),
        counts=counts, breaches=breaches)


CSV_COLUMNS: tuple[str, ...] = (
    "study_instance_uid", "status", "priority", "model_version", "calling_aes",
    "acquisition_source", *(f"{m}_at" for m in MILESTONES),
    *(f"{k}_s" for k in STAGE_KEYS), "end_to_end_s", "from_receipt_s", "breach",
    "slowest_stage",
)


def _text(value: str) -> str:
    """A text cell a spreadsheet would run as a formula (a calling AE title is whatever the
    sender says) gets a leading ``'``."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def csv_row(study: StudyTurnaround) -> list[str]:
    """One study as CSV cells (ISO 8601 UTC times, seconds with millisecond precision)."""
    t = study.times

    def seconds(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    def moment(value: datetime | None) -> str:
        return "" if value is None else value.astimezone(UTC).isoformat()

    return [_text(t.study_instance_uid), study.status.value, _text(t.priority or ""),
            _text(t.model_version or ""), _text(" ".join(t.calling_aes)),
            study.acquisition.value,
            *(moment(t.at(m)) for m in MILESTONES),
            *(seconds(study.stages[k]) for k in STAGE_KEYS),
            seconds(study.end_to_end_s), seconds(study.from_receipt_s),
            "yes" if study.breach else "no", study.slowest_stage or ""]
