"""Tell the RIS and other systems that a study was flagged: HL7 v2 ORU^R01 over MLLP, and a
JSON webhook.

The ORU carries the patient-level result as coded OBX segments (Fracture present/absent,
SNOMED CT; probability, DCM 122157; worklist priority; suspected vertebrae); the webhook
carries no patient name or ID, only the study's UIDs, accession number and the result.
Both have timeouts (``export_timeout_s``); neither retries here (the caller's task does).
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime

import hl7

from service.config import Settings
from service.outcomes import AnalysisResult
from service.results import codes

logger = logging.getLogger(__name__)

MLLP_START, MLLP_END = b"\x0b", b"\x1c\x0d"
SENDING_APPLICATION = "CSPINE_TRIAGE"
_RESULT_CODE = "CSPINE-AI^Cervical spine fracture AI triage^L"


class NotifyError(Exception):
    """The peer could not be reached, timed out, or did not acknowledge."""


@dataclass(frozen=True)
class Notification:
    study_instance_uid: str
    priority: str
    reason: str
    patient_suspected: bool
    patient_probability: float | None
    flagged_at: datetime
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    suspected_vertebrae: list[str] = field(default_factory=list)
    model_version: str | None = None
    sr_sop_instance_uid: str | None = None
    result: str | None = None
    """FRACTURE_SUSPECTED, NO_FRACTURE_FOUND or INCONCLUSIVE (``service.outcomes``)."""
    inconclusive_reasons: list[str] = field(default_factory=list)
    """The anatomical rules that failed, when INCONCLUSIVE."""

    @property
    def inconclusive(self) -> bool:
        return self.result == AnalysisResult.INCONCLUSIVE.value


def _escape(value: object) -> str:
    """HL7 v2 escaping for a field value (separators ``|^~\\&`` and line breaks)."""
    text = "" if value is None else str(value)
    text = text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
    text = text.replace("~", "\\R\\").replace("&", "\\T\\")
    return text.replace("\r", " ").replace("\n", " ")


def _code(code: codes.Code) -> str:
    return f"{_escape(code.value)}^{_escape(code.meaning)}^{_escape(code.scheme_designator)}"


def build_oru(notification: Notification, *, control_id: str,
              receiving_application: str = "RIS", receiving_facility: str = "") -> str:
    """An HL7 v2.5 ORU^R01 (segments separated by carriage returns)."""
    stamp = notification.flagged_at.strftime("%Y%m%d%H%M%S")
    # INCONCLUSIVE is neither present nor absent: the study was not cleared.
    present = (codes.INDETERMINATE if notification.inconclusive and not
               notification.patient_suspected
               else codes.PRESENT if notification.patient_suspected else codes.ABSENT)
    segments = [
        f"MSH|^~\\&|{SENDING_APPLICATION}||{_escape(receiving_application)}|"
        f"{_escape(receiving_facility)}|{stamp}||ORU^R01^ORU_R01|{_escape(control_id)}|P|2.5",
        f"PID|1||{_escape(notification.patient_id)}||{_escape(notification.patient_name)}",
        f"OBR|1||{_escape(notification.accession_number)}|{_RESULT_CODE}|||{stamp}"
        + "|" * 18 + "F",
        f"OBX|1|CE|{_code(codes.FRACTURE)}||{_code(present)}||||||P",
    ]
    if notification.patient_probability is not None:
        segments.append(f"OBX|2|NM|{_code(codes.PROBABILITY)}||"
                        f"{notification.patient_probability:.3f}|{_code(codes.NO_UNITS)}|||||P")
    segments.append(f"OBX|{len(segments) - 2}|ST|PRIORITY^Worklist priority^L||"
                    f"{_escape(notification.priority)}||||||P")
    if notification.suspected_vertebrae:
        segments.append(f"OBX|{len(segments) - 2}|ST|VERTEBRAE^Suspected vertebrae^L||"
                        f"{_escape(', '.join(notification.suspected_vertebrae))}||||||P")
    if notification.result:
        segments.append(f"OBX|{len(segments) - 2}|ST|RESULT^Analysis result^L||"
                        f"{_escape(notification.result)}||||||P")
    if notification.inconclusive_reasons:
        segments.append(f"OBX|{len(segments) - 2}|ST|REASONS^Inconclusive reasons^L||"
                        f"{_escape(', '.join(notification.inconclusive_reasons))}||||||P")
    segments.append(f"OBX|{len(segments) - 2}|ST|STUDYUID^Study Instance UID^L||"
                    f"{_escape(notification.study_instance_uid)}||||||P")
    segments.append("NTE|1||Research software (synthetic-trained model), not for diagnosis: "
                    + _escape(notification.reason))
    message = "\r".join(segments)
    hl7.parse(message)  # raises on a malformed message before anything is sent
    return message


def send_mllp(host: str, port: int, message: str, *, timeout_s: float) -> str:
    """Send one message framed by MLLP and return the ACK; NotifyError unless AA/CA."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
            buffer = b""
            while MLLP_END not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise NotifyError(f"MLLP {host}:{port}: connection closed before the ACK")
                buffer += chunk
    except OSError as exc:
        raise NotifyError(f"MLLP {host}:{port}: {exc}") from exc
    ack = buffer.split(MLLP_START, 1)[-1].split(MLLP_END, 1)[0].decode("utf-8", "replace")
    try:
        parsed = hl7.parse(ack)
        code = str(parsed.segment("MSA")[1])
    except (KeyError, IndexError, hl7.ParseException) as exc:
        raise NotifyError(f"MLLP {host}:{port}: unreadable ACK") from exc
    if code not in ("AA", "CA"):
        raise NotifyError(f"MLLP {host}:{port}: ACK {code}")
    return ack


def webhook_payload(notification: Notification) -> dict[str, object]:
    return {
        "event": ("study.inconclusive" if notification.inconclusive else "study.flagged"),
        "result": notification.result,
        "inconclusive_reasons": notification.inconclusive_reasons,
        "study_instance_uid": notification.study_instance_uid,
        "accession_number": notification.accession_number,
        "priority": notification.priority,
        "reason": notification.reason,
        "fracture_suspected": notification.patient_suspected,
        "patient_probability": notification.patient_probability,
        "suspected_vertebrae": notification.suspected_vertebrae,
        "flagged_at": notification.flagged_at.isoformat(),
        "model_version": notification.model_version,
        "sr_sop_instance_uid": notification.sr_sop_instance_uid,
    }


def post_webhook(url: str, notification: Notification, *, timeout_s: float) -> int:
    """POST the JSON payload; returns the HTTP status, NotifyError on anything but 2xx."""
    body = json.dumps(webhook_payload(notification)).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise NotifyError(f"webhook: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise NotifyError(f"webhook: {exc}") from exc
    return status


def notify(notification: Notification, settings: Settings, *,
           control_id: str) -> dict[str, str | None]:
    """Send on every configured channel; returns channel -> error (None when delivered)."""
    outcome: dict[str, str | None] = {}
    if settings.hl7_host and settings.hl7_port:
        try:
            send_mllp(settings.hl7_host, settings.hl7_port,
                      build_oru(notification, control_id=control_id),
                      timeout_s=settings.export_timeout_s)
            outcome["hl7"] = None
        except NotifyError as exc:
            outcome["hl7"] = str(exc)
    if settings.webhook_url:
        try:
            post_webhook(settings.webhook_url, notification, timeout_s=settings.export_timeout_s)
            outcome["webhook"] = None
        except NotifyError as exc:
            outcome["webhook"] = str(exc)
    for channel, error in outcome.items():
        if error:
            logger.warning("notify %s for study %s failed: %s", channel,
                           notification.study_instance_uid, error)
    return outcome
