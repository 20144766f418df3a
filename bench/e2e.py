"""Turnaround end to end: last instance sent by the PACS -> SR stored back in the PACS.

A real Orthanc holds a synthetic cervical-spine CT study and routes it to ``triage scp`` by
C-STORE (its REST ``/modalities/TRIAGE/store``, synchronous: the call returns when the last
instance was acknowledged); ``triage worker`` analyses it with the shipped ONNX model on the
CPU and sends SR and SEG back to the same Orthanc. The clock stops when Orthanc lists the SR
in the study (polled every 0.1 s). Each run uses a new study; the median of ``--runs`` is
printed with the per-stage split read from the database, and the ratio against the
commercial reference of the literature (3-8 minutes from acquisition to result, lower bound
180 s used). Synthetic data: a speed figure, not a clinical one.

    .venv/bin/python -m bench.e2e [--runs 5] [--matrix 512] [--idle-after-release 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

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
    for instance in orthanc.request("GET", f"/studies/{study_id}/instances"):
        tags = orthanc.request("GET", f"/instances/{instance['ID']}/simplified-tags")
        if tags.get("Modality") == "SR":
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--idle-after-release", type=float, default=5.0,
                        help="TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S (default: the shipped 5 s)")
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

    redis.Redis.from_url(REDIS_URL).flushdb()
    scp_port = free_port()
    settings = Settings(data_dir=work / "var", database_url=db_url, broker_url=REDIS_URL,
                        model_dir=SHIPPED_MODEL, dicom_port=scp_port)
    cases = []
    for run in range(args.runs):
        options = PhantomOptions(seed=9100 + run, matrix=args.matrix,
                                 pixel_spacing=0.4 * 512 / args.matrix, n_slices=300,
                                 fractures=1 if run % 2 == 0 else 0)
        cases.append(write_series(generate_phantom(options), work / f"case{run}"))
    totals: list[float] = []
    splits: list[dict[str, float]] = []
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
                wait_until(lambda s=study_id: _sr_present(pacs, s), 600, 0.1, "the SR")
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
                    marks = {
                        "completion wait": (series.completed_at - series.last_received_at),
                        "to queue": (analysis.queued_at - series.completed_at),
                        "queue wait": (analysis.started_at - analysis.queued_at),
                        "load+infer": (analysis.inferred_at - analysis.started_at),
                        "SR/SEG build": (analysis.results_stored_at - analysis.inferred_at),
                        # Both instants from the last instance received (issue 22): the
                        # worklist flag is raised before the SR and SEG are built.
                        "last received -> flag": (analysis.flagged_at
                                                  - series.last_received_at),
                        "last received -> results stored": (analysis.results_stored_at
                                                            - series.last_received_at),
                    }
                    split = {k: v.total_seconds() for k, v in marks.items()}
                    split["stages"] = analysis.stage_durations or {}  # type: ignore[assignment]
                    split["provider"] = analysis.execution_provider  # type: ignore[assignment]
                splits.append(split)
                print(f"run {run + 1}: {total:6.1f} s  {json.dumps(split)}", flush=True)
        finally:
            worker.stop()
            scp.stop()
            engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    for key in ("last received -> flag", "last received -> results stored"):
        values = sorted(float(split[key]) for split in splits)
        p90 = values[min(len(values) - 1, round(0.9 * (len(values) - 1)))]
        print(f"{key}: median {statistics.median(values):.1f} s, p90 {p90:.1f} s")
    median = statistics.median(totals)
    print(f"\nlast instance sent -> SR in Orthanc, median of {len(totals)}: {median:.1f} s "
          f"(min {min(totals):.1f}, max {max(totals):.1f}); series {args.matrix}x{args.matrix}"
          f"x300, completion idle after release {args.idle_after_release} s")
    print(f"ratio vs the commercial reference lower bound ({COMMERCIAL_REFERENCE_S:.0f} s): "
          f"{median / COMMERCIAL_REFERENCE_S:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
