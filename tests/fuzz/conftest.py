"""Fixtures of the fuzz tests: an SCP in process and a real one on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from harness.fuzz import RecordingBookkeeper
from harness.peers.dicom import CALLED
from service.config import Settings
from service.db import migrate
from service.dicom.runner import IngestNode, make_spool
from service.dicom.scp import StorageSCP

FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow,
                                            HealthCheck.function_scoped_fixture,
                                            HealthCheck.data_too_large])


def fuzz(max_examples: int) -> Any:
    """Deterministic hypothesis settings for CI: the same inputs on every run."""
    return settings(max_examples=max_examples, **FUZZ_SETTINGS)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scp_in_process(tmp_path_factory: pytest.TempPathFactory) -> StorageSCP:
    """The SCP's handlers with a real spool and a recording bookkeeper (no server)."""
    root = tmp_path_factory.mktemp("scp")
    config = Settings(data_dir=root, ae_title=CALLED, spool_min_free_mb=0,
                      max_inflated_dataset_mb=1)
    return StorageSCP(config, make_spool(config), RecordingBookkeeper())  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def scp_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestNode]:
    """A real receiver (SCP thread, bookkeeper, migrated SQLite) on a free loopback port."""
    root: Path = tmp_path_factory.mktemp("node")
    config = Settings(data_dir=root, ae_title=CALLED, spool_min_free_mb=0,
                      ingest_batch_interval_s=0.05, broker_url="redis://127.0.0.1:1/0",
                      broker_connect_timeout_s=0.3, max_inflated_dataset_mb=1)
    migrate.upgrade(config.db_url)
    node = IngestNode(config, with_tracker=False)
    node.start("127.0.0.1", 0)
    yield node
    node.stop(grace_s=2)
