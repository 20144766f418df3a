"""The Storage SCP against a real pynetdicom SCU: statuses, bytes on disk, rows, audit."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_file_meta_info, read_preamble
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy import select

from harness.data.ctdata import SeriesSpec, ct_dataset, write_series
from harness.dcmtk import dcmtk
from harness.peers.dicom import Scu
from service.db.tables import AuditEvent, Instance, Series
from service.dicom.runner import IngestNode
from service.dicom.scp import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SUCCESS,
)
from service.ingest.bookkeeper import EVENT_ASSOCIATION, EVENT_DUPLICATE_CONFLICT

pytestmark = pytest.mark.usefixtures("raw_files")


def dataset_bytes(path_or_bytes: Path | bytes) -> bytes:
    """The bytes after the file meta: what travelled in the C-STORE."""
    raw = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return raw[fp.tell():]


def flushed(node: IngestNode) -> IngestNode:
    assert node.bookkeeper is not None and node.bookkeeper.flush()
    return node


def audit(node: IngestNode, event_type: str) -> list[AuditEvent]:
    assert node.session_factory is not None
    with node.session_factory() as session:
        return list(session.execute(select(AuditEvent).where(AuditEvent.event_type == event_type)
                                    .order_by(AuditEvent.id)).scalars())


def instances(node: IngestNode) -> list[Instance]:
    assert node.session_factory is not None
    with node.session_factory() as session:
        return list(session.execute(select(Instance).order_by(Instance.id)).scalars())


def test_echo_and_store_as_received(start_node: Callable[..., IngestNode], tmp_path: Path,
                                    scu_for: Callable[..., Scu]) -> None:
    node = start_node()
    written = write_series(tmp_path / "in", SeriesSpec(slices=5))
    scu = scu_for(node.scp.port)  # type: ignore[union-attr]
    assoc = scu.associate([("1.2.840.10008.1.1", ExplicitVRLittleEndian)])
    assert assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    assert scu.store(written.paths) == [STATUS_SUCCESS] * 5
    flushed(node)
    rows = instances(node)
    assert [r.sop_instance_uid for r in rows] == written.sop_uids
    for row, source in zip(rows, written.paths, strict=True):
        stored = node.spool.path(row.spool_path).read_bytes()  # type: ignore[union-attr]
        assert dataset_bytes(stored) == dataset_bytes(source)
        assert row.calling_ae == "TESTSCU" and row.transfer_syntax_uid == ExplicitVRLittleEndian
        meta = dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle == "TESTSCU"
        assert meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert meta.MediaStorageSOPClassUID == CTImageStorage
        assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    (event,) = audit(node, EVENT_ASSOCIATION)[-1:]
    assert event.details["instances"] == 5 and event.details["ended"] == "released"
    assert event.actor == "TESTSCU" and event.source_ip == "127.0.0.1"
    assert event.details["bytes"] == sum(r.size_bytes for r in rows)


def _compressed_inputs(tmp_path: Path) -> list[tuple[str, Path, np.ndarray]]:
    """(label, file, expected pixels) for each transfer syntax we can produce here."""
    out = []
    spec = SeriesSpec(rows=32, columns=32)
    for label, syntax in (("rle", RLELossless), ("jpeg-ls", JPEGLSLossless),
                          ("jpeg2000", JPEG2000Lossless)):
        ds = ct_dataset(spec, 1)
        expected = ds.pixel_array.copy()
        ds.compress(syntax)
        path = tmp_path / f"{label}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((label, path, expected))
    for label, syntax in (("deflated", DeflatedExplicitVRLittleEndian),
                          ("implicit", ImplicitVRLittleEndian)):
        ds = ct_dataset(spec, 2)
        expected = ds.pixel_array.copy()
        ds.file_meta.TransferSyntaxUID = syntax
        path = tmp_path / f"{label}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append((label, path, expected))
    dcmcjpeg = dcmtk("dcmcjpeg")
    if dcmcjpeg:
        for index, (label, flag) in enumerate((("jpeg-lossless-sv1", "+e1"),
                                               ("jpeg-lossless-p14", "+el"))):
            plain = tmp_path / f"plain16-{index}.dcm"
            ds = ct_dataset(spec, 3 + index)
            ds.save_as(plain, enforce_file_format=True)
            path = tmp_path / f"{label}.dcm"
            subprocess.run([dcmcjpeg, flag, str(plain), str(path)], check=True)
            out.append((label, path, ds.pixel_array.copy()))
        u8 = ct_dataset(spec, 6, with_pixels=False)
        u8.BitsAllocated, u8.BitsStored, u8.HighBit, u8.PixelRepresentation = 8, 8, 7, 0
        u8.PixelData = (np.arange(32 * 32) % 256).astype(np.uint8).tobytes()
        plain8 = tmp_path / "plain8.dcm"
        u8.save_as(plain8, enforce_file_format=True)
        path = tmp_path / "jpeg-baseline.dcm"
        subprocess.run([dcmcjpeg, "+eb", str(plain8), str(path)], check=True)
        out.append(("jpeg-baseline", path, dcmread(path).pixel_array.copy()))
    return out


def test_compressed_transfer_syntaxes_stored_byte_for_byte(
        start_node: Callable[..., IngestNode], tmp_path: Path,
        scu_for: Callable[..., Scu]) -> None:
    node = start_node()
    inputs = _compressed_inputs(tmp_path)
    if not dcmtk("dcmcjpeg"):
        pytest.skip("DCMTK dcmcjpeg absent: JPEG baseline/lossless inputs cannot be made")
    statuses = scu_for(node.scp.port).store([path for _, path, _ in inputs])  # type: ignore[union-attr]
    assert statuses == [STATUS_SUCCESS] * len(inputs)
    flushed(node)
    by_sop = {row.sop_instance_uid: row for row in instances(node)}
    for label, path, expected in inputs:
        source = dcmread(path)
        row = by_sop[str(source.SOPInstanceUID)]
        stored_path = node.spool.path(row.spool_path)  # type: ignore[union-attr]
        assert dataset_bytes(stored_path) == dataset_bytes(path), label
        stored = dcmread(stored_path)
        assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID, label
        assert row.transfer_syntax_uid == str(source.file_meta.TransferSyntaxUID)
        if label != "jpeg-baseline":  # lossless: the very same pixels
            assert np.array_equal(stored.pixel_array, expected), label


def test_bad_input_gets_failure_status_and_the_scp_keeps_serving(
        start_node: Callable[..., IngestNode], tmp_path: Path,
        scu_for: Callable[..., Scu]) -> None:
    node = start_node()
    good = write_series(tmp_path / "good", SeriesSpec(slices=3))
    scu = scu_for(node.scp.port)  # type: ignore[union-attr]
    meta_end = 132 + 12 + int(read_file_meta_info(good.paths[0]).FileMetaInformationGroupLength)
    head = good.paths[0].read_bytes()[:meta_end]
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(head + b"this is not a DICOM dataset \x00\xff" * 40)
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.paths[1].read_bytes()[:-1000])
    no_pixels = ct_dataset(good.spec, 9, with_pixels=False)
    no_pixels_path = tmp_path / "nopixels.dcm"
    no_pixels.save_as(no_pixels_path, enforce_file_format=True)
    statuses = scu.store([garbage, truncated, no_pixels_path])
    assert statuses == [STATUS_CANNOT_UNDERSTAND, STATUS_CANNOT_UNDERSTAND,
                        STATUS_DATASET_MISMATCH]
    # The next association is served normally.
    assert scu.store(good.paths) == [STATUS_SUCCESS] * 3
    flushed(node)
    assert len(instances(node)) == 3
    assert len(list(node.spool.root.rglob("*.dcm"))) == 3  # type: ignore[union-attr]
    failing = audit(node, EVENT_ASSOCIATION)[0]
    assert failing.outcome == "warning"
    assert failing.details["failures"] == {"0xC210": 2, "0xA900": 1}


@pytest.mark.parametrize("overrides,calling,called,reason", [
    ({"allowed_calling_aes": "MODALITY1,PACS"}, "UNKNOWN_AE", "CSPINE_TRIAGE",
     "CALLING_AE_NOT_ALLOWED"),
    ({}, "TESTSCU", "SOMEONE_ELSE", "CALLED_AE_UNKNOWN"),
    ({"allowed_networks": "10.0.0.0/8,192.168.0.0/16"}, "TESTSCU", "CSPINE_TRIAGE",
     "ADDRESS_NOT_ALLOWED"),
])
def test_access_rejections_are_proper_and_audited(
        start_node: Callable[..., IngestNode], scu_for: Callable[..., Scu],
        overrides: dict[str, str], calling: str, called: str, reason: str) -> None:
    node = start_node(**overrides)
    assoc = scu_for(node.scp.port, calling=calling, called=called).associate(  # type: ignore[union-attr]
        [(CTImageStorage, ExplicitVRLittleEndian)])
    assert assoc.is_rejected and not assoc.is_established
    rejection = assoc.acceptor.primitive
    assert rejection.result == 1 and rejection.result_source == 1
    assert rejection.diagnostic == {"CALLING_AE_NOT_ALLOWED": 3, "CALLED_AE_UNKNOWN": 7,
                                    "ADDRESS_NOT_ALLOWED": 1}[reason]
    flushed(node)
    (event,) = audit(node, EVENT_ASSOCIATION)
    assert event.outcome == "failure" and event.details["reason"] == reason
    assert event.actor == calling and event.source_ip == "127.0.0.1"
    # An allowed peer still gets in.
    if overrides.get("allowed_calling_aes"):
        ok = scu_for(node.scp.port, calling="PACS").associate(  # type: ignore[union-attr]
            [(CTImageStorage, ExplicitVRLittleEndian)])
        assert ok.is_established
        ok.release()


def test_spool_below_reserve_answers_out_of_resources(
        start_node: Callable[..., IngestNode], tmp_path: Path,
        scu_for: Callable[..., Scu]) -> None:
    node = start_node(spool_min_free_mb=1 << 40)
    written = write_series(tmp_path / "in", SeriesSpec(slices=2))
    assert scu_for(node.scp.port).store(written.paths) == [STATUS_OUT_OF_RESOURCES] * 2  # type: ignore[union-attr]
    flushed(node)
    assert instances(node) == []
    assert audit(node, EVENT_ASSOCIATION)[0].details["failures"] == {"0xA700": 2}


def test_full_or_read_only_spool_answers_out_of_resources(
        start_node: Callable[..., IngestNode], tmp_path: Path,
        scu_for: Callable[..., Scu]) -> None:
    from tests.unit.ingest.test_spool import tmpfs

    written = write_series(tmp_path / "in", SeriesSpec(slices=6, rows=128, columns=128))
    size = written.paths[0].stat().st_size
    with tmpfs(tmp_path / "small", f"size={size * 3 + 16384}") as mount:
        node = start_node(spool_dir=mount / "spool")
        statuses = scu_for(node.scp.port).store(written.paths)  # type: ignore[union-attr]
        assert STATUS_OUT_OF_RESOURCES in statuses
        successes = [p for p, s in zip(written.paths, statuses, strict=True)
                     if s == STATUS_SUCCESS]
        assert successes and statuses[:len(successes)] == [STATUS_SUCCESS] * len(successes)
        flushed(node)
        # Every instance that got Success is on disk, complete; nothing else is.
        on_disk = sorted(node.spool.root.rglob("*.dcm"))  # type: ignore[union-attr]
        assert len(on_disk) == len(successes) == len(instances(node))
        assert all(dataset_bytes(p) for p in on_disk)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        more = write_series(tmp_path / "more", SeriesSpec(slices=1, rows=8, columns=8))
        assert scu_for(node.scp.port).store(more.paths) == [STATUS_OUT_OF_RESOURCES]  # type: ignore[union-attr]
        node.stop(grace_s=2)


def test_duplicates_same_bytes_once_different_bytes_both_kept(
        start_node: Callable[..., IngestNode], scu_for: Callable[..., Scu]) -> None:
    node = start_node()
    spec = SeriesSpec(rows=16, columns=16)
    first = ct_dataset(spec, 0, sop_uid="1.2.826.0.1.3680043.10.1455.77.1")
    altered = ct_dataset(spec, 0, sop_uid="1.2.826.0.1.3680043.10.1455.77.1")
    altered.PixelData = bytes(len(altered.PixelData))
    scu = scu_for(node.scp.port)  # type: ignore[union-attr]
    assert scu.store([first, first, altered, altered]) == [STATUS_SUCCESS] * 4
    flushed(node)
    rows = instances(node)
    assert len(rows) == 2 and all(r.duplicate_conflict for r in rows)
    with node.session_factory() as session:  # type: ignore[union-attr]
        assert session.execute(select(Series.instance_count)).scalar_one() == 1
    (conflict,) = audit(node, EVENT_DUPLICATE_CONFLICT)
    assert conflict.details["sop_instance_uid"] == "1.2.826.0.1.3680043.10.1455.77.1"
    (assoc_event,) = audit(node, EVENT_ASSOCIATION)
    assert assoc_event.details["duplicates"] == 2 and assoc_event.details["conflicts"] == 1


def test_mpps_completed_completes_the_series(start_node: Callable[..., IngestNode],
                                            tmp_path: Path,
                                            scu_for: Callable[..., Scu]) -> None:
    from pydicom.sequence import Sequence as Seq
    from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

    from service.ingest.tracker import Tracker

    # Long idle times: only the MPPS can complete this series during the test.
    node = start_node(completion_idle_after_release_s=3600, completion_idle_s=3600)
    written = write_series(tmp_path / "in", SeriesSpec(slices=6))
    scu = scu_for(node.scp.port)  # type: ignore[union-attr]
    assert scu.store(written.paths) == [STATUS_SUCCESS] * 6
    assoc = scu.associate([(ModalityPerformedProcedureStep, ExplicitVRLittleEndian)])
    create = Dataset()
    create.PerformedProcedureStepStatus = "IN PROGRESS"
    scheduled = Dataset()
    scheduled.StudyInstanceUID = written.spec.study_uid
    create.ScheduledStepAttributesSequence = Seq([scheduled])
    status, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, "1.2.3.4.5.6.7")
    assert status.Status == 0
    final = Dataset()
    final.PerformedProcedureStepStatus = "COMPLETED"
    series_item = Dataset()
    series_item.SeriesInstanceUID = written.spec.series_uid
    refs = []
    for uid in written.sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series_item.ReferencedImageSequence = Seq(refs)
    final.PerformedSeriesSequence = Seq([series_item])
    status, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, "1.2.3.4.5.6.7")
    assert status.Status == 0
    status, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, "1.2.3.4.5.6.7")
    assert status.Status == 0x0110  # a completed step cannot change
    status, _ = assoc.send_n_set(final, ModalityPerformedProcedureStep, "1.2.3.999")
    assert status.Status == 0x0112
    assoc.release()
    flushed(node)
    tracker = Tracker(node.session_factory, node.settings, node.spool)  # type: ignore[arg-type]
    report = tracker.tick()
    assert len(report.completed) == 1
    with node.session_factory() as session:  # type: ignore[union-attr]
        series = session.execute(select(Series)).scalar_one()
        assert series.completion_reason == "mpps" and series.qualified


def test_tls_with_client_certificates(start_node: Callable[..., IngestNode], tmp_path: Path,
                                      scu_for: Callable[..., Scu]) -> None:
    import ssl

    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("openssl command absent: cannot make test certificates")
    pki = tmp_path / "pki"
    pki.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=pki, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=test-ca")
    (pki / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
    node = start_node(tls_enabled=True, tls_cert_file=pki / "server.pem",
                      tls_key_file=pki / "server.key", tls_ca_file=pki / "ca.pem")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    client.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
    written = write_series(tmp_path / "in", SeriesSpec(slices=2))
    scu = scu_for(node.scp.port, tls_args=(client, "localhost"))  # type: ignore[union-attr]
    assert scu.store(written.paths) == [STATUS_SUCCESS] * 2
    flushed(node)
    assert audit(node, EVENT_ASSOCIATION)[0].details["tls"] is True
    # Without a client certificate, or without TLS at all, nobody gets in.
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    for tls_args in ((anonymous, "localhost"), None):
        assoc = scu_for(node.scp.port, tls_args=tls_args).associate(  # type: ignore[union-attr]
            [(CTImageStorage, ExplicitVRLittleEndian)])
        assert not assoc.is_established
