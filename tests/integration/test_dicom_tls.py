"""DICOM over TLS in both directions with DCMTK, mutual TLS and verified certificates.

In: DCMTK ``storescu +tls`` sends to ``triage scp`` (a real process) configured with TLS and
a client CA; a peer without a certificate from that CA, a peer that does not trust ours, and a
peer without TLS are all refused. Out: our C-STORE SCU sends results to DCMTK ``storescp
+tls`` that requires *our* client certificate (``-rc``, DCMTK's default) and presents one we
verify. The certificates come from a throwaway CA made by the test (harness.pki).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.dicom import ScpProcess, storescp, storescu
from harness.pki import Pki, make_pki
from harness.process import free_port, wait_until
from service.config import PacsDestination
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import AuditEvent, Instance
from service.dicom.scu import ExportError, send_files
from service.ingest.bookkeeper import EVENT_ASSOCIATION


def _scp_env(tmp_path: Path, url: str, port: int, pki: Pki) -> dict[str, str]:
    return {"TRIAGE_DATA_DIR": str(tmp_path / "var"), "TRIAGE_DATABASE_URL": url,
            "TRIAGE_DICOM_HOST": "127.0.0.1", "TRIAGE_DICOM_PORT": str(port),
            "TRIAGE_SPOOL_MIN_FREE_MB": "0", "TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0",
            "TRIAGE_BROKER_CONNECT_TIMEOUT_S": "0.3",
            "TRIAGE_TLS_ENABLED": "true", "TRIAGE_TLS_CERT_FILE": str(pki.server_cert),
            "TRIAGE_TLS_KEY_FILE": str(pki.server_key), "TRIAGE_TLS_CA_FILE": str(pki.ca)}


def test_storescu_over_tls_into_triage_scp(tmp_path: Path, sqlite_url: str) -> None:
    pki = make_pki(tmp_path / "pki")
    migrate.upgrade(sqlite_url)
    port = free_port()
    written = write_series(tmp_path / "in", SeriesSpec(slices=3))
    scp = ScpProcess(_scp_env(tmp_path, sqlite_url, port, pki), tmp_path,
                     tmp_path / "scp.log").start()
    try:
        # Mutual TLS: our client certificate, and the SCP's verified against the test CA.
        sent = storescu(port, written.paths, extra=("+tls", str(pki.client_key),
                                                    str(pki.client_cert), "+cf", str(pki.ca)))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        refused = {
            "no TLS": (),
            "TLS without a client certificate": ("+tla", "+cf", str(pki.ca)),
            "a client that does not trust the SCP": ("+tls", str(pki.client_key),
                                                     str(pki.client_cert), "+cf",
                                                     str(pki.other_ca)),
        }
        for why, extra in refused.items():
            attempt = storescu(port, written.paths[:1], extra=extra, timeout_s=60)
            assert attempt.returncode != 0, (why, attempt.stdout + attempt.stderr)
        engine = make_engine(sqlite_url)
        factory = make_session_factory(engine)

        def stored() -> list[str]:
            with factory() as session:
                return list(session.execute(select(Instance.sop_instance_uid)).scalars())

        uids = wait_until(lambda: (found := stored()) and len(found) >= 3 and found, 90, 0.2,
                          "the three instances in the database")
        assert sorted(uids) == sorted(written.sop_uids)
        with factory() as session:
            events = list(session.execute(select(AuditEvent).where(
                AuditEvent.event_type == EVENT_ASSOCIATION)).scalars())
        engine.dispose()
        accepted = [e for e in events if e.outcome == "success"]
        assert len(accepted) == 1 and accepted[0].details["tls"] is True
        assert accepted[0].details["instances"] == 3
    finally:
        assert scp.stop() == 0


def test_results_to_storescp_over_mutual_tls(tmp_path: Path, settings_factory) -> None:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path / "pki")
    files = write_series(tmp_path / "out", SeriesSpec(slices=2)).paths
    with storescp(tmp_path / "scp", extra_args=("+tls", str(pki.server_key),
                                                str(pki.server_cert), "+cf",
                                                str(pki.ca))) as scp:
        destination = PacsDestination(ae_title=scp.ae_title, host="localhost",
                                      port=scp.port, tls=True)
        ours = settings_factory(tls_ca_file=pki.ca, tls_cert_file=pki.client_cert,
                                tls_key_file=pki.client_key, export_timeout_s=10)
        outcomes = send_files(destination, files, settings=ours)
        assert all(o.ok for o in outcomes), outcomes
        wait_until(lambda: len(scp.received()) == 2, 60, 0.2, "storescp to write both")
        # storescp requires a client certificate: without ours it refuses the association.
        anonymous = settings_factory(tls_ca_file=pki.ca, export_timeout_s=10)
        try:
            send_files(destination, files[:1], settings=anonymous)
        except ExportError:
            pass
        else:
            raise AssertionError("storescp accepted a client without a certificate")
        # And we refuse a peer whose certificate our CA did not sign.
        distrustful = settings_factory(tls_ca_file=pki.other_ca, tls_cert_file=pki.client_cert,
                                       tls_key_file=pki.client_key, export_timeout_s=10)
        try:
            send_files(destination, files[:1], settings=distrustful)
        except ExportError:
            # pynetdicom logs the handshake's CERTIFICATE_VERIFY_FAILED and reports an abort;
            # what matters here is that nothing was sent.
            pass
        else:
            raise AssertionError("a peer with an untrusted certificate got our results")
        assert len(scp.received()) == 2
