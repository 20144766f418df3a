"""Response fields shared by the JSON API (``routes/studies.py``) and the study pages
(``study_view.py``): one mapping from a series row, one reading of the stored plausibility
report. Below both, so the page code does not import a route module (which imported it back).
"""

from __future__ import annotations

from typing import Any

from service.db.tables import Analysis, Series
from service.findings import VERTEBRAE
from service.web.schemas import LevelResult, PlausibilityFailure


def series_fields(series: Series, selected_id: int | None) -> dict[str, Any]:
    """The ``SeriesSummary`` fields of ``series``; ``selected``: the one analysed."""
    return {
        "series_instance_uid": series.series_instance_uid,
        "series_number": series.series_number,
        "modality": series.modality,
        "series_description": series.series_description,
        "state": series.state,
        "state_reason": series.state_reason,
        "qualified": series.qualified,
        "qualification_reason": series.qualification_reason,
        "instance_count": series.instance_count,
        "expected_instances": series.expected_instances,
        "completion_reason": series.completion_reason,
        "reopened_count": series.reopened_count,
        "selected": selected_id is not None and series.id == selected_id,
        "acquired_at": series.acquired_at,
        "first_received_at": series.first_received_at,
        "last_received_at": series.last_received_at,
        "completed_at": series.completed_at,
    }


def failed_rules(analysis: Analysis) -> list[PlausibilityFailure]:
    """The plausibility rules that failed, as stored with the analysis."""
    report = analysis.plausibility or {}
    return [PlausibilityFailure(**f) for f in report.get("failures", [])
            if isinstance(f, dict)]


def level_results(analysis: Analysis) -> list[LevelResult]:
    """Every level C1..C7 in anatomical order, for the API and the page alike: a level the
    analysis stored no finding for is shown out of view rather than left out, so a reader
    never mistakes a missing row for a cleared one."""
    by_level = {f.vertebra: f for f in analysis.findings}
    out = []
    for vertebra in VERTEBRAE:
        f = by_level.get(vertebra)
        if f is None:
            out.append(LevelResult(vertebra=vertebra, in_view=False, probability=None,
                                   suspected=False, plausible=None))
        else:
            out.append(LevelResult(vertebra=f.vertebra, in_view=f.in_view,
                                   probability=f.probability, suspected=f.suspected,
                                   plausible=f.plausible,
                                   reasons=[str(r) for r in f.plausibility_reasons or []]))
    return out
