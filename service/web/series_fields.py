"""Response fields shared by the JSON API (``routes/studies.py``) and the study pages
(``study_view.py``): one mapping from a series row, one reading of the stored plausibility
report. Below both, so the page code does not import a route module (which imported it back).
"""

from __future__ import annotations

from typing import Any

from service.db.tables import Analysis, Series
from service.web.schemas import PlausibilityFailure


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
