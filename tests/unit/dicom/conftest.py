"""A real SCP (IngestNode on a free loopback port, migrated SQLite) and a pynetdicom SCU."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import _config

from harness.peers.dicom import CALLED, Scu
from service.config import Settings
from service.db import migrate
from service.dicom.runner import IngestNode


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., IngestNode]]:
    nodes: list[IngestNode] = []

    def start(with_tracker: bool = False, **overrides: Any) -> IngestNode:
        values: dict[str, Any] = {
            "data_dir": tmp_path / f"var{len(nodes)}", "ae_title": CALLED,
            "spool_min_free_mb": 0, "ingest_batch_interval_s": 0.05, "min_slices": 5,
            "broker_url": "redis://127.0.0.1:1/0", "broker_connect_timeout_s": 0.3,
            "tracker_interval_s": 0.1,
        }
        values.update(overrides)
        settings = Settings(**values)
        migrate.upgrade(settings.db_url)
        node = IngestNode(settings, with_tracker=with_tracker)
        node.start("127.0.0.1", 0)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop(grace_s=2)


@pytest.fixture
def raw_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send files as they are on disk (no decode / re-encode)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def scu_for() -> Callable[..., Scu]:
    return Scu
