"""The real servers the tests and benchmarks use, and what to do when one is absent.

A test that needs a server or tool that is absent *fails* where ``TEST_REQUIRE_SERVICES`` is
set (``.ci/run`` sets it: the CI machine has them all) and elsewhere is *skipped with the
server's name in the reason*; it never passes silently. A benchmark (no pytest running) gets
:class:`PeerMissing` instead, whose message names the peer.
"""

from __future__ import annotations

import os
import sys

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
"""A superuser connection: tests and benchmarks create (and drop) a database each."""
REDIS_URL = os.environ.get("TEST_REDIS_URL",
                           f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}")
"""One Redis database per test session (1..15 by process ID): two suites running at once on
one machine (a developer's and CI's, or two helpers') would otherwise flush each other's
queues and their workers would take each other's tasks."""

REQUIRE_SERVICES = os.environ.get("TEST_REQUIRE_SERVICES", "") not in ("", "0")
"""Set by ``.ci/run``: on the machine kind CI runs on, PostgreSQL, Redis, DCMTK and Orthanc
exist, so a missing one is a failure there, never a silent skip. Elsewhere (a laptop without
them) the tests that need one skip with its name."""


class PeerMissing(RuntimeError):
    """A server or tool the caller needs is absent (raised outside pytest, e.g. in bench/)."""


def missing(what: str) -> None:
    """A real peer is absent: under pytest fail where it must exist (CI), else skip naming
    it; outside pytest raise :class:`PeerMissing`. Never returns.

    "Under pytest" is "pytest is imported": a benchmark calling the same peer helper never
    imports it (nothing in harness imports pytest at module level), a test always has, also
    while modules are collected.
    """
    pytest = sys.modules.get("pytest")
    if pytest is None:
        raise PeerMissing(what)

    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (TEST_REQUIRE_SERVICES is set: this machine must have it)",
                    pytrace=False)
    pytest.skip(what)
