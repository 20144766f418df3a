"""Shared fixtures: real PostgreSQL and Redis where the machine runs them, SQLite always.

A test that needs a server or tool that is absent *fails* where ``TEST_REQUIRE_SERVICES`` is
set (``.ci/run`` sets it: the CI machine has them all) and elsewhere is *skipped with the
server's name in the reason*; it never passes silently (:func:`harness.services.missing`).
The helpers themselves live in ``harness/``, which ``bench/`` uses too; this module only holds
fixtures (import nothing from it).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from harness.process import port_open
from harness.services import POSTGRES_ADMIN_URL, REDIS_URL, missing
from service.config import Settings
from service.db import migrate

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_CT_DIR = Path(os.environ.get("TEST_REAL_CT_DIR",
                                  SHARED_DATA / "real-ct-head-neck" / "ct"))
"""The real head-and-neck CT (not shipped): next to the checkout, or where TEST_REAL_CT_DIR
points (a clone elsewhere, e.g. a CI workspace)."""
REAL_CHEST_CT_DIR = SHARED_DATA / "real-ct-chest-neck" / "ct"
"""The real chest CT with the lower neck (another scanner; header quirks), not shipped."""

TEST_SECRET_KEY = os.environ.setdefault("TRIAGE_SECRET_KEY",
                                        f"test-only-secret-{uuid.uuid4().hex}")
"""The web app refuses the public placeholder ``secret_key`` outside development mode, as in
production; every Settings a test builds, and every service process a test starts (they
inherit the environment), gets this random key instead. A test of the refusal passes the
placeholder explicitly."""

CUDA_PROVIDER = "CUDAExecutionProvider"


def _gpu_missing() -> str | None:
    """Why the ``gpu`` tests cannot run here, or None where onnxruntime has the CUDA provider.

    ``TEST_REQUIRE_GPU=1`` (``make test-gpu``) keeps them whatever this says, so a GPU machine
    whose CUDA provider is broken fails instead of passing without them."""
    if os.environ.get("TEST_REQUIRE_GPU"):
        return None
    import onnxruntime as ort

    if CUDA_PROVIDER in ort.get_available_providers():
        return None
    return (f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (a CPU build or no GPU); "
            "`make test-gpu` runs them on a GPU machine with onnxruntime-gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the ``gpu`` tests where there is no CUDA provider: they test hardware this
    machine does not have, so they are not run (and not counted as skips); the terminal
    summary says how many and why."""
    reason = _gpu_missing()
    if reason is None:
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    config.hook.pytest_deselected(items=gpu)
    config.stash[_GPU_DESELECTED] = (len(gpu), reason)


_GPU_DESELECTED = pytest.StashKey[tuple[int, str]]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    deselected = config.stash.get(_GPU_DESELECTED, None)
    if deselected is not None:
        count, reason = deselected
        terminalreporter.write_line(f"GPU tests deselected: {count} ({reason})")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    if not port_open("127.0.0.1", 5432):
        missing("PostgreSQL server not reachable on 127.0.0.1:5432")
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the real server, dropped afterwards."""
    name = f"triage_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ), {"n": name})
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'triage.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both dialects the service supports; PostgreSQL skips if the server is absent."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def migrated_url(database_url: str) -> str:
    migrate.upgrade(database_url)
    return database_url


@pytest.fixture(scope="session")
def redis_server_url() -> str:
    if not port_open("127.0.0.1", 6379):
        missing("Redis server not reachable on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture
def redis_url(redis_server_url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_server_url)
    client.flushdb()
    yield redis_server_url
    client.flushdb()
    client.close()


@pytest.fixture
def settings_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build isolated Settings under tmp_path; keyword arguments override."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"data_dir": tmp_path / "var"}
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"real CT reference data absent ({REAL_CT_DIR}; set TEST_REAL_CT_DIR)")
    return REAL_CT_DIR


@pytest.fixture(scope="session")
def real_chest_ct_dir() -> Path:
    if not REAL_CHEST_CT_DIR.is_dir():
        pytest.skip(f"real chest CT reference data absent ({REAL_CHEST_CT_DIR})")
    return REAL_CHEST_CT_DIR
