"""Worklist priority from the findings, by a configurable policy.

Default policy: STAT when the analysis's answer is "fracture suspected" (only ever on a
vertebra the anatomical gate vouched for), INCONCLUSIVE when the model ran but the anatomy it
found failed the gate (not flagged, and not cleared either: the reason names the failed
rules), ROUTINE when no fracture was found, NOT_ANALYZED (with the reason) when the series
could not be analysed. Optionally, a study with no fracture found whose patient-level
probability reaches ``priority_urgent_probability`` goes URGENT.

Every change of a study's priority is timestamped (``Study.flagged_at``; the analysis that
caused it gets ``Analysis.flagged_at``, which the turnaround figures read) and audited as
``worklist.priority`` with the old and new value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session

from service.audit.trail import record
from service.config import Settings
from service.db.tables import Analysis, AnalysisResult, Priority, Study
from service.db.types import utcnow
from service.findings import Findings

logger = logging.getLogger(__name__)

PRIORITY_ORDER: tuple[Priority, ...] = tuple(Priority)
"""Reading order: the declaration order of :class:`Priority` (STAT first)."""

_REASON_MAX = 256


@dataclass(frozen=True)
class PriorityDecision:
    priority: Priority
    reason: str


@dataclass(frozen=True)
class PriorityPolicy:
    suspected: Priority = Priority.STAT
    negative: Priority = Priority.ROUTINE
    urgent_probability: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> PriorityPolicy:
        """Raises ValueError when a configured priority is not a :class:`Priority` name."""
        return cls(
            suspected=Priority(settings.priority_when_suspected.upper()),
            negative=Priority(settings.priority_when_negative.upper()),
            urgent_probability=settings.priority_urgent_probability,
        )

    def decide(self, findings: Findings) -> PriorityDecision:
        suspected = findings.suspected_vertebrae
        probability = findings.patient_probability
        if findings.result is AnalysisResult.INCONCLUSIVE:
            reasons = ", ".join(findings.inconclusive_reasons) or "no vertebra in view"
            return PriorityDecision(
                Priority.INCONCLUSIVE,
                f"inconclusive, not cleared: anatomy not plausible ({reasons})")
        if (findings.result is AnalysisResult.FRACTURE_SUSPECTED or suspected
                or findings.patient_suspected):
            # ``suspected`` is only ever set on a vertebra the gate vouched for.
            where = ", ".join(suspected) if suspected else "patient level"
            return PriorityDecision(
                self.suspected, f"fracture suspected: {where} (p={probability:.2f})")
        if self.urgent_probability is not None and probability >= self.urgent_probability:
            return PriorityDecision(
                Priority.URGENT,
                f"no vertebra above threshold, patient p={probability:.2f} "
                f">= {self.urgent_probability:.2f}")
        if not findings.in_view:
            return PriorityDecision(Priority.NOT_ANALYZED, "no cervical vertebra in view")
        return PriorityDecision(self.negative, f"no fracture suspected (p={probability:.2f})")

    @staticmethod
    def not_analyzed(reason: str) -> PriorityDecision:
        return PriorityDecision(Priority.NOT_ANALYZED, f"not analyzed: {reason}")


def apply_priority(session: Session, study: Study, decision: PriorityDecision, *,
                   analysis: Analysis | None = None, now: datetime | None = None,
                   actor: str | None = None) -> bool:
    """Set the study's priority in the caller's transaction; True when it changed.

    ``Analysis.flagged_at`` is set the first time the analysis is flagged even when the
    priority stays the same (a re-run that confirms a flag still completes its turnaround).
    """
    now = now or utcnow()
    reason = decision.reason[:_REASON_MAX]
    if analysis is not None and analysis.flagged_at is None:
        analysis.flagged_at = now
    if study.priority == decision.priority and study.priority_reason == reason:
        return False
    previous = study.priority
    study.priority = decision.priority
    study.priority_reason = reason
    study.flagged_at = now
    record(
        session, "worklist.priority", actor=actor,
        study_instance_uid=study.study_instance_uid,
        details={"from": previous.value if previous is not None else None,
                 "to": decision.priority.value, "reason": reason,
                 "analysis_id": analysis.id if analysis is not None else None},
        occurred_at=now,
    )
    session.flush()
    logger.info("study %d: priority %s -> %s", study.id,
                previous.value if previous is not None else None, decision.priority.value)
    return True
