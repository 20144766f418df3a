"""The fault table (docs/reliability.md, issue 20): one test per fault, each writes its row.

Every test runs the whole service as separate processes (:class:`harness.faults.Stack`:
Orthanc as the PACS, ``triage scp``, ``triage worker``, a private Redis, PostgreSQL), lets a
synthetic modality send series, injects its fault, lets the fault end the way it ends in a
hospital (a supervisor restarts the killed process, the server comes back, the disk is
freed, the modality re-sends what was refused) and then checks, with no operator action,
that every acknowledged instance is on disk and in the database, every series was analysed
exactly once, and Orthanc holds exactly one SR and one SEG per study.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from harness.faults import (
    Case,
    Delivery,
    Row,
    Stack,
    Verdict,
    grow,
    make_case,
    send,
    send_in_background,
    tmpfs,
    write_row,
)
from harness.peers.servers import PostgresServer, RedisServer
from harness.process import wait_until
from service.db import migrate
from service.db.tables import AnalysisState, ExportState, Study

pytestmark = pytest.mark.slow

ACTIVE = {AnalysisState.PENDING, AnalysisState.QUEUED, AnalysisState.RUNNING}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def database(postgres_url: str) -> str:
    migrate.upgrade(postgres_url)
    return postgres_url


def _cases(tmp_path: Path, seeds: range) -> list[Case]:
    return [make_case(tmp_path / "cases", seed) for seed in seeds]


def _send_all(stack: Stack, cases: list[Case]) -> list[Delivery]:
    return [send(stack.scp_port, case.paths) for case in cases]


def test_redis_restart_mid_burst(tmp_path: Path, database: str, broker: RedisServer) -> None:
    """The broker dies (SIGKILL, no persistence: every queued message is lost) while
    analyses are queued and running, and comes back 2 s later on the same port."""
    cases = _cases(tmp_path, range(2001, 2005))
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0)) as stack:
        deliveries = [send_in_background(stack.scp_port, c.paths) for c in cases]
        wait_until(lambda: all(d.done.is_set() for d in deliveries), 120, 0.1, "deliveries")
        wait_until(lambda: sum(bool(set(stack.states(c)) & ACTIVE) for c in cases) >= 2,
                   60, 0.1, "analyses queued or running")
        broker.restart(kill=True, down_s=2)
        recovery = stack.wait_settled(cases, timeout_s=240)
        verdict = stack.verify(cases, deliveries)
    row = write_row(Row(
        order=30, fault="Redis restarted mid-burst",
        procedure=f"{len(cases)} series sent; with analyses queued and running, redis-server "
                  "killed (no persistence: queued messages lost) and restarted 2 s later",
        test="tests/integration/test_faults.py::test_redis_restart_mid_burst",
        verdict={}, recovered=True, recovery_s=round(recovery, 1)), verdict)
    assert row.passed, verdict.problems()


def _record(order: int, fault: str, procedure: str, name: str, verdict: Verdict,
            recovery_s: float, *, scaled: str = "", notes: str = "") -> Row:
    return write_row(Row(order=order, fault=fault, procedure=procedure,
                         test=f"tests/integration/test_faults.py::{name}", verdict={},
                         recovered=True, recovery_s=round(recovery_s, 1), scaled=scaled,
                         notes=notes), verdict)


def test_scp_sigkill_mid_association(tmp_path: Path, database: str,
                                     broker: RedisServer) -> None:
    """``kill -9`` of ``triage scp`` while a modality is sending; a supervisor restarts it
    and the modality sends the series again (what a PACS does with a failed association)."""
    (case,) = _cases(tmp_path, range(2101, 2102))
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
               overrides={"INGEST_BATCH_INTERVAL_S": "5"}) as stack:
        first = send_in_background(stack.scp_port, case.paths, delay_s=0.02)
        wait_until(lambda: len(first.acknowledged) >= 30, 120, 0.01, "30 acknowledged")
        assert stack.scp is not None
        stack.scp.kill9()
        wait_until(first.done.is_set, 60, 0.1, "the modality to notice")
        assert first.failed, "the kill did not land mid-association"
        stack.start_scp()
        again = send(stack.scp_port, case.paths)
        recovery = stack.wait_settled([case])
        verdict = stack.verify([case], [first, again])
    row = _record(10, "SCP SIGKILL mid-association",
                  f"kill -9 of `triage scp` after {len(first.acknowledged)} of "
                  f"{len(case.paths)} instances acknowledged (rows flushed every 5 s, so most "
                  "had no row yet); restarted; the modality re-sends the series",
                  "test_scp_sigkill_mid_association", verdict, recovery,
                  notes="rows rebuilt from the spool at start")
    assert row.passed, verdict.problems()


def test_worker_sigkill_mid_analysis(tmp_path: Path, database: str,
                                     broker: RedisServer) -> None:
    """``kill -9`` of the worker (prefork: parent and child) while it analyses; a supervisor
    starts a new one and the broker redelivers the unacknowledged task."""
    case = make_case(tmp_path / "cases", 2201, matrix=256, slice_spacing=1.25)
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
               pool="prefork", overrides={"BROKER_VISIBILITY_TIMEOUT_S": "10"}) as stack:
        delivery = send(stack.scp_port, case.paths)
        wait_until(lambda: AnalysisState.RUNNING in stack.states(case), 120, 0.02,
                   "the analysis to run")
        stack.workers[0].kill9()
        assert AnalysisState.DONE not in stack.states(case), "finished before the kill"
        stack.start_worker(0)
        recovery = stack.wait_settled([case])
        verdict = stack.verify([case], [delivery])
        attempts = stack.analyses(case)[-1].attempts
    row = _record(20, "Worker SIGKILL mid-analysis",
                  "kill -9 of the worker's process group as soon as the analysis is RUNNING; "
                  "a new worker started",
                  "test_worker_sigkill_mid_analysis", verdict, recovery,
                  scaled="visibility timeout 10 s (default 3600 s)",
                  notes=f"redelivered by the broker; attempts {attempts}")
    assert row.passed, verdict.problems()
    assert attempts == 2


def test_worker_sigkill_mid_export(tmp_path: Path, database: str,
                                   broker: RedisServer) -> None:
    """The PACS is down, so the export task is between attempts (rows RETRYING) when the
    worker is killed; the PACS and a new worker come back; the export completes once."""
    (case,) = _cases(tmp_path, range(2301, 2302))
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
               pool="prefork", overrides={"BROKER_VISIBILITY_TIMEOUT_S": "10",
                                          "EXPORT_MAX_RETRIES": "8",
                                          "EXPORT_TIMEOUT_S": "2"}) as stack:
        stack.orthanc.__exit__()
        delivery = send(stack.scp_port, case.paths)
        wait_until(lambda: ExportState.RETRYING in stack.export_states(case), 180, 0.1,
                   "the export to be retrying")
        stack.workers[0].kill9()
        stack.orthanc.__enter__()
        stack.start_worker(0)
        recovery = stack.wait_settled([case])
        verdict = stack.verify([case], [delivery])
    row = _record(21, "Worker SIGKILL mid-export",
                  "PACS stopped so the export task is between attempts (rows RETRYING, its "
                  "retry held by the worker); kill -9 of the worker; PACS and a new worker "
                  "started",
                  "test_worker_sigkill_mid_export", verdict, recovery,
                  scaled="visibility timeout 10 s; export backoff 1 s x 8 tries",
                  notes="the unacknowledged export task is redelivered")
    assert row.passed, verdict.problems()


def test_postgres_restart_mid_burst(tmp_path: Path, broker: RedisServer) -> None:
    """A private PostgreSQL (never the shared one) stops and comes back 3 s later while
    series arrive and analyses run."""
    with PostgresServer() as postgres:
        url = postgres.create_database("triage")
        migrate.upgrade(url)
        cases = _cases(tmp_path, range(2401, 2404))
        with Stack(tmp_path / "stack", database_url=url, broker_url=broker.url(0)) as stack:
            deliveries = [send_in_background(stack.scp_port, c.paths, delay_s=0.01)
                          for c in cases]
            wait_until(lambda: any(bool(set(stack.states(c)) & ACTIVE) for c in cases),
                       120, 0.1, "an analysis queued or running")
            postgres.restart(mode="fast", down_s=3)
            wait_until(lambda: all(d.done.is_set() for d in deliveries), 120, 0.1,
                       "deliveries")
            refused = [u for d in deliveries for u in d.failed]
            recovery = stack.wait_settled(cases, timeout_s=300)
            verdict = stack.verify(cases, deliveries)
    row = _record(40, "PostgreSQL restarted mid-burst",
                  f"{len(cases)} series arriving and analyses running; private PostgreSQL "
                  "stopped (fast) and started 3 s later",
                  "test_postgres_restart_mid_burst", verdict, recovery,
                  notes=f"{len(refused)} C-STORE refused during the outage")
    assert row.passed, verdict.problems()


def test_spool_disk_full(tmp_path: Path, database: str, broker: RedisServer) -> None:
    """The spool's filesystem fills in the middle of a series: C-STOREs are refused with
    0xA700, nothing refused is kept, nothing acknowledged is lost; the disk is freed and the
    modality re-sends the series."""
    first, second = _cases(tmp_path, range(2501, 2503))
    size = sum(p.stat().st_size for p in first.paths)
    with tmpfs(tmp_path / "spooldisk", str(int(size * 1.5))) as disk, \
            Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
                  overrides={"SPOOL_DIR": str(disk / "spool")}) as stack:
        deliveries = [send(stack.scp_port, first.paths), send(stack.scp_port, second.paths)]
        refused = deliveries[1].failed
        assert refused and {deliveries[1].statuses.get(u) for u in refused} == {0xA700}
        grow(disk, "512m")
        deliveries.append(send(stack.scp_port, second.paths))
        recovery = stack.wait_settled([first, second])
        verdict = stack.verify([first, second], deliveries)
    row = _record(50, "Spool disk full",
                  "spool on a tmpfs 1.5x one series: the second series fills it (C-STORE "
                  f"0xA700 for {len(refused)} instances); disk grown; the modality re-sends",
                  "test_spool_disk_full", verdict, recovery)
    assert row.passed, verdict.problems()


def test_result_store_disk_full(tmp_path: Path, database: str, broker: RedisServer) -> None:
    """The result store's filesystem is full when the SR and SEG are written: the analysis
    is retried (transient), the flag stands; space comes back and it completes once."""
    (case,) = _cases(tmp_path, range(2601, 2602))
    with tmpfs(tmp_path / "resultdisk", "8k") as disk, \
            Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
                  overrides={"RESULTS_DIR": str(disk / "results"),
                             "TASK_MAX_RETRIES": "6"}) as stack:
        delivery = send(stack.scp_port, case.paths)
        wait_until(lambda: any(a.attempts >= 2 for a in stack.analyses(case)), 180, 0.2,
                   "a retry after the full disk")
        assert AnalysisState.DONE not in stack.states(case)
        grow(disk, "64m")
        recovery = stack.wait_settled([case])
        verdict = stack.verify([case], [delivery])
        attempts = stack.analyses(case)[-1].attempts
    row = _record(51, "Result-store disk full",
                  "results directory on an 8 KiB tmpfs: writing the SR/SEG fails (ENOSPC, "
                  "transient: task retried with backoff); disk grown after the first retry",
                  "test_result_store_disk_full", verdict, recovery,
                  scaled="task retry backoff 1 s, 6 retries (default 5 s, 3)",
                  notes=f"attempts {attempts}; findings and flag recorded before the SR/SEG")
    assert row.passed, verdict.problems()


def test_broker_down_when_series_completes(tmp_path: Path, database: str,
                                           broker: RedisServer) -> None:
    """Redis is down when the series completes: the analysis waits PENDING in the database
    and is enqueued by the tracker's sweep when the broker is back."""
    (case,) = _cases(tmp_path, range(2701, 2702))
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0)) as stack:
        broker.stop()
        delivery = send(stack.scp_port, case.paths)
        wait_until(lambda: AnalysisState.PENDING in stack.states(case), 60, 0.1,
                   "the analysis PENDING with the broker down")
        time.sleep(3)
        # Each failed enqueue claims the row (QUEUED, no task id) and gives it back.
        assert all(a.state in (AnalysisState.PENDING, AnalysisState.QUEUED)
                   and a.task_id is None for a in stack.analyses(case))
        broker.start()
        recovery = stack.wait_settled([case])
        verdict = stack.verify([case], [delivery])
    row = _record(60, "Broker down when a series completes",
                  "redis-server stopped before the series is sent; it completes and "
                  "qualifies; broker started 3 s after the analysis was created",
                  "test_broker_down_when_series_completes", verdict, recovery,
                  notes="analysis stays PENDING in the database; the sweep enqueues it")
    assert row.passed, verdict.problems()


PACS_OUTAGE_S = 60.0


def test_pacs_down_for_ten_minutes_scaled(tmp_path: Path, database: str,
                                          broker: RedisServer) -> None:
    """The PACS is down when the results are ready and stays down for the outage; the
    export retries with backoff and delivers once when it is back. A second series sent
    during the outage is analysed and flagged meanwhile: the export's waits are in the
    broker, not in the one worker process that also runs the analyses."""
    case, later = _cases(tmp_path, range(2801, 2803))
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0),
               overrides={"EXPORT_TIMEOUT_S": "2",
                          # above the longest deferred retry (64 s): no redelivered copy
                          "BROKER_VISIBILITY_TIMEOUT_S": "600"}) as stack:
        stack.orthanc.__exit__()
        down_at = time.monotonic()
        deliveries = [send(stack.scp_port, case.paths)]
        wait_until(lambda: ExportState.RETRYING in stack.export_states(case), 180, 0.1,
                   "the export to be retrying")
        deliveries.append(send(stack.scp_port, later.paths))
        wait_until(lambda: AnalysisState.DONE in stack.states(later), 90, 0.2,
                   "the second series analysed while the PACS is down")
        with stack.factory() as session:
            flagged = session.execute(select(Study.flagged_at).where(
                Study.study_instance_uid == later.study_instance_uid)).scalar_one()
        assert flagged is not None
        assert ExportState.SENT not in stack.export_states(case)  # the PACS is still down
        time.sleep(max(0.0, PACS_OUTAGE_S - (time.monotonic() - down_at)))
        outage = time.monotonic() - down_at
        stack.orthanc.__enter__()
        recovery = stack.wait_settled([case, later], timeout_s=180)
        verdict = stack.verify([case, later], deliveries)
    row = _record(70, "PACS destination down for 10 minutes",
                  f"Orthanc stopped before the first series is sent, started again after "
                  f"{outage:.0f} s; a second series sent during the outage",
                  "test_pacs_down_for_ten_minutes_scaled", verdict, recovery,
                  scaled="time 1:10: outage 60 s, export backoff base 1 s (shipped 10 s); "
                         "the shipped 8 tries: retry window 127 s (21 min unscaled)",
                  notes="the second series was analysed and flagged while the PACS was down "
                        "(export waits are in the broker)")
    assert row.passed, verdict.problems()


def test_second_copy_while_first_is_analysed(tmp_path: Path, database: str,
                                             broker: RedisServer) -> None:
    """The modality sends the same series again while its analysis runs: the copy reopens
    and re-completes the series with the same input, which reuses the same analysis."""
    case = make_case(tmp_path / "cases", 2901, matrix=256, slice_spacing=1.25)
    with Stack(tmp_path / "stack", database_url=database, broker_url=broker.url(0)) as stack:
        first = send(stack.scp_port, case.paths)
        wait_until(lambda: AnalysisState.RUNNING in stack.states(case), 120, 0.02,
                   "the analysis to run")
        second = send(stack.scp_port, case.paths)
        running_during_copy = AnalysisState.RUNNING in stack.states(case)
        recovery = stack.wait_settled([case])
        time.sleep(3)  # a late second analysis would show up here
        verdict = stack.verify([case], [first, second])
        analyses = len(stack.analyses(case))
    row = _record(80, "Second copy of a series while the first is analysed",
                  "the same series (same bytes) sent again as soon as its analysis is RUNNING",
                  "test_second_copy_while_first_is_analysed", verdict, recovery,
                  notes=f"{analyses} analysis row(s); identical bytes are stored once")
    assert running_during_copy, "the analysis finished before the copy arrived"
    assert row.passed, verdict.problems()
