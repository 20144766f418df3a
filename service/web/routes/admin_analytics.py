"""The admin's turnaround and model-monitoring pages, ``GET /api/turnaround`` and the CSV.

Thin: the figures come from :mod:`service.web.turnaround` (arithmetic),
:mod:`service.web.turnaround_query` (reading the stage timestamps) and
:mod:`service.web.monitoring`. The pages list Study Instance UIDs (never a patient name), and
each read is in the audit trail with its actor, like every other list of studies.
"""

from __future__ import annotations

import csv
import io
import logging
from datetime import date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from sqlalchemy.orm import Session

from service.audit import record
from service.config import Settings
from service.db.types import utcnow
from service.web import charts, monitoring
from service.web.auth import Actor
from service.web.deps import (
    AUTH_RESPONSES,
    AdminPage,
    AdminUser,
    CodecDep,
    SessionDep,
    SettingsDep,
    client_ip,
)
from service.web.routes.pages import _page
from service.web.turnaround import (
    CSV_COLUMNS,
    STAGES,
    Filters,
    Stats,
    Summary,
    csv_row,
    summarize,
)
from service.web.turnaround_query import filter_choices, load_study_times
from service.web.turnaround_schemas import StageFigures, TurnaroundReport, breach_view

logger = logging.getLogger(__name__)

router = APIRouter(tags=["admin"])

DEFAULT_DAYS = 7
"""Without a date range the figures cover the last seven UTC days (today included)."""
MONITORING_DAYS = 90
"""Without a date range the monitoring page covers the last 90 UTC days."""

DayParam = Annotated[str | None, Query(max_length=32,
                                       description="UTC day, inclusive (YYYY-MM-DD)")]
"""A day as text: the filter forms send an empty field for "any day"."""
ApiDayParam = Annotated[date | None, Query(description="UTC day, inclusive (YYYY-MM-DD)")]
"""A day for the JSON API: typed, so a malformed one is FastAPI's own 422 and the schema says
``format: date``."""


def _day(value: str | None) -> date | None:
    """Empty means no bound; a malformed day on a page is ignored (the API types its days)."""
    if not value or not value.strip():
        return None
    try:
        return date.fromisoformat(value.strip())
    except ValueError:
        return None


TextParam = Annotated[str | None, Query(max_length=64)]


def _filters(date_from_text: str | None, date_to_text: str | None, calling_ae: str | None,
             priority: str | None, model_version: str | None, *, today: date) -> Filters:
    date_from = _day(date_from_text)
    date_to = _day(date_to_text)
    if date_from is None and date_to is None:
        date_from = today - timedelta(days=DEFAULT_DAYS - 1)
    return Filters(date_from=date_from, date_to=date_to,
                   calling_ae=(calling_ae or "").strip() or None,
                   priority=(priority or "").strip().upper() or None,
                   model_version=(model_version or "").strip() or None)


def _summary(session: Session, settings: Settings, filters: Filters, actor: Actor,
             ip: str | None, event: str) -> tuple[Summary, dict[str, list[str]]]:
    rows = load_study_times(session, filters)
    summary = summarize(rows, target_s=settings.turnaround_target_s, now=utcnow(),
                        filters=filters)
    record(session, event, actor=actor.username, source_ip=ip,
           details={"via": actor.via, "studies": summary.counts["studies"],
                    "filters": _filter_dict(filters)})
    session.commit()
    return summary, filter_choices(rows)


def _filter_dict(filters: Filters) -> dict[str, str | None]:
    return {"date_from": filters.date_from.isoformat() if filters.date_from else None,
            "date_to": filters.date_to.isoformat() if filters.date_to else None,
            "calling_ae": filters.calling_ae, "priority": filters.priority,
            "model_version": filters.model_version}


def _figures(stats: Stats) -> StageFigures:
    return StageFigures(count=stats.count, p50_s=stats.p50_s, p90_s=stats.p90_s,
                        p99_s=stats.p99_s)


@router.get("/api/turnaround", response_model=TurnaroundReport, responses=AUTH_RESPONSES)
async def turnaround_api(request: Request, session: SessionDep, settings: SettingsDep,
                         actor: AdminUser, date_from: ApiDayParam = None,
                         date_to: ApiDayParam = None, calling_ae: TextParam = None,
                         priority: TextParam = None,
                         model_version: TextParam = None) -> TurnaroundReport:
    """Acquisition -> flag percentiles per stage and end to end (admin only). Without a date
    range: the last seven UTC days."""
    filters = _filters(date_from.isoformat() if date_from else None,
                       date_to.isoformat() if date_to else None, calling_ae, priority,
                       model_version, today=utcnow().date())
    summary, _choices = await run_in_threadpool(_summary, session, settings, filters, actor,
                                                client_ip(request), "turnaround.view")
    return TurnaroundReport(
        filters=_filter_dict(filters), target_s=summary.target_s,
        band_s=settings.turnaround_band_s,
        stages={key: _figures(stats) for key, stats in summary.stages.items()},
        end_to_end=_figures(summary.end_to_end), from_receipt=_figures(summary.from_receipt),
        counts=summary.counts, breaches=[breach_view(s) for s in summary.breaches])


@router.get("/admin/turnaround.csv", include_in_schema=False)
async def turnaround_csv(request: Request, session: SessionDep, settings: SettingsDep,
                         actor: AdminPage, date_from: DayParam = None, date_to: DayParam = None,
                         calling_ae: TextParam = None, priority: TextParam = None,
                         model_version: TextParam = None) -> Response:
    filters = _filters(date_from, date_to, calling_ae, priority, model_version,
                       today=utcnow().date())
    summary, _choices = await run_in_threadpool(_summary, session, settings, filters, actor,
                                                client_ip(request), "turnaround.export")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for study in summary.studies:
        writer.writerow(csv_row(study))
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition":
                             f'attachment; filename="turnaround-{stamp}.csv"',
                             "Cache-Control": "no-store"})


def _chart_points(summary: Summary) -> list[tuple[datetime, float, str]]:
    points = []
    for study in summary.studies:
        if study.end_to_end_s is not None and study.start is not None:
            points.append((study.start, study.end_to_end_s,
                           f"{study.times.study_instance_uid}: "
                           f"{charts.minutes_label(round(study.end_to_end_s))}"))
    return points


@router.get("/admin/turnaround", response_class=HTMLResponse, include_in_schema=False)
async def turnaround_page(request: Request, session: SessionDep, settings: SettingsDep,
                          codec: CodecDep, actor: AdminPage, date_from: DayParam = None,
                          date_to: DayParam = None, calling_ae: TextParam = None,
                          priority: TextParam = None,
                          model_version: TextParam = None) -> Response:
    filters = _filters(date_from, date_to, calling_ae, priority, model_version,
                       today=utcnow().date())
    summary, choices = await run_in_threadpool(_summary, session, settings, filters, actor,
                                               client_ip(request), "turnaround.view")
    band = settings.turnaround_band_s
    end_to_end = [s.end_to_end_s for s in summary.studies
                  if s.status.value == "flagged" and s.end_to_end_s is not None]
    query = request.url.query
    return _page(request, "admin_turnaround.html", actor, codec, summary=summary,
                 stages=STAGES, filters=_filter_dict(filters), choices=choices, band_s=band,
                 histogram=charts.histogram(end_to_end, band_s=band,
                                            target_s=summary.target_s),
                 series=charts.time_series(_chart_points(summary), band_s=band,
                                           target_s=summary.target_s),
                 csv_url="/admin/turnaround.csv" + (f"?{query}" if query else ""))


def _monitoring(session: Session, actor: Actor, ip: str | None, date_from: date | None,
                date_to: date | None, period: monitoring.Period) -> monitoring.Monitoring:
    outcomes, verdicts = monitoring.load(session, date_from, date_to)
    result = monitoring.summarize(outcomes, verdicts, period)
    record(session, "monitoring.view", actor=actor.username, source_ip=ip,
           details={"via": actor.via, "answers": len(outcomes)})
    session.commit()
    return result


@router.get("/admin/monitoring", response_class=HTMLResponse, include_in_schema=False)
async def monitoring_page(request: Request, session: SessionDep, codec: CodecDep,
                          actor: AdminPage, date_from: DayParam = None,
                          date_to: DayParam = None,
                          period: monitoring.Period = monitoring.Period.DAY) -> Response:
    first, last = _day(date_from), _day(date_to)
    if first is None and last is None:
        first = utcnow().date() - timedelta(days=MONITORING_DAYS - 1)
    result = await run_in_threadpool(_monitoring, session, actor, client_ip(request),
                                     first, last, period)
    filters: dict[str, Any] = {"date_from": first.isoformat() if first else "",
                               "date_to": last.isoformat() if last else "",
                               "period": period.value}
    return _page(request, "admin_monitoring.html", actor, codec, report=result,
                 filters=filters, periods=list(monitoring.Period),
                 before_model=monitoring.BEFORE_MODEL)
