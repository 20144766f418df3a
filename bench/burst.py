"""Trauma burst (issue 20): N studies x S slices over A concurrent associations into one
``triage scp`` and W ``triage worker`` processes, everything analysed and exported.

What a trauma bay sends after a multi-casualty event: many full cervical-spine CTs at once.
Each study goes over its own association (DCMTK ``storescu``, as a modality or PACS router
would), ``--associations`` of them at a time, into one SCP process with its tracker; two
workers (CPU, the shipped ONNX model) analyse; the SR and SEG go to a real Orthanc (the
PACS). The database is a fresh one on the shared PostgreSQL, the broker a private Redis.

Printed: ingest throughput (instances/s while the workers already analyse), end-to-end
throughput (studies/min from the first instance sent to the last SR stored in the PACS), and
per-study turnaround percentiles (p50/p90/p99) from the last instance received to the
worklist flag and to the SR in the PACS (the C-STORE the PACS acknowledged: ``export.sent_at``).
The named peer, measured in the same run with the same files and the same concurrency: DCMTK
``storescp --fork`` storing to disk and doing nothing else, for ingest throughput; and the
commercial reference of the literature (180 s, the lower bound of 3-8 minutes) for the
turnaround. Synthetic phantoms: a speed figure, not a clinical one. ``--distinct`` phantoms
are generated and the rest are copies with new UIDs (same anatomy, new studies).

    .venv/bin/python -m bench.burst [--studies 20] [--slices 300] [--matrix 512]
                                    [--associations 4] [--workers 2] [--distinct 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.faults import Case

COMMERCIAL_REFERENCE_S = 180.0


@dataclass
class Study:
    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def make_studies(out: Path, *, studies: int, slices: int, matrix: int,
                 distinct: int) -> list[Study]:
    """``distinct`` phantoms, then copies of them with new Study/Series/SOP UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from service.synthetic import PhantomOptions, generate_phantom, write_series

    spacing = max(0.625, 150.0 / slices)  # always skull base to T2, whatever the count
    originals: list[list[Path]] = []
    for index in range(min(distinct, studies)):
        options = PhantomOptions(seed=9500 + index, matrix=matrix,
                                 pixel_spacing=0.4 * 512 / matrix, n_slices=slices,
                                 slice_spacing=spacing, fractures=1 if index % 2 == 0 else 0,
                                 mimics=0)
        originals.append(write_series(generate_phantom(options), out / f"study-{index:03d}"))
    result = []
    for index in range(studies):
        source = originals[index % len(originals)]
        if index < len(originals):
            paths = source
        else:
            target = out / f"study-{index:03d}"
            target.mkdir(parents=True, exist_ok=True)
            study_uid, series_uid = generate_uid(), generate_uid()
            paths = []
            for path in source:
                ds = dcmread(path)
                ds.StudyInstanceUID = study_uid
                ds.SeriesInstanceUID = series_uid
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.PatientID = f"BURST{index:04d}"
                ds.AccessionNumber = f"B{index:06d}"
                paths.append(target / path.name)
                ds.save_as(paths[-1], enforce_file_format=True)
        head = dcmread(paths[0], stop_before_pixels=True)
        result.append(Study(str(head.StudyInstanceUID), str(head.SeriesInstanceUID), paths))
    return result


def send_burst(port: int, studies: list[Study], associations: int, called: str,
               storescu: str) -> tuple[float, float, dict[str, float]]:
    """Each study over its own storescu association, ``associations`` at a time. Returns
    (start, end) on time.time() and each study's end of sending."""
    env = {**os.environ, "TCP_NODELAY": "1"}
    ended: dict[str, float] = {}
    lock = threading.Lock()

    def one(study: Study) -> None:
        result = subprocess.run([storescu, "-aet", "BURST", "-aec", called, "127.0.0.1",
                                 str(port), *map(str, study.paths)], env=env,
                                capture_output=True, text=True, timeout=3600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed for {study.study_instance_uid}: "
                               f"{result.stderr[-1000:]}")
        with lock:
            ended[study.study_instance_uid] = time.time()

    start = time.time()
    with ThreadPoolExecutor(max_workers=associations) as pool:
        list(pool.map(one, studies))
    return start, time.time(), ended


def peer_storescp(work: Path, studies: list[Study], associations: int) -> float:
    """Instances/s of the same burst into DCMTK ``storescp --fork`` (disk only)."""
    from harness.dcmtk import dcmtk
    from harness.process import free_port
    from harness.process import stop as _stop
    from harness.process import wait_port as _wait_port

    storescp, storescu = dcmtk("storescp"), dcmtk("storescu")
    if storescp is None or storescu is None:
        raise RuntimeError("DCMTK storescp/storescu not found (Debian package dcmtk)")
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    log = (work / "storescp.log").open("wb")
    proc = subprocess.Popen([storescp, "--fork", "-aet", "STORESCP", "-od", str(out),
                             str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
        start, end, _ = send_burst(port, studies, associations, "STORESCP", storescu)
    finally:
        _stop(proc)
        log.close()
    stored = sum(1 for p in out.rglob("*") if p.is_file())
    total = sum(len(s.paths) for s in studies)
    if stored != total:
        raise RuntimeError(f"storescp stored {stored} of {total}")
    shutil.rmtree(out, ignore_errors=True)
    return total / (end - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--distinct", type=int, default=4,
                        help="phantoms generated; the other studies are copies with new UIDs")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed for everything to be analysed and exported")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, select, text

    from harness.dcmtk import dcmtk
    from harness.faults import Stack
    from harness.peers.servers import RedisServer
    from harness.process import wait_until
    from harness.services import POSTGRES_ADMIN_URL
    from harness.worker import SHIPPED_MODEL
    from service.db import migrate
    from service.db.tables import Analysis, AnalysisState, Export, ExportState, Series

    if not (SHIPPED_MODEL / "manifest.json").is_file():
        print(f"no model at {SHIPPED_MODEL}", file=sys.stderr)
        return 2
    storescu = dcmtk("storescu")
    if storescu is None:
        print("DCMTK storescu not found (Debian package dcmtk)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="cspine-burst-"))
    db_name = f"triage_burst_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"
    try:
        migrate.upgrade(db_url)
        t0 = time.perf_counter()
        studies = make_studies(work / "in", studies=args.studies, slices=args.slices,
                               matrix=args.matrix, distinct=args.distinct)
        total = sum(len(s.paths) for s in studies)
        print(f"{args.studies} studies x {args.slices} slices ({args.matrix}x{args.matrix}), "
              f"{total} instances, {args.distinct} distinct phantoms, written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        # Shipped defaults for completion, retries and visibility: this is the service as
        # deployed, with one SCP process and args.workers workers.
        overrides = {"COMPLETION_IDLE_AFTER_RELEASE_S": "5", "COMPLETION_IDLE_S": "30",
                     "BROKER_VISIBILITY_TIMEOUT_S": "3600", "TASK_RETRY_BACKOFF_S": "5",
                     "EXPORT_RETRY_BACKOFF_S": "10", "ENQUEUE_RETRY_INTERVAL_S": "5",
                     "ORT_INTRA_OP_THREADS": str(max(1, (os.cpu_count() or 2)
                                                     // args.workers))}
        with RedisServer(work / "redis") as broker, \
                Stack(work / "stack", database_url=db_url, broker_url=broker.url(0),
                      workers=args.workers, pool="solo", overrides=overrides) as stack:
            start, sent_end, _ = send_burst(stack.scp_port, studies, args.associations,
                                            "CSPINE_TRIAGE", storescu)
            ingest_rate = total / (sent_end - start)
            print(f"ingest: {total} instances in {sent_end - start:.1f} s = "
                  f"{ingest_rate:.1f} instances/s (workers analysing meanwhile)", flush=True)

            def finished() -> bool:
                with stack.factory() as session:
                    done = session.execute(
                        select(Export.id).join(Analysis, Analysis.id == Export.analysis_id)
                        .where(Analysis.state == AnalysisState.DONE,
                               Export.object_kind == "SR",
                               Export.state == ExportState.SENT)).all()
                    failed = session.execute(
                        select(Analysis.id).where(Analysis.state.in_(
                            [AnalysisState.FAILED, AnalysisState.NOT_ANALYZABLE]))).all()
                if failed:
                    raise RuntimeError(f"{len(failed)} analyses failed or not analysable")
                return len(done) >= len(studies)

            wait_until(finished, args.timeout, 1.0, "every study analysed and exported")
            to_flag: list[float] = []
            to_sr: list[float] = []
            last_sr = 0.0
            with stack.factory() as session:
                for study in studies:
                    series = session.execute(select(Series).where(
                        Series.series_instance_uid == study.series_instance_uid)).scalar_one()
                    analysis = session.execute(select(Analysis).where(
                        Analysis.series_id == series.id,
                        Analysis.state == AnalysisState.DONE)).scalar_one()
                    sr = session.execute(select(Export).where(
                        Export.analysis_id == analysis.id,
                        Export.object_kind == "SR")).scalar_one()
                    assert series.last_received_at and analysis.flagged_at and sr.sent_at
                    to_flag.append((analysis.flagged_at - series.last_received_at)
                                   .total_seconds())
                    to_sr.append((sr.sent_at - series.last_received_at).total_seconds())
                    last_sr = max(last_sr, sr.sent_at.timestamp())
            counts = {"SR": 0, "SEG": 0}
            for study in studies:
                for kind, n in stack.pacs_counts(study_as_case(study)).items():
                    if kind in counts:
                        counts[kind] += n
        if counts != {"SR": len(studies), "SEG": len(studies)}:
            print(f"PACS holds {counts}, expected {len(studies)} of each", file=sys.stderr)
            return 1
        peer_rate = peer_storescp(work, studies, args.associations)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    e2e_min = (last_sr - start) / 60.0
    print(f"end to end: {len(studies)} studies from first instance sent to last SR in the "
          f"PACS in {e2e_min * 60:.0f} s = {len(studies) / e2e_min:.2f} studies/min; "
          f"Orthanc holds {counts['SR']} SR and {counts['SEG']} SEG (no duplicates)")
    for name, values in (("last instance -> flag", to_flag),
                         ("last instance -> SR in PACS", to_sr)):
        print(f"{name}: p50 {percentile(values, 50):.1f} s, p90 {percentile(values, 90):.1f}"
              f" s, p99 {percentile(values, 99):.1f} s, max {max(values):.1f} s")
    print(f"peer dcmtk-storescp --fork, same burst, disk only: {peer_rate:.1f} instances/s")
    print(f"ratio ingest cspine-triage / dcmtk-storescp = {ingest_rate / peer_rate:.2f} "
          f"(ours while {args.workers} workers analyse on {os.cpu_count()} CPUs)")
    print(f"ratio p50 last instance -> SR / commercial reference "
          f"{COMMERCIAL_REFERENCE_S:.0f} s = {percentile(to_sr, 50) / COMMERCIAL_REFERENCE_S:.2f}")
    return 0


def study_as_case(study: Study) -> Case:
    """The fault harness's view of a study (it counts the PACS's objects per study)."""
    from harness.faults import Case

    return Case(study.study_instance_uid, study.series_instance_uid, study.paths, [])


if __name__ == "__main__":
    sys.exit(main())
