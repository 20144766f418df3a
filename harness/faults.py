"""The fault-table harness: the whole service as separate processes, a fault, and one check.

:class:`Stack` runs what a site runs: a PACS (a real Orthanc, which receives the SR and
SEG), ``triage scp`` with its tracker, one or more ``triage worker`` processes, a broker
(a private :class:`~harness.peers.servers.RedisServer`, so the test may restart it) and a
database (a fresh database on the shared PostgreSQL, or on a private
:class:`~harness.peers.servers.PostgresServer` when the test restarts the database). The
modality is the test itself: a pynetdicom SCU that records the status of every C-STORE, so
"acknowledged" means "answered Success", instance by instance.

After the fault, :meth:`Stack.verify` checks the promises of DESIGN.md's non-negotiables and
returns one row of ``docs/reliability.md``: every acknowledged instance is in the spool (the
file reads back with its SOP Instance UID) and in the database; every series is analysed
exactly once (one DONE analysis and one ``analysis.done`` event; earlier analyses only
SUPERSEDED with their successor named); Orthanc holds exactly one SR and one SEG per study
(counted there, not in our database); every export row is SENT; and all of it happened
with no operator action, only the fault's own end (a process supervisor restarting what
was killed, a server coming back). :func:`write_row` stores the row as JSON under
``var/fault-table/`` (``TRIAGE_FAULT_RESULTS_DIR``) and ``python -m
tests.integration.fault_table`` renders the table into the document.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from harness.peers.dicom import ScpProcess
from harness.peers.orthanc import Orthanc
from harness.process import free_port, wait_until
from harness.services import missing
from harness.worker import SHIPPED_MODEL, WorkerProcess
from service.db.session import make_engine, make_session_factory
from service.db.tables import (
    Analysis,
    AnalysisState,
    AuditEvent,
    Export,
    ExportState,
    Instance,
    Series,
    Study,
)
from service.synthetic import PhantomOptions, generate_phantom, write_series

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("TRIAGE_FAULT_RESULTS_DIR", REPO / "var" / "fault-table"))
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SR_MODALITY, SEG_MODALITY = "SR", "SEG"


# --------------------------------------------------------------------------- the modality


@dataclass
class Case:
    """One synthetic cervical-spine CT series, as files in delivery order."""

    study_instance_uid: str
    series_instance_uid: str
    paths: list[Path]
    sop_instance_uids: list[str]


def make_case(directory: Path, seed: int, *, matrix: int = 128,
              slice_spacing: float = 2.5) -> Case:
    """A small phantom (about 80 slices at 128 x 128): analysed in seconds on a CPU, yet a
    series the rules accept and the model segments; ``matrix`` 512 makes analysis slow
    enough to kill a worker in the middle of it."""
    options = PhantomOptions(seed=seed, matrix=matrix, pixel_spacing=0.8 * 256 / matrix,
                             slice_spacing=slice_spacing, n_slices=None, fractures=1, mimics=0)
    paths = write_series(generate_phantom(options), directory / f"case-{seed}")
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    return Case(study_instance_uid=str(headers[0].StudyInstanceUID),
                series_instance_uid=str(headers[0].SeriesInstanceUID), paths=list(paths),
                sop_instance_uids=[str(h.SOPInstanceUID) for h in headers])


@dataclass
class Delivery:
    """What the modality saw: SOP Instance UIDs answered Success, and the others."""

    acknowledged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    def merge(self, other: Delivery) -> None:
        self.acknowledged += [u for u in other.acknowledged if u not in self.acknowledged]
        self.failed = [u for u in self.failed + other.failed if u not in self.acknowledged]
        self.statuses.update(other.statuses)


def send(port: int, paths: Sequence[Path], *, calling: str = "MODALITY",
         delay_s: float = 0.0, delivery: Delivery | None = None) -> Delivery:
    """C-STORE ``paths`` over one association and record each status; a peer that dies or
    refuses mid-way leaves the rest ``failed`` (never raises). ``delay_s`` between
    instances lets a test land a fault in the middle of the association."""
    delivery = delivery or Delivery()
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.requested_contexts = [build_context(CT_STORAGE, [ExplicitVRLittleEndian])]
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE_TRIAGE")
        for path in paths:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            if not assoc.is_established:
                delivery.failed.append(uid)
                continue
            try:
                status = assoc.send_c_store(dcmread(path))
            except Exception:  # noqa: BLE001 - the peer died under us
                delivery.failed.append(uid)
                continue
            code = int(status.Status) if "Status" in status else -1
            delivery.statuses[uid] = code
            (delivery.acknowledged if code == 0 else delivery.failed).append(uid)
            if delay_s:
                time.sleep(delay_s)
        if assoc.is_established:
            assoc.release()
    finally:
        delivery.done.set()
    return delivery


def send_in_background(port: int, paths: Sequence[Path], **kwargs: Any) -> Delivery:
    delivery = Delivery()
    threading.Thread(target=send, args=(port, paths), kwargs={**kwargs, "delivery": delivery},
                     daemon=True).start()
    return delivery


# --------------------------------------------------------------------------- the stack


class Stack:
    """Orthanc, ``triage scp`` and workers against a given database and broker URL.

    ``overrides`` are ``TRIAGE_*`` settings (without the prefix) for every process, e.g.
    ``{"EXPORT_MAX_RETRIES": "8"}``.
    """

    def __init__(self, workdir: Path, *, database_url: str, broker_url: str, workers: int = 1,
                 pool: str = "solo", overrides: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.database_url = database_url
        self.broker_url = broker_url
        self.scp_port = free_port()
        self.n_workers = workers
        self.pool = pool
        self.overrides = overrides or {}
        self.orthanc = Orthanc(workdir / "orthanc",
                               {"TRIAGE": ["CSPINE_TRIAGE", "127.0.0.1", self.scp_port]},
                               config={"StableAge": 1})
        self.scp: ScpProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.engine = make_engine(database_url)
        self.factory: sessionmaker[Session] = make_session_factory(self.engine)
        self.started = time.monotonic()

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update({
            "TRIAGE_DATA_DIR": str(self.workdir / "var"),
            "TRIAGE_DATABASE_URL": self.database_url,
            "TRIAGE_BROKER_URL": self.broker_url,
            "TRIAGE_MODEL_DIR": str(SHIPPED_MODEL),
            "TRIAGE_DICOM_HOST": "127.0.0.1",
            "TRIAGE_DICOM_PORT": str(self.scp_port),
            "TRIAGE_SPOOL_MIN_FREE_MB": "0",
            "TRIAGE_PACS_DESTINATIONS": json.dumps([{
                "name": "orthanc", "ae_title": self.orthanc.ae_title, "host": "127.0.0.1",
                "port": self.orthanc.dicom_port}]),
            "TRIAGE_COMPLETION_IDLE_AFTER_RELEASE_S": "1",
            "TRIAGE_COMPLETION_IDLE_S": "15",
            "TRIAGE_ENQUEUE_RETRY_INTERVAL_S": "1",
            "TRIAGE_BROKER_CONNECT_TIMEOUT_S": "1",
            # Longer than any analysis here (no duplicate delivery to a second worker while
            # the first still runs), short enough that a killed worker's task comes back soon.
            "TRIAGE_BROKER_VISIBILITY_TIMEOUT_S": "30",
            "TRIAGE_TASK_RETRY_BACKOFF_S": "1",
            "TRIAGE_EXPORT_RETRY_BACKOFF_S": "1",
            "TRIAGE_ORT_INTRA_OP_THREADS": "1",
        })
        env.update({f"TRIAGE_{k}": v for k, v in self.overrides.items()})
        return env

    def __enter__(self) -> Stack:
        self.orthanc.__enter__()
        self.start_scp()
        for index in range(self.n_workers):
            self.start_worker(index)
        return self

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        if self.scp is not None:
            self.scp.stop()
        self.orthanc.__exit__()
        self.engine.dispose()

    def start_scp(self) -> ScpProcess:
        if self.scp is None:
            self.scp = ScpProcess(self.env, self.workdir, self.workdir / "scp.log")
        else:
            self.scp.env.update(self.env)
        return self.scp.start(timeout_s=120)

    def start_worker(self, index: int = 0) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.workdir / f"worker-{index}.log",
                               pool=self.pool).start()
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        return worker

    # --- observing -------------------------------------------------------------------------
    def analyses(self, case: Case) -> list[Analysis]:
        with self.factory() as session:
            return list(session.execute(
                select(Analysis).join(Series, Series.id == Analysis.series_id)
                .where(Series.series_instance_uid == case.series_instance_uid)
                .order_by(Analysis.id)).scalars())

    def states(self, case: Case) -> list[AnalysisState]:
        return [a.state for a in self.analyses(case)]

    def pacs_counts(self, case: Case) -> dict[str, int]:
        counts: dict[str, int] = {}
        for instance in self.orthanc.instances_of_study(case.study_instance_uid):
            tags = self.orthanc.get(f"/instances/{instance['ID']}/simplified-tags")
            counts[tags["Modality"]] = counts.get(tags["Modality"], 0) + 1
        return counts

    def export_states(self, case: Case) -> list[ExportState]:
        with self.factory() as session:
            return list(session.execute(
                select(Export.state).join(Analysis, Analysis.id == Export.analysis_id)
                .join(Series, Series.id == Analysis.series_id)
                .where(Series.series_instance_uid == case.series_instance_uid,
                       Analysis.state == AnalysisState.DONE)).scalars())

    def settled(self, case: Case) -> bool:
        """DONE, every export SENT, and both result objects listed by Orthanc."""
        try:
            states = self.states(case)
            exports = self.export_states(case)
        except Exception:  # noqa: BLE001 - the database may be the fault being tested
            return False
        if AnalysisState.DONE not in states or not exports:
            return False
        if any(s is not ExportState.SENT for s in exports):
            return False
        try:
            counts = self.pacs_counts(case)
        except OSError:
            return False
        return counts.get(SR_MODALITY, 0) >= 1 and counts.get(SEG_MODALITY, 0) >= 1

    def wait_settled(self, cases: Iterable[Case], timeout_s: float = 240) -> float:
        """Wait until every case is settled; seconds since the stack started."""
        pending = list(cases)

        def all_done() -> bool:
            pending[:] = [c for c in pending if not self.settled(c)]
            return not pending

        try:
            wait_until(all_done, timeout_s, 0.5, "every series analysed and its SR and SEG "
                                                 "in the PACS")
        except AssertionError:
            self.dump(pending)
            raise
        return time.monotonic() - self.started

    def dump(self, cases: Iterable[Case]) -> None:
        for case in cases:
            try:
                print(case.series_instance_uid, [(a.id, a.state.value, a.attempts, a.error)
                                                 for a in self.analyses(case)],
                      self.export_states(case), self.pacs_counts(case))
            except Exception as exc:  # noqa: BLE001
                print("state unavailable:", exc)
        for worker in self.workers:
            print(worker.log, worker.output()[-3000:])
        if self.scp is not None:
            text = self.scp.log.read_text(errors="replace")
            print("\n".join([line for line in text.splitlines()
                             if "ERROR" in line or "bookkeeping" in line][-50:]))
            print(text[-3000:])

    # --- the check ---------------------------------------------------------------------------
    def verify(self, cases: Sequence[Case], deliveries: Sequence[Delivery]) -> Verdict:
        acknowledged = {u for d in deliveries for u in d.acknowledged}
        spool = Path(self.overrides.get("SPOOL_DIR") or self.workdir / "var" / "spool")
        with self.factory() as session:
            rows = dict(session.execute(
                select(Instance.sop_instance_uid, Instance.spool_path)
                .where(Instance.sop_instance_uid.in_(acknowledged))).all())
            done_events: dict[str, int] = {}
            for case in cases:
                done_events[case.series_instance_uid] = int(session.execute(
                    select(func.count()).select_from(AuditEvent)
                    .where(AuditEvent.event_type == "analysis.done",
                           AuditEvent.series_instance_uid == case.series_instance_uid))
                    .scalar_one())
            studies = int(session.execute(select(func.count()).select_from(Study)).scalar_one())
        on_disk = 0
        for uid, relative in rows.items():
            path = spool / relative
            if path.is_file() and str(dcmread(path, stop_before_pixels=True)
                                       .SOPInstanceUID) == uid:
                on_disk += 1
        analysed_once = 0
        superseded = 0
        sr = seg = 0
        exports_sent = True
        for case in cases:
            analyses = self.analyses(case)
            done = [a for a in analyses if a.state is AnalysisState.DONE]
            others = [a for a in analyses if a.state is not AnalysisState.DONE]
            superseded += len(others)
            if (len(done) == 1 and done_events[case.series_instance_uid] == 1
                    and all(a.state is AnalysisState.SUPERSEDED and a.superseded_by_id
                            for a in others)):
                analysed_once += 1
            counts = self.pacs_counts(case)
            sr += counts.get(SR_MODALITY, 0)
            seg += counts.get(SEG_MODALITY, 0)
            exports_sent &= bool(self.export_states(case)) and all(
                s is ExportState.SENT for s in self.export_states(case))
        verdict = Verdict(acknowledged=len(acknowledged), on_disk=on_disk, in_db=len(rows),
                          series=len(cases), analysed_once=analysed_once,
                          superseded=superseded, studies_in_db=studies, sr_in_pacs=sr,
                          seg_in_pacs=seg, exports_sent=exports_sent,
                          max_attempts=max((a.attempts for c in cases
                                            for a in self.analyses(c)), default=0))
        if verdict.problems():
            # Shown by pytest with the failure: which instances, and the processes' own words.
            missing = sorted(acknowledged - set(rows))
            print("acknowledged, no row:", missing[:20])
            for uid in missing[:5]:
                for d in deliveries:
                    print(uid, "status", d.statuses.get(uid))
            self.dump(cases)
        return verdict


@dataclass
class Verdict:
    """What :meth:`Stack.verify` found; :meth:`problems` lists every broken promise."""

    acknowledged: int
    on_disk: int
    in_db: int
    series: int
    analysed_once: int
    superseded: int
    studies_in_db: int
    sr_in_pacs: int
    seg_in_pacs: int
    exports_sent: bool
    max_attempts: int

    @property
    def duplicates_in_pacs(self) -> int:
        return max(0, self.sr_in_pacs - self.series) + max(0, self.seg_in_pacs - self.series)

    def problems(self) -> list[str]:
        out = []
        if self.on_disk != self.acknowledged:
            out.append(f"{self.acknowledged - self.on_disk} acknowledged instances not on disk")
        if self.in_db != self.acknowledged:
            out.append(f"{self.acknowledged - self.in_db} acknowledged instances not in the DB")
        if self.analysed_once != self.series:
            out.append(f"{self.series - self.analysed_once} series not analysed exactly once")
        if self.duplicates_in_pacs:
            out.append(f"{self.duplicates_in_pacs} duplicate SR/SEG in the PACS")
        if self.sr_in_pacs < self.series or self.seg_in_pacs < self.series:
            out.append("SR or SEG missing in the PACS")
        if not self.exports_sent:
            out.append("export rows not all SENT")
        return out


# --------------------------------------------------------------------------- the table rows


@dataclass
class Row:
    """One row of the fault table, as the test measured it."""

    order: int
    fault: str
    procedure: str
    test: str
    verdict: dict[str, Any]
    recovered: bool
    recovery_s: float | None
    scaled: str = ""
    notes: str = ""
    passed: bool = False
    measured_at: str = ""


def write_row(row: Row, verdict: Verdict | None = None) -> Row:
    """Store the row for the renderer (the test's own asserts come after: a failing run
    writes a failing row)."""
    if verdict is not None:
        row.verdict = asdict(verdict) | {"duplicates_in_pacs": verdict.duplicates_in_pacs,
                                         "problems": verdict.problems()}
        row.passed = row.recovered and not verdict.problems()
    row.measured_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = row.test.split("::")[-1]
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(asdict(row), indent=2) + "\n")
    return row


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (a disk that really fills: ENOSPC from the kernel);
    :func:`grow` frees it, as an administrator or a cleanup job would."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)
