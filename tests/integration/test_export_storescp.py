"""C-STORE export against DCMTK storescp (a real peer): transfer-syntax fallback, state
machine per object and destination, audit, permanent vs transient failures, TLS."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from harness.peers.dicom import storescp
from harness.process import free_port
from service.config import PacsDestination, SegEncoding, SegFormat
from service.db.tables import Analysis, ExportState
from service.dicom.scu import ExportError, export_analysis, send_files
from service.results.uids import ObjectKind
from tests.integration.export_support import analysed_study, audit_events, export_rows


def test_sr_and_seg_reach_storescp_with_explicit_fallback(tmp_path: Path, migrated_url: str,
                                                          settings_factory) -> None:  # type: ignore[no-untyped-def]
    """storescp accepts only uncompressed syntaxes: the JPEG 2000 SEG is transcoded."""
    with storescp(tmp_path / "scp") as scp:
        settings = settings_factory(
            database_url=migrated_url, seg_encoding=SegEncoding.JPEG2000,
            pacs_destinations=[PacsDestination(name="dcmtk", ae_title=scp.ae_title,
                                               host="127.0.0.1", port=scp.port)],
            export_retry_backoff_s=0)
        study = analysed_study(settings, migrate_db=False)
        assert study.stored[ObjectKind.SEG].transfer_syntax_uid == JPEG2000Lossless
        summary = export_analysis(study.session_factory, study.analysis_id, settings)
        received = scp.received()
    assert summary.all_sent, summary.states
    rows = export_rows(study.session_factory, study.analysis_id)
    assert {(r.object_kind, r.state) for r in rows} == {("SEG", ExportState.SENT),
                                                        ("SR", ExportState.SENT)}
    assert all(r.attempts == 1 and r.sent_at is not None and r.last_error is None for r in rows)

    by_uid = {dcmread(p).SOPInstanceUID: p for p in received}
    seg_uid = study.stored[ObjectKind.SEG].sop_instance_uid
    assert set(by_uid) == {seg_uid, study.stored[ObjectKind.SR].sop_instance_uid}
    seg_received = dcmread(by_uid[seg_uid])
    assert seg_received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    original = dcmread(study.stored[ObjectKind.SEG].path)
    np.testing.assert_array_equal(seg_received.pixel_array, original.pixel_array)

    events = audit_events(study.session_factory)
    assert [e.event_type for e in events] == ["export.sent", "export.sent"]
    assert {e.details["sop_instance_uid"] for e in events if e.details} == {
        seg_uid, study.stored[ObjectKind.SR].sop_instance_uid}
    assert all(e.study_instance_uid == study.case.volume.study_instance_uid for e in events)
    with study.session_factory() as session:
        analysis = session.get(Analysis, study.analysis_id)
        assert analysis is not None and analysis.exported_at is not None


def test_refused_destination_goes_retrying_then_failed(tmp_path: Path, sqlite_url: str,
                                                       settings_factory) -> None:  # type: ignore[no-untyped-def]
    port = free_port()  # nothing listens there: connection refused
    settings = settings_factory(
        database_url=sqlite_url,
        pacs_destinations=[PacsDestination(name="down", ae_title="NOBODY", host="127.0.0.1",
                                           port=port)],
        export_max_retries=3, export_retry_backoff_s=2, export_timeout_s=2)
    study = analysed_study(settings)
    seen: list[tuple[float, set[ExportState]]] = []

    def sleep(seconds: float) -> None:  # observe the rows while "waiting"
        seen.append((seconds, {r.state for r in export_rows(study.session_factory,
                                                             study.analysis_id)}))

    summary = export_analysis(study.session_factory, study.analysis_id, settings, sleep=sleep)
    assert not summary.all_sent
    assert seen == [(2.0, {ExportState.RETRYING}), (4.0, {ExportState.RETRYING})]
    rows = export_rows(study.session_factory, study.analysis_id)
    assert {r.state for r in rows} == {ExportState.FAILED}
    assert all(r.attempts == 3 for r in rows)
    assert all("down" in (r.last_error or "") for r in rows)
    types = [e.event_type for e in audit_events(study.session_factory)]
    assert types.count("export.retrying") == 4 and types.count("export.failed") == 2
    failed = [e for e in audit_events(study.session_factory) if e.event_type == "export.failed"]
    assert all(e.outcome == "failure" and e.details and e.details["error"] for e in failed)


def test_rejected_association_fails_without_retry(tmp_path: Path, sqlite_url: str,
                                                  settings_factory) -> None:  # type: ignore[no-untyped-def]
    """storescp --refuse answers A-ASSOCIATE-RJ (rejected permanent) and closes at once. The
    close can overtake the RJ on loopback (the unread RJ is lost to the reset), which we can
    only see as a transient failure: hence a few tries below, and, for the export, "no retry
    after a permanent rejection" rather than exactly one try."""
    with storescp(tmp_path / "scp", extra_args=("--refuse",)) as scp:
        settings = settings_factory(
            database_url=sqlite_url, export_max_retries=5, export_retry_backoff_s=0,
            pacs_destinations=[PacsDestination(ae_title=scp.ae_title, host="127.0.0.1",
                                               port=scp.port)])
        study = analysed_study(settings)
        errors: list[ExportError] = []
        for _ in range(3):
            with pytest.raises(ExportError) as info:
                send_files(settings.pacs_destinations[0], [study.stored[ObjectKind.SR].path],
                           settings=settings)
            errors.append(info.value)
            if not info.value.transient:
                break
        assert "rejected (Rejected Permanent" in str(errors[-1]), [str(e) for e in errors]
        assert not errors[-1].transient
        export_analysis(study.session_factory, study.analysis_id, settings,
                        sleep=lambda s: None)
    rows = export_rows(study.session_factory, study.analysis_id)
    assert {r.state for r in rows} == {ExportState.FAILED}
    assert all("rejected" in (r.last_error or "") for r in rows), [r.last_error for r in rows]
    # A permanent rejection is final: no retry ever follows one. (Earlier tries may lose the
    # RJ to the reset and read as transient, so the attempt count alone can reach the limit:
    # it did once on an idle CI machine, 5 of 5.)
    retried = [e for e in audit_events(study.session_factory)
               if e.event_type == "export.retrying"]
    assert retried or all(r.attempts == 1 for r in rows)
    assert not any("Rejected Permanent" in str((e.details or {}).get("error")) for e in retried), \
        [(e.details or {}).get("error") for e in retried]


def test_labelmap_seg_refused_by_peer_fails_alone(tmp_path: Path, sqlite_url: str,
                                                  settings_factory) -> None:  # type: ignore[no-untyped-def]
    """DCMTK 3.6.7 does not know Label Map Segmentation Storage: that object fails at once
    (permanent), the SR in the same association still arrives."""
    with storescp(tmp_path / "scp") as scp:
        settings = settings_factory(
            database_url=sqlite_url, export_max_retries=3, export_retry_backoff_s=0,
            pacs_destinations=[PacsDestination(ae_title=scp.ae_title, host="127.0.0.1",
                                               port=scp.port, seg_format=SegFormat.LABELMAP)])
        study = analysed_study(settings)
        export_analysis(study.session_factory, study.analysis_id, settings,
                        sleep=lambda s: None)
        received = {dcmread(p).SOPInstanceUID for p in scp.received()}
    states = {r.object_kind: r for r in export_rows(study.session_factory, study.analysis_id)}
    assert states["SR-LABELMAP"].state is ExportState.SENT
    assert states["SEG-LABELMAP"].state is ExportState.FAILED
    assert states["SEG-LABELMAP"].attempts == 1
    assert "presentation context" in (states["SEG-LABELMAP"].last_error or "")
    assert received == {study.stored[ObjectKind.SR_LABELMAP].sop_instance_uid}


def _make_certificate(directory: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl absent (Debian package openssl)")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return key, cert


def test_tls_destination(tmp_path: Path, sqlite_url: str, settings_factory) -> None:  # type: ignore[no-untyped-def]
    key, cert = _make_certificate(tmp_path)
    with storescp(tmp_path / "scp", extra_args=("+tls", str(key), str(cert), "-ic")) as scp:
        settings = settings_factory(
            database_url=sqlite_url, tls_ca_file=cert, export_retry_backoff_s=0,
            export_max_retries=1,
            pacs_destinations=[PacsDestination(ae_title=scp.ae_title, host="127.0.0.1",
                                               port=scp.port, tls=True)])
        study = analysed_study(settings)
        summary = export_analysis(study.session_factory, study.analysis_id, settings)
        assert summary.all_sent, export_rows(study.session_factory, study.analysis_id)[0].last_error
        assert len(scp.received()) == 2
        # Without the CA the peer's self-signed certificate is not trusted: no plain fallback.
        untrusting = settings_factory(database_url=sqlite_url, export_timeout_s=5,
                                      pacs_destinations=settings.pacs_destinations)
        with pytest.raises(ExportError):
            send_files(untrusting.pacs_destinations[0], [study.stored[ObjectKind.SR].path],
                       settings=untrusting)
