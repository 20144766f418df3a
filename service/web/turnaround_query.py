"""Read the stage timestamps the pipeline stores into :class:`StudyTimes` (a few bulk queries).

Which series and analysis speak for a study is the study page's choice
(:func:`service.web.study_view.current_analysis`): the selected series, else any, and its
newest analysis that is not superseded. Where each milestone comes from:

=========== ======================================================================
acquired    ``Series.acquired_at``: the ingest code's header chain
            (:func:`service.ingest.header.acquisition_time`, the same order as the
            volume loader's :func:`service.imaging.source.acquisition_datetime`)
received    ``Series.last_received_at``
complete    ``Series.completed_at``
queued      ``Analysis.queued_at``
analyzed    ``Analysis.inferred_at``; for a NOT_ANALYZABLE analysis (load or scope
            refused it), ``finished_at``: when the worker reached that answer
flagged     ``Analysis.flagged_at`` (set by :func:`service.worklist.priority.apply_priority`)
stored      ``Analysis.results_stored_at``
sent        ``Analysis.exported_at`` (every export of the analysis delivered)
=========== ======================================================================

Which header attribute ``acquired_at`` came from is not stored. The one fallback that
matters for the figures, Study Date + Time (the study's start, not the series'), is
recognised by deriving the study start from the stored Study Date and Study Time exactly as
the ingest code does and comparing: equal means marked ``study_start``. A header with a
Timezone Offset From UTC was read with that offset at ingest and is not recognised here (it
stays ``header``); a scanner whose Acquisition Time equals its Study Time is marked
``study_start`` though the instant is the same.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from datetime import UTC, datetime

from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.tables import (
    Analysis,
    AnalysisState,
    Instance,
    Series,
    SeriesState,
    Study,
)
from service.ingest.header import acquisition_time
from service.web.turnaround import AcquisitionSource, Filters, StudyTimes

logger = logging.getLogger(__name__)

_LAST = datetime.max.replace(tzinfo=UTC)


def study_start(study_date: str | None, study_time: str | None) -> datetime | None:
    """The study's start as the ingest code derives it from Study Date + Study Time."""
    if not study_date:
        return None
    ds = Dataset()
    ds.StudyDate = study_date
    if study_time:
        ds.StudyTime = study_time
    return acquisition_time(ds)


def pick_current(study: Study, series_list: list[Series],
                 analyses: dict[int, list[Analysis]]) -> tuple[Series | None, Analysis | None]:
    """The study page's choice (``current_analysis``) over preloaded rows: the selected series
    (else every series) and the newest non-superseded analysis among them."""
    candidates = [s for s in series_list if s.id == study.selected_series_id] or series_list
    best: tuple[Series | None, Analysis | None] = (candidates[0] if candidates else None, None)
    for series in candidates:
        for analysis in analyses.get(series.id, [])[:1]:
            if best[1] is None or analysis.created_at > best[1].created_at:
                best = (series, analysis)
    return best


def _times(study: Study, series: Series, analysis: Analysis | None,
           aes: tuple[str, ...]) -> StudyTimes:
    source = AcquisitionSource.HEADER
    if series.acquired_at is not None and series.acquired_at == study_start(
            study.study_date, study.study_time):
        source = AcquisitionSource.STUDY_START
    analyzed = None
    ended_unflagged = False
    if analysis is not None:
        analyzed = analysis.inferred_at
        if analysis.state is AnalysisState.NOT_ANALYZABLE and analyzed is None:
            analyzed = analysis.finished_at
        ended_unflagged = analysis.state is AnalysisState.FAILED
    else:
        ended_unflagged = series.state in (SeriesState.NOT_ANALYZABLE, SeriesState.FAILED)
    return StudyTimes(
        study_instance_uid=study.study_instance_uid,
        acquired=series.acquired_at, acquisition_source=source,
        first_received=series.first_received_at, received=series.last_received_at,
        complete=series.completed_at,
        queued=analysis.queued_at if analysis else None, analyzed=analyzed,
        flagged=analysis.flagged_at if analysis else None,
        stored=analysis.results_stored_at if analysis else None,
        sent=analysis.exported_at if analysis else None,
        ended_unflagged=ended_unflagged and (analysis is None or analysis.flagged_at is None),
        calling_aes=aes, priority=study.priority.value if study.priority else None,
        model_version=analysis.model_version if analysis else None,
        series_state=series.state.value,
        analysis_state=analysis.state.value if analysis else None)


def load_study_times(session: Session, filters: Filters | None = None) -> list[StudyTimes]:
    """Every study that started arriving in the filters' date range, oldest first (the other
    filters are applied by :func:`service.web.turnaround.summarize`)."""
    start, end = (filters or Filters()).window()
    series_query = select(Series.study_id).distinct().where(
        Series.first_received_at.is_not(None))
    if start is not None:
        series_query = series_query.where(Series.first_received_at >= start)
    if end is not None:
        series_query = series_query.where(Series.first_received_at < end)
    study_ids = set(session.execute(series_query).scalars())
    if not study_ids:
        return []
    ids = sorted(study_ids)
    studies = list(session.execute(select(Study).where(Study.id.in_(ids))).scalars())
    series_by_study: dict[int, list[Series]] = defaultdict(list)
    for series in session.execute(select(Series).where(Series.study_id.in_(ids))
                                  .order_by(Series.id)).scalars():
        series_by_study[series.study_id].append(series)
    analyses: dict[int, list[Analysis]] = defaultdict(list)
    for analysis in session.execute(
            select(Analysis).join(Series, Analysis.series_id == Series.id)
            .where(Series.study_id.in_(ids), Analysis.state != AnalysisState.SUPERSEDED)
            .order_by(Analysis.created_at.desc(), Analysis.id.desc())).scalars():
        analyses[analysis.series_id].append(analysis)
    aes: dict[int, set[str]] = defaultdict(set)
    for study_id, ae in session.execute(
            select(Series.study_id, Instance.calling_ae).distinct()
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids), Instance.calling_ae.is_not(None))).all():
        if ae:
            aes[study_id].add(ae)
    out: list[StudyTimes] = []
    for study in studies:
        current, latest = pick_current(study, series_by_study[study.id], analyses)
        if current is not None:
            out.append(_times(study, current, latest, tuple(sorted(aes[study.id]))))
    out.sort(key=lambda t: t.first_received or t.received or _LAST)
    return out


def filter_choices(rows: list[StudyTimes]) -> dict[str, list[str]]:
    """The values the filter form offers (what the loaded studies actually have)."""
    return {
        "calling_aes": sorted({ae for t in rows for ae in t.calling_aes}),
        "model_versions": sorted({t.model_version for t in rows if t.model_version}),
        "priorities": sorted({t.priority for t in rows if t.priority}),
    }
