"""Worklist rows written straight into the database (no model run): the dashboard tests'
fixtures. Each study has its series, an instance (for the sending AE), and, once analysed,
an analysis with C1..C7 findings, stage timestamps and exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from service.db.tables import (
    Analysis,
    AnalysisResult,
    AnalysisState,
    Export,
    ExportState,
    Finding,
    Instance,
    Priority,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


@dataclass(frozen=True)
class SeedStudy:
    uid: str
    patient_name: str
    priority: Priority
    result: AnalysisResult | None
    suspected: dict[str, float]
    """Suspected levels and their probabilities."""
    implausible: tuple[str, ...] = ()
    received_ago: timedelta = timedelta(minutes=5)
    """When the first image came, before now (so waiting times look like a real morning)."""
    calling_ae: str = "CT_SCANNER_1"


FRACTURED = SeedStudy("1.2.826.0.1.3680043.10.1455.900.1", "DOE^JANE", Priority.STAT,
                      AnalysisResult.FRACTURE_SUSPECTED, {"C2": 0.93, "C5": 0.71},
                      received_ago=timedelta(minutes=4, seconds=10))
NORMAL = SeedStudy("1.2.826.0.1.3680043.10.1455.900.2", "ROE^RICHARD", Priority.ROUTINE,
                   AnalysisResult.NO_FRACTURE_FOUND, {},
                   received_ago=timedelta(minutes=19, seconds=30), calling_ae="CT_SCANNER_2")
INCONCLUSIVE = SeedStudy("1.2.826.0.1.3680043.10.1455.900.3", "POE^EDGAR", Priority.INCONCLUSIVE,
                         AnalysisResult.INCONCLUSIVE, {}, implausible=("C6", "C7"),
                         received_ago=timedelta(minutes=11, seconds=45))
WAITING = SeedStudy("1.2.826.0.1.3680043.10.1455.900.4", "LOE^LISA", Priority.PENDING, None, {},
                    received_ago=timedelta(minutes=1, seconds=5))
ALL = (FRACTURED, NORMAL, INCONCLUSIVE, WAITING)


def add_study(session: Session, spec: SeedStudy, *, now: datetime | None = None) -> Study:
    t0 = (now or utcnow()) - spec.received_ago
    study = Study(study_instance_uid=spec.uid, patient_name=spec.patient_name,
                  patient_id=f"PID{spec.uid[-1]}", accession_number=f"ACC{spec.uid[-1]}",
                  patient_birth_date="19700101", patient_sex="F", study_date="20261203",
                  study_description="CT CERVICAL SPINE", priority=spec.priority,
                  priority_reason=f"{spec.priority.value} (test)",
                  flagged_at=t0 + timedelta(seconds=40) if spec.result else None)
    done = spec.result is not None
    series = Series(study=study, series_instance_uid=spec.uid + ".1", modality="CT",
                    series_number=2, series_description="BONE 1.0",
                    state=SeriesState.DONE if done else SeriesState.RECEIVING,
                    instance_count=300, acquired_at=t0 - timedelta(seconds=30),
                    first_received_at=t0, last_received_at=t0 + timedelta(seconds=5),
                    completed_at=t0 + timedelta(seconds=10) if done else None, qualified=done)
    session.add_all([study, series])
    session.flush()
    study.selected_series_id = series.id
    session.add(Instance(series_id=series.id, sop_instance_uid=spec.uid + ".1.1",
                         sop_class_uid="1.2.840.10008.5.1.4.1.1.2", spool_path="x/1.dcm",
                         size_bytes=1, sha256="0" * 64, calling_ae=spec.calling_ae,
                         received_at=t0))
    if not done:
        session.commit()
        return study
    failures = [{"code": "LEVEL_EXTENT_OUT_OF_RANGE", "level": v, "measured": 41.0,
                 "allowed": [8.0, 30.0], "unit": "mm", "detail": "taller than a vertebra"}
                for v in spec.implausible]
    analysis = Analysis(series_id=series.id, model_version="1.5.0", input_fingerprint="f" * 64,
                        state=AnalysisState.DONE, result=spec.result,
                        suspected=bool(spec.suspected),
                        patient_probability=max(spec.suspected.values(), default=0.04),
                        plausibility={"failures": failures}, attempts=1,
                        execution_provider="CPUExecutionProvider",
                        stage_durations={"load": 1.2, "segmentation": 6.1,
                                         "classification": 2.3},
                        queued_at=t0 + timedelta(seconds=11), started_at=t0 + timedelta(seconds=12),
                        inferred_at=t0 + timedelta(seconds=25),
                        results_stored_at=t0 + timedelta(seconds=27),
                        exported_at=t0 + timedelta(seconds=35),
                        flagged_at=t0 + timedelta(seconds=40),
                        finished_at=t0 + timedelta(seconds=40))
    session.add(analysis)
    session.flush()
    for vertebra in VERTEBRAE:
        session.add(Finding(analysis_id=analysis.id, vertebra=vertebra, in_view=True,
                            probability=spec.suspected.get(vertebra, 0.03),
                            suspected=vertebra in spec.suspected,
                            plausible=vertebra not in spec.implausible,
                            plausibility_reasons=(["LEVEL_EXTENT_OUT_OF_RANGE"]
                                                  if vertebra in spec.implausible else [])))
    for kind in ("SR", "SEG"):
        session.add(Export(analysis_id=analysis.id, object_kind=kind,
                           sop_instance_uid=f"{spec.uid}.9.{len(kind)}", destination="PACS",
                           state=ExportState.SENT, attempts=1,
                           sent_at=t0 + timedelta(seconds=35)))
    session.commit()
    return study


def seed(session: Session, specs: tuple[SeedStudy, ...] = ALL) -> None:
    for spec in specs:
        add_study(session, spec)
