"""The fault table (docs/reliability.md, issue 20): one test per fault, each writes its row.

Every test runs the whole service as separate processes (:class:`fault_support.Stack`:
Orthanc as the PACS, ``triage scp``, ``triage worker``, a private Redis, PostgreSQL), lets a
synthetic modality send series, injects its fault, lets the fault end the way it ends in a
hospital (a supervisor restarts the killed process, the server comes back, the disk is
freed, the modality re-sends what was refused) and then checks, with no operator action,
that every acknowledged instance is on disk and in the database, every series was analysed
exactly once, and Orthanc holds exactly one SR and one SEG per study.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.db import migrate
from service.db.tables import AnalysisState
from tests.integration.fault_support import (
    Case,
    Delivery,
    Row,
    Stack,
    make_case,
    send,
    send_in_background,
    write_row,
)
from tests.peers.dicom import wait_until
from tests.peers.servers import RedisServer

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
