"""The three answers of a finished analysis: one vocabulary for inference, database and web.

A bottom-layer module (no imports from the rest of the service) so that the database tables,
the inference contract (``service.findings``), the results and the web app name the
answer the same way without importing each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class AnalysisResult(StrEnum):
    """The answer of a DONE analysis: three answers, shown apart everywhere."""

    FRACTURE_SUSPECTED = "FRACTURE_SUSPECTED"
    """A vertebra that passed the anatomical gate, in an in-order column, is above threshold."""
    NO_FRACTURE_FOUND = "NO_FRACTURE_FOUND"
    """Every level in view passed the gate and none is above threshold."""
    INCONCLUSIVE = "INCONCLUSIVE"
    """The model ran but the anatomy it found fails the plausibility rules
    (``service.inference.plausibility``): the study is neither flagged nor cleared."""


def failure_codes(plausibility: Mapping[str, Any] | None) -> list[str]:
    """``CODE`` or ``CODE:LEVEL`` of each failed rule in a gate report, distinct, in order.

    ``plausibility`` is ``AnatomyReport.as_dict()`` as the findings carry it and the
    ``analysis.plausibility`` column stores it.
    """
    out: list[str] = []
    failures = (plausibility or {}).get("failures") or []
    for failure in failures if isinstance(failures, list) else []:
        code = (f"{failure['code']}:{failure['level']}" if failure.get("level")
                else str(failure.get("code")))
        if code not in out:
            out.append(code)
    return out
