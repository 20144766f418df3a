"""The C-STORE path on byte-mutated datasets: the walk, the handler, a real association.

Every mutation either yields keys or ``UndecodableDataset`` (the walk), a proper DIMSE status
(the handler: 0x0000 only for what is storable, never 0xC211), and only a Success leaves a
file in the spool; a real SCP answers each hostile C-STORE and keeps serving.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import example, given
from hypothesis import strategies as st

from harness.fuzz import (
    MIB,
    Mutation,
    check_network_store,
    check_scan,
    check_store_handler,
    deflate_bomb,
    mutations,
)
from service.dicom.runner import IngestNode
from service.dicom.scp import StorageSCP

from .conftest import fuzz


@fuzz(300)
@given(mutations())
@example(deflate_bomb())  # found: inflated whole before the bound
def test_scan_dataset_keys_or_undecodable(mutation: Mutation) -> None:
    check_scan(mutation, max_inflated_bytes=MIB)


@fuzz(200)
@given(mutations())
@example(deflate_bomb())
def test_store_handler_answers_a_status_and_spools_only_successes(
        scp_in_process: StorageSCP, mutation: Mutation) -> None:
    check_store_handler(scp_in_process, mutation)


@fuzz(6)
@given(st.lists(mutations(), min_size=4, max_size=10))
def test_real_scp_answers_every_hostile_dataset_and_keeps_serving(
        scp_node: IngestNode, tmp_path_factory: object, batch: list[Mutation]) -> None:
    assert scp_node.scp is not None and scp_node.spool is not None
    workdir = Path(scp_node.settings.data_dir) / "outgoing"
    check_network_store(scp_node.scp.port, batch, workdir, Path(scp_node.spool.root))
