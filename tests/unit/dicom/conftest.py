"""A real SCP (IngestNode on a free loopback port, migrated SQLite) and a pynetdicom SCU."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.presentation import build_context

from service.config import Settings
from service.db import migrate
from service.dicom.runner import IngestNode

CALLED = "CSPINE_TRIAGE"


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


class Scu:
    """A pynetdicom requestor bound to one SCP port."""

    def __init__(self, port: int, calling: str = "TESTSCU", called: str = CALLED,
                 tls_args: tuple[Any, str | None] | None = None) -> None:
        self.port = port
        self.calling = calling
        self.called = called
        self.tls_args = tls_args

    def associate(self, contexts: Sequence[tuple[str, str]]) -> Any:
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in
                                 dict.fromkeys(contexts)]
        return ae.associate("127.0.0.1", self.port, ae_title=self.called, tls_args=self.tls_args)

    def store(self, items: Sequence[Path | Dataset]) -> list[int]:
        """Send every item in one association; the statuses in order (-1: no response)."""
        from pydicom.filereader import read_file_meta_info

        contexts = []
        for item in items:
            meta = read_file_meta_info(item) if isinstance(item, Path) else item.file_meta
            contexts.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        assoc = self.associate(contexts)
        assert assoc.is_established, "association not established"
        statuses = []
        try:
            for item in items:
                status = assoc.send_c_store(item)
                statuses.append(int(status.Status) if "Status" in status else -1)
        finally:
            assoc.release()
        return statuses


@pytest.fixture
def scu_for() -> Callable[..., Scu]:
    return Scu
