"""Turnaround end to end: last instance sent by the PACS -> worklist flag, -> SR in the PACS.

A real Orthanc holds a synthetic cervical-spine CT study and routes it to ``triage scp`` by
C-STORE (its REST ``/modalities/TRIAGE/store``, synchronous: the call returns when the last
instance was acknowledged); ``triage worker`` analyses it with the shipped ONNX model on the
CPU and sends SR and SEG back to the same Orthanc. Two instants per run, both from the last
instance (issue 22): the worklist flag (``analysis.flagged_at - series.last_received_at``,
one clock: the database's) and the SR listed by Orthanc (wall clock from the synchronous
store's return, polled every 0.1 s). p50 and p90 of ``--runs`` are printed, with each stage's
share of the SR time, and the ratio against the commercial reference of the literature (3-8
minutes from acquisition to result, lower bound 180 s used).

``--images-in-acquisition`` writes Images in Acquisition (0020,1002) into the series, as many
scanners do, so completion comes from the count (``expected_count``) instead of the release
timer; the default sends what the synthetic writer writes (no hint). The broker is a Redis
database of its own (``--redis-db``), flushed at start. Synthetic data: a speed figure, not a
clinical one; on a shared machine the seconds move with the load, so compare runs made
together.

    .venv/bin/python -m bench.e2e [--runs 5] [--matrix 512] [--idle-after-release 5]
                                  [--images-in-acquisition]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select, text

from harness.peers.dicom import ScpProcess
from harness.peers.orthanc import Orthanc
from harness.process import free_port, wait_until
from harness.services import POSTGRES_ADMIN_URL, REDIS_URL
from harness.worker import SHIPPED_MODEL, WorkerProcess, worker_env
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Analysis, Series
from service.synthetic import PhantomOptions, generate_phantom, write_series

COMMERCIAL_REFERENCE_S = 180.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def _sr_present(orthanc: Orthanc, study_id: str) -> bool:
    """One request per poll (the study's series and their Modality), so polling does not
    load the machine it measures."""
    return any(series.get("MainDicomTags", {}).get("Modality") == "SR"
               for series in orthanc.request("GET", f"/studies/{study_id}/series"))


STAGES = ("completion wait", "to queue", "queue wait", "load+infer", "flag",
          "SR/SEG build", "export")
"""Consecutive stages from the last instance received to the SR listed by the PACS."""


def _add_images_in_acquisition(files: list[Path]) -> None:
    """Rewrite the series with Images in Acquisition = its instance count (what scanners
    that set it write)."""
    from pydicom import dcmread

    for path in files:
        ds = dcmread(path)
        ds.ImagesInAcquisition = len(files)
        ds.save_as(path)


def _split(series: Series, analysis: Analysis, total: float) -> dict[str, Any]:
    """One run's stages (seconds, database clock) and its two instants from the last
    instance; the export is what is left of the wall-clock SR time."""
    assert series.completed_at and series.last_received_at and analysis.queued_at
    assert analysis.started_at and analysis.inferred_at and analysis.flagged_at
    assert analysis.results_stored_at
    last = series.last_received_at
    split: dict[str, Any] = {
        "completion reason": series.completion_reason,
        "completion wait": (series.completed_at - last).total_seconds(),
        "to queue": (analysis.queued_at - series.completed_at).total_seconds(),
        "queue wait": (analysis.started_at - analysis.queued_at).total_seconds(),
        "load+infer": (analysis.inferred_at - analysis.started_at).total_seconds(),
        "flag": (analysis.flagged_at - analysis.inferred_at).total_seconds(),
        "SR/SEG build": (analysis.results_stored_at - analysis.flagged_at).total_seconds(),
        "last instance -> flag": (analysis.flagged_at - last).total_seconds(),
        "last instance -> results stored": (analysis.results_stored_at - last).total_seconds(),
        "last instance -> SR in PACS": total,
    }
    split["export"] = max(0.0, total - float(split["last instance -> results stored"]))
    split["stages"] = analysis.stage_durations or {}
    split["provider"] = analysis.execution_provider
    return split


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (p50 of an even count: the upper middle)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--idle-after-release", type=float, default=5.0,
                        help="TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S (default: the shipped 5 s)")
    parser.add_argument("--images-in-acquisition", action="store_true",
                        help="write Images in Acquisition (the slice count) into the series")
    parser.add_argument("--redis-db", type=int, default=13,
                        help="Redis database for the broker (flushed; not the shared 0)")
    args = parser.parse_args(argv)
    if not (SHIPPED_MODEL / "manifest.json").is_file():
        print(f"no model at {SHIPPED_MODEL}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cspine-e2e-"))
    db_name = f"triage_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"
    migrate.upgrade(db_url)
    import redis

    broker_url = REDIS_URL.rsplit("/", 1)[0] + f"/{args.redis_db}"
    redis.Redis.from_url(broker_url).flushdb()
    scp_port = free_port()
    settings = Settings(data_dir=work / "var", database_url=db_url, broker_url=broker_url,
                        model_dir=SHIPPED_MODEL, dicom_port=scp_port)
    cases = []
    for run in range(args.runs):
        options = PhantomOptions(seed=9100 + run, matrix=args.matrix,
                                 pixel_spacing=0.4 * 512 / args.matrix, n_slices=300,
                                 fractures=1 if run % 2 == 0 else 0)
        files = write_series(generate_phantom(options), work / f"case{run}")
        if args.images_in_acquisition:
            _add_images_in_acquisition(files)
        cases.append(files)
    totals: list[float] = []
    splits: list[dict[str, Any]] = []
    with Orthanc(work / "orthanc", {"TRIAGE": ["CSPINE_TRIAGE", "127.0.0.1", scp_port]}) as pacs:
        env = worker_env(settings, TRIAGE_DICOM_PORT=str(scp_port),
                         TRIAGE_DICOM_HOST="127.0.0.1",
                         TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S=str(args.idle_after_release),
                         TRIAGE_PACS_DESTINATIONS=json.dumps(
                             [{"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": pacs.dicom_port}]))
        scp = ScpProcess(env, work, work / "scp.log").start()
        worker = WorkerProcess(env, work / "worker.log").start()
        engine = make_engine(db_url)
        factory = make_session_factory(engine)
        try:
            for run, files in enumerate(cases):
                study_id = ""
                for path in files:
                    study_id = pacs.request("POST", "/instances", path.read_bytes(),
                                            content_type="application/dicom")["ParentStudy"]
                pacs.request("POST", "/modalities/TRIAGE/store",
                             json.dumps({"Resources": [study_id], "Synchronous": True}).encode())
                sent = time.perf_counter()
                def sr_listed(study: str = study_id) -> bool:
                    return _sr_present(pacs, study)

                wait_until(sr_listed, 600, 0.1, "the SR")
                total = time.perf_counter() - sent
                totals.append(total)
                uid = pacs.request("GET", f"/studies/{study_id}")["MainDicomTags"][
                    "StudyInstanceUID"]
                with factory() as session:
                    series = session.execute(select(Series).where(
                        Series.study.has(study_instance_uid=uid))).scalars().one()
                    analysis = session.execute(select(Analysis).where(
                        Analysis.series_id == series.id).order_by(Analysis.id.desc())
                    ).scalars().first()
                    assert analysis is not None
                    split = _split(series, analysis, total)
                splits.append(split)
                print(f"run {run + 1}: {total:6.1f} s  {json.dumps(split)}", flush=True)
        finally:
            worker.stop()
            scp.stop()
            engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    print(f"\nseries {args.matrix}x{args.matrix}x300, {len(splits)} runs, completion: "
          + ("Images in Acquisition" if args.images_in_acquisition else
             f"no hint (release timer {args.idle_after_release} s)") + ", reasons "
          + ", ".join(sorted({str(s["completion reason"]) for s in splits})))
    for key in ("last instance -> flag", "last instance -> results stored",
                "last instance -> SR in PACS"):
        values = [float(split[key]) for split in splits]
        print(f"{key}: p50 {_percentile(values, 50):.1f} s, p90 {_percentile(values, 90):.1f} s")
    print("share of last instance -> SR in PACS (median of the runs' shares):")
    for stage in STAGES:
        shares = [float(split[stage]) / float(split["last instance -> SR in PACS"])
                  for split in splits]
        seconds = statistics.median(float(split[stage]) for split in splits)
        print(f"  {stage:16s} {100 * statistics.median(shares):5.1f} %  ({seconds:.2f} s)")
    median = _percentile([float(s["last instance -> SR in PACS"]) for s in splits], 50)
    print(f"ratio vs the commercial reference lower bound ({COMMERCIAL_REFERENCE_S:.0f} s): "
          f"{median / COMMERCIAL_REFERENCE_S:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
