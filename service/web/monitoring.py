"""Model monitoring: the figures a site watches to notice drift, by model version and period.

Per model version and day (or ISO week): how many answers, the share *fracture suspected*
and the share INCONCLUSIVE (over the DONE analyses: the answers given), NOT_ANALYZABLE by
reason (:class:`service.outcomes.SeriesReason`, the one vocabulary), and the radiologists'
agreement from the feedback table:

* **real-world PPV** = agreed positives / positives with a verdict. A positive's verdict is
  its latest study-level AGREE or DISAGREE; without one, AGREE on any suspected level makes
  it agreed, else DISAGREE on a suspected level makes it disagreed. MISSED does not decide it.
* **misses reported**: a study the service did not flag (no fracture found, or INCONCLUSIVE)
  with a MISSED verdict, or a latest study-level DISAGREE on "no fracture found"; and, apart,
  levels reported MISSED on studies that were flagged (another level was found).

These are what the radiologists chose to say, not a ground truth: the PPV is over the
positives that got a verdict, and its coverage is shown with it.

Series refused by the ingest rules never reach a model: they are listed under
:data:`BEFORE_MODEL` (one reason per study that got no analysis; ``NOT_SELECTED``, a series
left out because a sibling was analysed, is not a refusal and is not counted).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.tables import (
    Analysis,
    AnalysisState,
    Feedback,
    FeedbackVerdict,
    Finding,
    Series,
    SeriesState,
)
from service.outcomes import AnalysisResult, SeriesReason

logger = logging.getLogger(__name__)

BEFORE_MODEL = "before the model (ingest rules)"


class Period(StrEnum):
    DAY = "day"
    WEEK = "week"


def period_of(moment: datetime, period: Period) -> date:
    """The UTC day, or the Monday that starts its ISO week."""
    day = moment.astimezone(UTC).date()
    return day - timedelta(days=day.weekday()) if period is Period.WEEK else day


@dataclass(frozen=True)
class Outcome:
    """One answer: a finished analysis, or a study the ingest rules refused."""

    key: int
    """The analysis id (feedback refers to it); negative for a rules refusal."""
    model_version: str
    at: datetime
    state: AnalysisState
    result: AnalysisResult | None = None
    reason: str | None = None
    suspected_levels: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verdict:
    analysis_id: int
    vertebra: str | None
    verdict: FeedbackVerdict
    created_at: datetime


@dataclass
class Row:
    """One model version in one period."""

    model_version: str
    period: date
    done: int = 0
    positive: int = 0
    inconclusive: int = 0
    negative: int = 0
    not_analyzable: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.done if self.done else None

    @property
    def inconclusive_rate(self) -> float | None:
        return self.inconclusive / self.done if self.done else None

    @property
    def not_analyzable_rate(self) -> float | None:
        total = self.done + self.not_analyzable + self.failed
        return self.not_analyzable / total if total else None


@dataclass
class Agreement:
    """Feedback over one model version's answers."""

    model_version: str
    positives: int = 0
    positives_with_verdict: int = 0
    agreed: int = 0
    disagreed: int = 0
    missed_on_negative: int = 0
    missed_on_inconclusive: int = 0
    missed_levels_on_flagged: int = 0

    @property
    def ppv(self) -> float | None:
        return self.agreed / self.positives_with_verdict if self.positives_with_verdict else None

    @property
    def coverage(self) -> float | None:
        return self.positives_with_verdict / self.positives if self.positives else None

    @property
    def misses(self) -> int:
        return self.missed_on_negative + self.missed_on_inconclusive


def positive_verdict(outcome: Outcome, verdicts: list[Verdict]) -> bool | None:
    """True (agreed), False (disagreed) or None (no verdict) for a positive answer."""
    study_level = [v for v in verdicts if v.vertebra is None
                   and v.verdict in (FeedbackVerdict.AGREE, FeedbackVerdict.DISAGREE)]
    if study_level:
        latest = max(study_level, key=lambda v: v.created_at)
        return latest.verdict is FeedbackVerdict.AGREE
    on_suspected = [v.verdict for v in verdicts if v.vertebra in outcome.suspected_levels]
    if FeedbackVerdict.AGREE in on_suspected:
        return True
    if FeedbackVerdict.DISAGREE in on_suspected:
        return False
    return None


def _missed(outcome: Outcome, verdicts: list[Verdict]) -> bool:
    if any(v.verdict is FeedbackVerdict.MISSED for v in verdicts):
        return True
    study_level = [v for v in verdicts if v.vertebra is None
                   and v.verdict in (FeedbackVerdict.AGREE, FeedbackVerdict.DISAGREE)]
    return (outcome.result is AnalysisResult.NO_FRACTURE_FOUND and bool(study_level)
            and max(study_level, key=lambda v: v.created_at).verdict
            is FeedbackVerdict.DISAGREE)


@dataclass
class Monitoring:
    period: Period
    rows: list[Row]
    """Model version, then period (newest first)."""
    agreement: list[Agreement]
    reasons: list[str]
    """Every NOT_ANALYZABLE reason seen, in the vocabulary's order."""


def summarize(outcomes: Iterable[Outcome], verdicts: Iterable[Verdict],
              period: Period = Period.DAY) -> Monitoring:
    by_analysis: dict[int, list[Verdict]] = defaultdict(list)
    for given_verdict in verdicts:
        by_analysis[given_verdict.analysis_id].append(given_verdict)
    rows: dict[tuple[str, date], Row] = {}
    agreement: dict[str, Agreement] = {}
    for o in outcomes:
        row = rows.setdefault((o.model_version, period_of(o.at, period)),
                              Row(o.model_version, period_of(o.at, period)))
        if o.state is AnalysisState.NOT_ANALYZABLE:
            row.not_analyzable += 1
            row.reasons[o.reason or "UNKNOWN"] += 1
            continue
        if o.state is AnalysisState.FAILED:
            row.failed += 1
            continue
        row.done += 1
        agree = agreement.setdefault(o.model_version, Agreement(o.model_version))
        given = by_analysis.get(o.key, [])
        if o.result is AnalysisResult.FRACTURE_SUSPECTED:
            row.positive += 1
            agree.positives += 1
            agreed = positive_verdict(o, given)
            if agreed is not None:
                agree.positives_with_verdict += 1
                agree.agreed += agreed
                agree.disagreed += not agreed
            agree.missed_levels_on_flagged += sum(
                v.verdict is FeedbackVerdict.MISSED and v.vertebra is not None for v in given)
        elif o.result is AnalysisResult.INCONCLUSIVE:
            row.inconclusive += 1
            agree.missed_on_inconclusive += _missed(o, given)
        else:
            row.negative += 1
            agree.missed_on_negative += _missed(o, given)
    order = {r.value: i for i, r in enumerate(SeriesReason)}
    reasons = sorted({r for row in rows.values() for r in row.reasons},
                     key=lambda r: (order.get(r, len(order)), r))
    ordered = sorted(rows.values(), key=lambda r: (r.model_version == BEFORE_MODEL,
                                                   r.model_version, -r.period.toordinal()))
    return Monitoring(period=period, rows=ordered,
                      agreement=sorted(agreement.values(), key=lambda a: a.model_version),
                      reasons=reasons)


def _window(date_from: date | None, date_to: date | None
            ) -> tuple[datetime | None, datetime | None]:
    start = datetime.combine(date_from, datetime.min.time(), UTC) if date_from else None
    end = (datetime.combine(date_to, datetime.min.time(), UTC) + timedelta(days=1)
           if date_to else None)
    return start, end


def _inside(moment: datetime, start: datetime | None, end: datetime | None) -> bool:
    return (start is None or moment >= start) and (end is None or moment < end)


def load(session: Session, date_from: date | None = None, date_to: date | None = None
         ) -> tuple[list[Outcome], list[Verdict]]:
    """Finished analyses (not superseded) and rules refusals answered in the UTC day range,
    with the feedback given on those analyses."""
    start, end = _window(date_from, date_to)
    outcomes: list[Outcome] = []
    answered = func.coalesce(Analysis.inferred_at, Analysis.finished_at, Analysis.created_at)
    query = select(Analysis).where(Analysis.state.in_(
        (AnalysisState.DONE, AnalysisState.NOT_ANALYZABLE, AnalysisState.FAILED)))
    if start is not None:
        query = query.where(answered >= start)
    if end is not None:
        query = query.where(answered < end)
    for a in session.execute(query).scalars():
        at = a.inferred_at or a.finished_at or a.created_at
        if not _inside(at, start, end):
            continue
        outcomes.append(Outcome(key=a.id, model_version=a.model_version, at=at, state=a.state,
                                result=a.result if a.state is AnalysisState.DONE else None,
                                reason=a.reason_code))
    ids = [o.key for o in outcomes if o.result is AnalysisResult.FRACTURE_SUSPECTED]
    suspected: dict[int, set[str]] = defaultdict(set)
    for chunk in _chunks(ids):
        for analysis_id, vertebra in session.execute(
                select(Finding.analysis_id, Finding.vertebra)
                .where(Finding.analysis_id.in_(chunk), Finding.suspected.is_(True))).all():
            suspected[analysis_id].add(vertebra)
    outcomes = [Outcome(o.key, o.model_version, o.at, o.state, o.result, o.reason,
                        frozenset(suspected.get(o.key, ()))) for o in outcomes]
    analysed_series = set(session.execute(select(Analysis.series_id).distinct()).scalars())
    outcomes.extend(_rules_refusals(session, analysed_series, start, end))
    verdicts: list[Verdict] = []
    for chunk in _chunks([o.key for o in outcomes if o.key > 0]):
        verdicts.extend(Verdict(f.analysis_id, f.vertebra, f.verdict, f.created_at)
                        for f in session.execute(select(Feedback).where(
                            Feedback.analysis_id.in_(chunk))).scalars()
                        if f.analysis_id is not None)
    return outcomes, verdicts


def _rules_refusals(session: Session, analysed_series: set[int], start: datetime | None,
                    end: datetime | None) -> list[Outcome]:
    """One NOT_ANALYZABLE per study none of whose series got an analysis."""
    by_study: dict[int, list[Series]] = defaultdict(list)
    for series in session.execute(select(Series).order_by(Series.id)).scalars():
        by_study[series.study_id].append(series)
    out: list[Outcome] = []
    for study_id, series_list in by_study.items():
        if any(s.id in analysed_series for s in series_list):
            continue
        refused = [s for s in series_list if s.state is SeriesState.NOT_ANALYZABLE
                   and s.state_reason != SeriesReason.NOT_SELECTED.value]
        if not refused or len(refused) != len(series_list):
            continue
        at = refused[0].completed_at or refused[0].updated_at
        if _inside(at, start, end):
            out.append(Outcome(key=-study_id, model_version=BEFORE_MODEL, at=at,
                               state=AnalysisState.NOT_ANALYZABLE,
                               reason=refused[0].state_reason))
    return out


def _chunks(ids: list[int], size: int = 500) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids), size)]
