"""Tell the RIS and other systems that a study was flagged: HL7 v2 ORU^R01 over MLLP, and a
JSON webhook.

The ORU carries the patient-level result as coded OBX segments (Fracture present/absent,
SNOMED CT; probability, DCM 122157; worklist priority; suspected vertebrae); the webhook
carries no patient name or ID, only the study's UIDs, accession number and the result.
Both have timeouts (``export_timeout_s``); neither retries here (the caller's task does).

Both travel protected: the ORU names the patient, so with ``hl7_tls`` MLLP runs inside TLS
(1.2+, the peer's certificate and host name verified; no plain fallback). The webhook is
https only outside development mode (``service.config``), and each body is signed with
HMAC-SHA256 under ``webhook_secret`` (header ``X-Triage-Signature-256: sha256=<hex>``, the
GitHub convention), so a receiver can refuse a forged or altered notification.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import ssl
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
SIGNATURE_HEADER = "X-Triage-Signature-256"
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


def _xpn(dicom_name: str | None) -> str:
    """A DICOM Person Name (``Family^Given^Middle^Prefix^Suffix``) as an HL7 XPN field.

    Its ``^`` are component separators in both standards, so they must stay separators (not
    be escaped into one family name); only the alphabetic group (before the first ``=``) is
    sent, and XPN puts the suffix (4) before the prefix (5).
    """
    if not dicom_name:
        return ""
    parts = (dicom_name.split("=", 1)[0].split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    return "^".join(_escape(p) for p in (family, given, middle, suffix, prefix)).rstrip("^")


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
        f"PID|1||{_escape(notification.patient_id)}||{_xpn(notification.patient_name)}",
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


def mllp_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for MLLP, or ``None`` when ``hl7_tls`` is off.

    The peer's certificate must chain to ``hl7_tls_ca_file`` (system CAs when unset) and name
    the host we dialled; our own certificate is presented when configured (mutual TLS).
    """
    if not settings.hl7_tls:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.hl7_tls_ca_file) if settings.hl7_tls_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.hl7_tls_cert_file and settings.hl7_tls_key_file:
        context.load_cert_chain(str(settings.hl7_tls_cert_file), str(settings.hl7_tls_key_file))
    return context


def send_mllp(host: str, port: int, message: str, *, timeout_s: float,
              ssl_context: ssl.SSLContext | None = None) -> str:
    """Send one message framed by MLLP and return the ACK; NotifyError unless AA/CA.

    With ``ssl_context`` the connection is TLS from the first byte and a failed handshake
    (untrusted certificate, wrong host name) is a NotifyError: nothing goes out in clear.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            sock = (ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context
                    else raw)
            sock.settimeout(timeout_s)
            sock.sendall(MLLP_START + message.encode("utf-8") + MLLP_END)
            buffer = b""
            while MLLP_END not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    raise NotifyError(f"MLLP {host}:{port}: connection closed before the ACK")
                buffer += chunk
    except OSError as exc:  # ssl.SSLError is an OSError
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


def sign(body: bytes, secret: str) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``: ``sha256=`` and the hex HMAC.

    A receiver recomputes it over the raw body it read and compares with
    ``hmac.compare_digest``.
    """
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(url: str, notification: Notification, *, timeout_s: float,
                 secret: str | None = None, ca_file: str | None = None) -> int:
    """POST the JSON payload, signed when ``secret`` is given; returns the HTTP status,
    NotifyError on anything but 2xx. https peers are verified (``ca_file``, else the
    system's CAs); whether plain http is allowed at all is decided in ``service.config``."""
    body = json.dumps(webhook_payload(notification)).encode()
    headers = {"Content-Type": "application/json"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=timeout_s,  # noqa: S310
                                    context=context) as response:
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
                      timeout_s=settings.export_timeout_s,
                      ssl_context=mllp_ssl_context(settings))
            outcome["hl7"] = None
        except NotifyError as exc:
            outcome["hl7"] = str(exc)
    if settings.webhook_url:
        try:
            post_webhook(settings.webhook_url, notification, timeout_s=settings.export_timeout_s,
                         secret=(settings.webhook_secret.get_secret_value()
                                 if settings.webhook_secret else None),
                         ca_file=(str(settings.webhook_ca_file)
                                  if settings.webhook_ca_file else None))
            outcome["webhook"] = None
        except NotifyError as exc:
            outcome["webhook"] = str(exc)
    for channel, error in outcome.items():
        if error:
            logger.warning("notify %s for study %s failed: %s", channel,
                           notification.study_instance_uid, error)
    return outcome
