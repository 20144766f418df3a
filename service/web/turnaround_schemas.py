"""Response schemas of ``GET /api/turnaround`` (the API never returns a row)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from service.web.turnaround import StudyTurnaround


class StageFigures(BaseModel):
    count: int
    """Studies in which this stage was measured."""
    p50_s: float | None
    p90_s: float | None
    p99_s: float | None


class BreachView(BaseModel):
    study_instance_uid: str
    status: str
    """``flagged``, or ``in_flight`` for a study already over the target."""
    judged_s: float | None
    """Acquisition -> flag (from receipt when the acquisition time is unknown; time elapsed
    so far for a study in flight)."""
    acquisition: str
    """``header``, ``study_start`` (Study Date + Time fallback), ``missing`` or
    ``acquisition_after_receipt``."""
    slowest_stage: str | None
    """The stage that took longest (in flight: the stage it is waiting in)."""
    slowest_s: float | None
    stages: dict[str, float | None]


class TurnaroundReport(BaseModel):
    filters: dict[str, str | None]
    target_s: float
    band_s: tuple[float, float]
    stages: dict[str, StageFigures]
    """received, complete, queued, analyzed, flagged (the path to the flag), then stored and
    sent (SR and SEG, after the flag)."""
    end_to_end: StageFigures
    """Acquisition -> flag, over flagged studies with a usable acquisition time."""
    from_receipt: StageFigures
    """First image received -> flag, over every flagged study."""
    counts: dict[str, int] = Field(default_factory=dict)
    """studies, flagged, in_flight, not_flagged, missing_acquisition, ..., breaches."""
    breaches: list[BreachView] = Field(default_factory=list)


def breach_view(study: StudyTurnaround) -> BreachView:
    slowest = study.slowest_stage
    return BreachView(study_instance_uid=study.times.study_instance_uid,
                      status=study.status.value, judged_s=study.judged_s,
                      acquisition=study.acquisition.value, slowest_stage=slowest,
                      slowest_s=study.stages.get(slowest) if slowest else None,
                      stages=dict(study.stages))
