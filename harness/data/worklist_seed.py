"""Worklist rows written straight into the database (no model run): the dashboard tests'
fixtures (unit and browser tests). Each study has its series, an instance (for the sending
AE), and, once analysed, an analysis with C1..C7 findings, stage timestamps and exports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy.orm import Session

from service.config import Settings
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
from service.findings import VERTEBRAE


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


def add_imaged_study(session: Session, settings: Settings, *, seed: int = 3,
                     received_ago: timedelta = timedelta(minutes=2, seconds=40),
                     calling_ae: str = "CT_SCANNER_1") -> Study:
    """A synthetic phantom written to the spool as a real CT series, with a SEG of its
    ground-truth vertebrae in the result store and an analysis whose suspected levels are the
    phantom's fractured ones: what the study page needs to draw key images, without running
    the model. Seed 3 at this size has a C4 fracture."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    from service.imaging.volume import load_series
    from service.inference.findings import Findings, VertebraFinding
    from service.results.common import AlgorithmInfo
    from service.results.seg import build_segmentation
    from service.results.store import ResultStore
    from service.results.uids import ObjectKind
    from service.synthetic import PhantomOptions, WriterOptions, generate_phantom, write_series

    phantom = generate_phantom(PhantomOptions(seed=seed, matrix=192, pixel_spacing=0.9,
                                              n_slices=160, slice_spacing=1.25, fractures=1))
    spool = settings.spool_path
    paths = write_series(phantom, spool / f"phantom-{seed}", WriterOptions(
        uid_prefix=settings.uid_root))
    volume = load_series(paths, settings)
    labels = np.where(phantom.labels <= len(VERTEBRAE), phantom.labels, 0).astype(np.uint8)
    if labels.shape != volume.shape:
        raise AssertionError(f"labels {labels.shape} vs volume {volume.shape}")
    vertebrae = []
    for number, name in enumerate(VERTEBRAE, start=1):
        where = np.argwhere(labels == number)
        if len(where) == 0:
            vertebrae.append(VertebraFinding(vertebra=name, in_view=False, probability=None,
                                             suspected=False))
            continue
        (z0, y0, x0), (z1, y1, x1) = where.min(axis=0), where.max(axis=0) + 1
        fractured = bool(phantom.vertebra_fractured.get(name))
        probability = 0.88 if fractured else 0.04
        vertebrae.append(VertebraFinding(
            vertebra=name, in_view=True, probability=probability, suspected=fractured,
            slice_range=(int(z0), int(z1) - 1),
            bbox=(int(z0), int(y0), int(x0), int(z1), int(y1), int(x1)),
            key_slices=(int((z0 + z1) // 2),), plausible=True))
    findings = Findings(series_instance_uid=volume.series_instance_uid,
                        model_name="cspine-v1", model_version="1.5.0", vertebrae=vertebrae,
                        patient_probability=max(v.probability or 0 for v in vertebrae),
                        patient_suspected=any(v.suspected for v in vertebrae),
                        vertebra_threshold=0.5, patient_threshold=0.5, label_map=labels)
    seg = build_segmentation(volume, findings, uid_root=settings.uid_root,
                             algorithm=AlgorithmInfo(name="cspine-v1", version="1.5.0",
                                                     manufacturer="cspine-triage"),
                             transfer_syntax_uid=ExplicitVRLittleEndian)
    assert seg is not None
    ResultStore.from_settings(settings).write(seg.dataset, kind=ObjectKind.SEG,
                                              source_series_uid=volume.series_instance_uid,
                                              model_version="1.5.0")
    header = pydicom.dcmread(paths[0], stop_before_pixels=True)
    t0 = utcnow() - received_ago
    suspected = any(v.suspected for v in vertebrae)
    study = Study(study_instance_uid=volume.study_instance_uid,
                  patient_name=str(header.PatientName), patient_id=str(header.PatientID),
                  accession_number=str(header.get("AccessionNumber", "")) or None,
                  study_date=str(header.get("StudyDate", "")) or None,
                  study_description=str(header.get("StudyDescription", "")) or None,
                  patient_sex=str(header.get("PatientSex", "")) or None,
                  priority=Priority.STAT if suspected else Priority.ROUTINE,
                  priority_reason="fracture suspected (phantom ground truth)" if suspected
                  else "no fracture found", flagged_at=t0 + timedelta(seconds=21))
    series = Series(study=study, series_instance_uid=volume.series_instance_uid,
                    modality="CT", series_number=int(header.get("SeriesNumber", 3)),
                    series_description=str(header.get("SeriesDescription", "")) or None,
                    state=SeriesState.DONE, instance_count=len(paths),
                    acquired_at=t0 - timedelta(seconds=20), first_received_at=t0,
                    last_received_at=t0 + timedelta(seconds=3),
                    completed_at=t0 + timedelta(seconds=8), qualified=True)
    session.add_all([study, series])
    session.flush()
    study.selected_series_id = series.id
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        session.add(Instance(series_id=series.id, sop_instance_uid=str(ds.SOPInstanceUID),
                             sop_class_uid=str(ds.SOPClassUID),
                             spool_path=str(path.relative_to(spool)),
                             size_bytes=path.stat().st_size, sha256="0" * 64,
                             calling_ae=calling_ae, received_at=t0))
    analysis = Analysis(series_id=series.id, model_version="1.5.0", input_fingerprint="e" * 64,
                        state=AnalysisState.DONE,
                        result=(AnalysisResult.FRACTURE_SUSPECTED if suspected
                                else AnalysisResult.NO_FRACTURE_FOUND),
                        suspected=suspected, patient_probability=findings.patient_probability,
                        plausibility={"failures": []}, attempts=1,
                        queued_at=t0 + timedelta(seconds=9), started_at=t0 + timedelta(seconds=9),
                        inferred_at=t0 + timedelta(seconds=16),
                        results_stored_at=t0 + timedelta(seconds=17),
                        flagged_at=t0 + timedelta(seconds=21),
                        finished_at=t0 + timedelta(seconds=21))
    session.add(analysis)
    session.flush()
    for v in vertebrae:
        session.add(Finding(analysis_id=analysis.id, vertebra=v.vertebra, in_view=v.in_view,
                            probability=v.probability, suspected=v.suspected,
                            plausible=v.plausible if v.in_view else None,
                            plausibility_reasons=[], slice_start=v.slice_range[0]
                            if v.slice_range else None,
                            slice_end=v.slice_range[1] if v.slice_range else None,
                            bbox=list(v.bbox) if v.bbox else None,
                            key_slices=list(v.key_slices)))
    session.commit()
    return study
