"""HL7 ORU over MLLP (plain and TLS) and the signed https webhook, against small real
socket/HTTP peers in threads, with certificates from a throwaway CA (harness.pki)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import hl7
import pytest
from pydantic import ValidationError

from harness.pki import Pki, make_pki
from harness.process import free_port
from service.config import Settings
from service.worklist.notify import (
    MLLP_END,
    MLLP_START,
    SIGNATURE_HEADER,
    Notification,
    NotifyError,
    build_oru,
    mllp_ssl_context,
    notify,
    send_mllp,
)

NOTE = Notification(
    study_instance_uid="1.2.3.4", priority="STAT", reason="fracture suspected: C2 (p=0.93)",
    patient_suspected=True, patient_probability=0.93,
    flagged_at=datetime(2024, 5, 1, 8, 30, tzinfo=UTC), accession_number="ACC|1",
    patient_id="P1", patient_name="DOE^JANE", suspected_vertebrae=["C2"], model_version="1.0.0")


class MllpPeer:
    """Accepts MLLP connections, records messages, answers with the given ACK code."""

    def __init__(self, ack_code: str = "AA", ssl_context: ssl.SSLContext | None = None,
                 host: str = "127.0.0.1") -> None:
        self.ack_code = ack_code
        self.ssl_context = ssl_context
        self.messages: list[str] = []
        self.handshake_errors: list[str] = []
        self.server = socket.create_server((host, 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            if self.ssl_context is not None:
                conn.settimeout(10)
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    self.handshake_errors.append(str(exc))
                    conn.close()
                    continue
            with conn:
                data = b""
                while MLLP_END not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    data += chunk
                if MLLP_END not in data:
                    continue
                message = data.strip(MLLP_START).split(MLLP_END)[0].decode()
                self.messages.append(message)
                control = str(hl7.parse(message).segment("MSH")[10])
                ack = (f"MSH|^~\\&|RIS||CSPINE_TRIAGE||20240501||ACK|A1|P|2.5\r"
                       f"MSA|{self.ack_code}|{control}")
                conn.sendall(MLLP_START + ack.encode() + MLLP_END)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def mllp_peer() -> Iterator[MllpPeer]:
    peer = MllpPeer()
    yield peer
    peer.close()


def test_oru_is_well_formed_and_coded() -> None:
    message = hl7.parse(build_oru(NOTE, control_id="42"))
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(message.segment("PID")[3]) == "P1"
    assert str(message.segment("PID")[5]) == "DOE^JANE"  # family^given, as in DICOM
    obr = message.segment("OBR")
    assert str(obr[3]) == "ACC|1".replace("|", "\\F\\")  # escaped, kept in one field
    assert str(obr[25]) == "F"
    obx = message.segments("OBX")
    assert str(obx[0][3]) == "72704001^Fracture^SCT" and str(obx[0][5]) == "52101004^Present^SCT"
    assert str(obx[1][3]) == "122157^Probability^DCM" and str(obx[1][5]) == "0.930"
    assert [str(s[1]) for s in obx] == ["1", "2", "3", "4", "5"]
    assert str(obx[2][5]) == "STAT"


def test_dicom_person_names_become_xpn_components() -> None:
    import dataclasses

    def pid5(name: str | None) -> str:
        note = dataclasses.replace(NOTE, patient_name=name)
        return str(hl7.parse(build_oru(note, control_id="1")).segment("PID")[5])

    assert pid5("O'NEIL^MARY^ANN^DR^PHD") == "O'NEIL^MARY^ANN^PHD^DR"  # XPN: suffix, prefix
    assert pid5("YAMADA^TARO=山田^太郎") == "YAMADA^TARO"  # the alphabetic group only
    assert pid5("A|B&C^D") == "A\\F\\B\\T\\C^D"  # separators inside a component escaped
    assert pid5(None) == ""


def test_an_inconclusive_result_is_indeterminate_not_absent() -> None:
    import dataclasses

    from service.worklist.notify import webhook_payload

    note = dataclasses.replace(
        NOTE, priority="INCONCLUSIVE", patient_suspected=False, suspected_vertebrae=[],
        reason="inconclusive, not cleared: anatomy not plausible (LEVELS_OUT_OF_ORDER)",
        result="INCONCLUSIVE", inconclusive_reasons=["LEVELS_OUT_OF_ORDER",
                                                     "LEVEL_EXTENT_OUT_OF_RANGE:C5"])
    message = hl7.parse(build_oru(note, control_id="43"))
    obx = {str(s[3]).split("^")[0]: str(s[5]) for s in message.segments("OBX")}
    assert obx["72704001"].startswith("82334004^Indeterminate^SCT")
    assert obx["RESULT"] == "INCONCLUSIVE"
    assert obx["REASONS"] == "LEVELS_OUT_OF_ORDER, LEVEL_EXTENT_OUT_OF_RANGE:C5"
    assert obx["PRIORITY"] == "INCONCLUSIVE"
    payload = webhook_payload(note)
    assert payload["event"] == "study.inconclusive" and payload["result"] == "INCONCLUSIVE"
    assert payload["fracture_suspected"] is False
    assert payload["inconclusive_reasons"] == note.inconclusive_reasons
    assert webhook_payload(NOTE)["event"] == "study.flagged"


def test_mllp_delivery_and_nack(mllp_peer: MllpPeer) -> None:
    ack = send_mllp("127.0.0.1", mllp_peer.port, build_oru(NOTE, control_id="7"), timeout_s=5)
    assert "MSA|AA|7" in ack
    assert mllp_peer.messages[0].startswith("MSH|^~\\&|CSPINE_TRIAGE")
    mllp_peer.ack_code = "AE"
    with pytest.raises(NotifyError, match="ACK AE"):
        send_mllp("127.0.0.1", mllp_peer.port, build_oru(NOTE, control_id="8"), timeout_s=5)
    with pytest.raises(NotifyError):
        send_mllp("127.0.0.1", free_port(), build_oru(NOTE, control_id="9"), timeout_s=2)


class WebhookReceiver:
    """An https receiver (certificate from the test CA) that records bodies and headers."""

    def __init__(self, pki: Pki) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((body, dict(self.headers.items())))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://localhost:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def receiver(pki: Pki) -> Iterator[WebhookReceiver]:
    peer = WebhookReceiver(pki)
    yield peer
    peer.close()


def test_notify_all_channels(mllp_peer: MllpPeer, receiver: WebhookReceiver,
                             pki: Pki) -> None:
    settings = Settings(hl7_host="127.0.0.1", hl7_port=mllp_peer.port,
                        webhook_url=receiver.url, webhook_secret="hook-key",
                        webhook_ca_file=pki.ca, export_timeout_s=5)
    assert notify(NOTE, settings, control_id="100") == {"hl7": None, "webhook": None}
    ((body, headers),) = receiver.received
    payload = json.loads(body)
    assert payload["priority"] == "STAT" and payload["suspected_vertebrae"] == ["C2"]
    assert "patient_name" not in payload and "patient_id" not in payload
    # The receiver's check: HMAC-SHA256 of the raw body under the shared secret.
    expected = "sha256=" + hmac.new(b"hook-key", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
    forged = "sha256=" + hmac.new(b"other-key", body, hashlib.sha256).hexdigest()
    assert not hmac.compare_digest(headers[SIGNATURE_HEADER], forged)

    down = Settings(webhook_url=f"https://127.0.0.1:{free_port()}/hook",
                    webhook_secret="hook-key", export_timeout_s=2)
    outcome = notify(NOTE, down, control_id="101")
    assert outcome["webhook"] is not None


def test_webhook_is_verified_https(receiver: WebhookReceiver, pki: Pki) -> None:
    """A receiver whose certificate we cannot verify gets nothing (no fallback)."""
    untrusted = Settings(webhook_url=receiver.url, webhook_secret="k", export_timeout_s=5,
                         webhook_ca_file=pki.other_ca)
    outcome = notify(NOTE, untrusted, control_id="102")
    assert outcome["webhook"] is not None and "CERTIFICATE_VERIFY_FAILED" in outcome["webhook"]
    assert receiver.received == []


@pytest.mark.parametrize(("overrides", "message"), [
    ({"webhook_url": "http://ris.example/hook", "webhook_secret": "k"}, "must be https"),
    ({"webhook_url": "https://ris.example/hook"}, "needs webhook_secret"),
    ({"webhook_url": "https://ris.example/hook", "webhook_secret": ""}, "needs webhook_secret"),
])
def test_plain_or_unsigned_webhooks_are_refused(overrides: dict[str, object],
                                                message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)  # type: ignore[arg-type]
    # A developer's machine may use a plain local receiver.
    assert Settings(development_mode=True, **overrides).webhook_url  # type: ignore[arg-type]


def tls_peer(pki: Pki, *, client_ca: Path | None = None, host: str = "127.0.0.1") -> MllpPeer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if client_ca is not None:
        context.load_verify_locations(str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return MllpPeer(ssl_context=context, host=host)


def test_mllp_over_tls(pki: Pki) -> None:
    peer = tls_peer(pki)
    try:
        settings = Settings(hl7_host="localhost", hl7_port=peer.port, hl7_tls=True,
                            hl7_tls_ca_file=pki.ca, export_timeout_s=5)
        assert notify(NOTE, settings, control_id="200") == {"hl7": None}
        assert "DOE^JANE" in peer.messages[0]  # the name the TLS is there to protect

        # A peer we cannot verify, or one that is not the host we dialled: nothing is sent.
        wrong_ca = Settings(hl7_host="localhost", hl7_port=peer.port, hl7_tls=True,
                            hl7_tls_ca_file=pki.other_ca, export_timeout_s=5)
        error = notify(NOTE, wrong_ca, control_id="201")["hl7"]
        assert error is not None and "CERTIFICATE_VERIFY_FAILED" in error
        context = mllp_ssl_context(settings)
        assert context is not None
        elsewhere = tls_peer(pki, host="127.0.0.2")  # the certificate names 127.0.0.1
        try:
            with pytest.raises(NotifyError, match="IP address mismatch"):
                send_mllp("127.0.0.2", elsewhere.port, build_oru(NOTE, control_id="202"),
                          timeout_s=5, ssl_context=context)
            assert elsewhere.messages == []
        finally:
            elsewhere.close()
        # A plain client gets no ACK from a TLS peer.
        with pytest.raises(NotifyError):
            send_mllp("localhost", peer.port, build_oru(NOTE, control_id="203"), timeout_s=3)
        assert len(peer.messages) == 1
    finally:
        peer.close()


def test_mllp_tls_to_a_plain_peer_fails(mllp_peer: MllpPeer, pki: Pki) -> None:
    settings = Settings(hl7_host="localhost", hl7_port=mllp_peer.port, hl7_tls=True,
                        hl7_tls_ca_file=pki.ca, export_timeout_s=3)
    assert notify(NOTE, settings, control_id="210")["hl7"] is not None
    assert mllp_peer.messages == []


def test_mllp_mutual_tls(pki: Pki) -> None:
    peer = tls_peer(pki, client_ca=pki.ca)
    try:
        anonymous = Settings(hl7_host="localhost", hl7_port=peer.port, hl7_tls=True,
                             hl7_tls_ca_file=pki.ca, export_timeout_s=5)
        assert notify(NOTE, anonymous, control_id="300")["hl7"] is not None
        assert peer.messages == []
        with_cert = Settings(hl7_host="localhost", hl7_port=peer.port, hl7_tls=True,
                             hl7_tls_ca_file=pki.ca, hl7_tls_cert_file=pki.client_cert,
                             hl7_tls_key_file=pki.client_key, export_timeout_s=5)
        assert notify(NOTE, with_cert, control_id="301") == {"hl7": None}
        assert len(peer.messages) == 1
    finally:
        peer.close()
