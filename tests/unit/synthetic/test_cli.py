"""``triage demo generate`` and ``triage demo send`` against a real pynetdicom SCP."""

from __future__ import annotations

import csv
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from service.cli import main
from service.synthetic import TransferSyntax, WriterOptions, write_series
from tests.unit.synthetic.conftest import small_phantom

SMALL_ARGS = ["--matrix", "96", "--n-slices", "16"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Receiver:
    """A Storage SCP that keeps what it receives in memory (test double for our SCP)."""

    def __init__(self, compressed: bool = True) -> None:
        self.received: list[pydicom.Dataset] = []
        self.calling: set[str] = set()
        self.associations = 0
        self.lock = threading.Lock()
        self.ae = AE(ae_title="TEST_SCP")
        syntaxes = None if compressed else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        for cx in AllStoragePresentationContexts:
            if syntaxes is None:
                self.ae.add_supported_context(cx.abstract_syntax, ALL_SYNTAXES)
            else:
                self.ae.add_supported_context(cx.abstract_syntax, syntaxes)
        self.ae.add_supported_context(Verification)
        self.port = _free_port()

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
            self.calling.add(event.assoc.requestor.ae_title)
        return 0x0000

    def _accepted(self, event: evt.Event) -> None:
        with self.lock:
            self.associations += 1

    def __enter__(self) -> Receiver:
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_ACCEPTED, self._accepted)])
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


ALL_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] + [
    TransferSyntax(t).uid for t in ("deflated", "jpeg-lossless", "jpeg-ls", "jpeg2000", "rle")]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_demo_generate_series_layout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "generate", "--studies", "2", "--seed", "40", "--out", str(tmp_path),
               "--fracture-rate", "1.0", "--localizer", "--non-ct", *SMALL_ARGS])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["studies"] == 2
    with (tmp_path / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        study = tmp_path / row["StudyInstanceUID"]
        assert {p.name for p in study.iterdir()} == {"ct", "localizer", "non_ct"}
        assert len(list((study / "ct").glob("*.dcm"))) == 16
        flags = [int(row[v]) for v in ("C1", "C2", "C3", "C4", "C5", "C6", "C7")]
        assert int(row["patient_overall"]) == int(any(flags))
        assert (row["fractures"] != "") == bool(int(row["patient_overall"]))


def test_demo_generate_rsna_layout(tmp_path: Path) -> None:
    rc = main(["demo", "generate", "--studies", "2", "--seed", "7", "--out", str(tmp_path),
               "--layout", "rsna", *SMALL_ARGS])
    assert rc == 0
    for name in ("train.csv", "train_bounding_boxes.csv", "synthetic_lesions.csv"):
        assert (tmp_path / name).is_file()
    assert len(list((tmp_path / "segmentations").glob("*.nii"))) == 2
    assert len(list((tmp_path / "train_images").iterdir())) == 2


def test_demo_send_over_several_associations(tmp_path: Path, receiver: Receiver,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    p = small_phantom(n_slices=10)
    write_series(p, tmp_path / "a", WriterOptions(transfer_syntax=TransferSyntax.JPEG_LS_LOSSLESS))
    write_series(p, tmp_path / "b", WriterOptions(series_number=7))
    rc = main(["demo", "send", str(tmp_path), "--host", "127.0.0.1", "--port",
               str(receiver.port), "--ae-title", "TEST_SCP", "--calling-ae", "MODALITY1",
               "--associations", "3"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and out["sent"] == 20 and out["failed"] == 0
    assert receiver.associations == 3 and receiver.calling == {"MODALITY1"}
    syntaxes = {str(d.file_meta.TransferSyntaxUID) for d in receiver.received}
    assert TransferSyntax.JPEG_LS_LOSSLESS.uid in syntaxes  # sent as stored


def test_demo_send_decompresses_when_the_scp_refuses_compression(tmp_path: Path) -> None:
    p = small_phantom(n_slices=6)
    write_series(p, tmp_path, WriterOptions(transfer_syntax=TransferSyntax.JPEG_2000_LOSSLESS))
    with Receiver(compressed=False) as receiver:
        rc = main(["demo", "send", str(tmp_path), "--port", str(receiver.port),
                   "--ae-title", "TEST_SCP", "--per-series"])
        assert rc == 0
        assert len(receiver.received) == 6
        for ds in receiver.received:
            assert not ds.file_meta.TransferSyntaxUID.is_compressed
            k = int(round((float(ds.ImagePositionPatient[2]) - p.origin[2]) / p.spacing[0]))
            hu = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)
            assert np.array_equal(hu, p.hu[k])


def test_demo_send_reports_an_unreachable_scp(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    p = small_phantom(n_slices=4)
    write_series(p, tmp_path)
    rc = main(["demo", "send", str(tmp_path), "--port", str(_free_port()), "--ae-title", "X",
               "--timeout", "3"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and out["failed"] == 4 and out["sent"] == 0
