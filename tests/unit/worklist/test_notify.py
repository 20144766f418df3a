"""HL7 ORU over MLLP and the webhook, against small real socket/HTTP peers in threads."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import hl7
import pytest

from harness.process import free_port
from service.config import Settings
from service.worklist.notify import (
    MLLP_END,
    MLLP_START,
    Notification,
    NotifyError,
    build_oru,
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

    def __init__(self, ack_code: str = "AA") -> None:
        self.ack_code = ack_code
        self.messages: list[str] = []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while MLLP_END not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
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
    obr = message.segment("OBR")
    assert str(obr[3]) == "ACC|1".replace("|", "\\F\\")  # escaped, kept in one field
    assert str(obr[25]) == "F"
    obx = message.segments("OBX")
    assert str(obx[0][3]) == "72704001^Fracture^SCT" and str(obx[0][5]) == "52101004^Present^SCT"
    assert str(obx[1][3]) == "122157^Probability^DCM" and str(obx[1][5]) == "0.930"
    assert [str(s[1]) for s in obx] == ["1", "2", "3", "4", "5"]
    assert str(obx[2][5]) == "STAT"


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


def test_notify_all_channels(mllp_peer: MllpPeer) -> None:
    received: list[dict[str, object]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = Settings(hl7_host="127.0.0.1", hl7_port=mllp_peer.port,
                            webhook_url=f"http://127.0.0.1:{server.server_port}/hook",
                            export_timeout_s=5)
        assert notify(NOTE, settings, control_id="100") == {"hl7": None, "webhook": None}
    finally:
        server.shutdown()
        server.server_close()
    (payload,) = received
    assert payload["priority"] == "STAT" and payload["suspected_vertebrae"] == ["C2"]
    assert "patient_name" not in payload and "patient_id" not in payload
    down = Settings(webhook_url=f"http://127.0.0.1:{free_port()}/hook", export_timeout_s=2)
    outcome = notify(NOTE, down, control_id="101")
    assert outcome["webhook"] is not None
