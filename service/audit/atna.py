"""IHE ATNA: the audit trail as DICOM PS3.15 A.5 audit messages, sent to a syslog collector.

Each committed audit event of an ATNA kind becomes one DICOM Audit Message (the RFC 3881
``AuditMessage`` XML with the DICOM codes of PS3.15 A.5.3): DICOM Instances Transferred
(received associations and results sent), DICOM Instances Accessed (a study page or result
download), Query (the worklist), User Authentication (login, logout, failed login), Security
Alert (accounts and tokens changed) and Export (the audit CSV). It travels as an RFC 5424
syslog message (MSGID ``IHE+RFC-3881``) framed by octet counting over TLS (RFC 5425, mutual
TLS when a client certificate is configured), to ``audit_syslog_host``.

Why a forwarder and not a send inside ``record``: ``record`` runs in the caller's transaction
(the SCP, the worker, the web app), which must neither wait on a collector nor send an event
that a rollback then takes back. The forwarder reads only committed events, in id order,
from the last one delivered (kept in ``<data_dir>/audit-syslog.offset``), and moves the
offset after the collector took them: delivery is at least once, in order, and survives a
collector outage. The SCP's tracker loop runs it (``service.ingest.tracker``). Reading by id
skips nothing: ``record`` appends under one lock held to commit (PostgreSQL advisory lock,
SQLite's writer lock), so ids become visible in order. Each tracker keeps its own offset: a
deployment with trackers on several hosts (several SCP pods) sends each event once per
tracker, so set ``audit_syslog_host`` where one tracker runs.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.db.tables import AuditEvent

logger = logging.getLogger(__name__)

MSGID = "IHE+RFC-3881"
APP_NAME = "cspine-triage"
FACILITY_AUTHPRIV = 10
SEVERITY = {"success": 5, "warning": 4, "failure": 4}
"""notice for a success, warning for anything else (RFC 5424 severities)."""
OUTCOME = {"success": "0"}
"""EventOutcomeIndicator (RFC 3881): 0 success; anything else is 4, minor failure (a refused
login or association, a send that will be retried or was given up)."""


@dataclass(frozen=True)
class Code:
    code: str
    scheme: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
QUERY = _dcm("110112", "Query")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
SECURITY_ALERT = _dcm("110113", "Security Alert")
EXPORT = _dcm("110106", "Export")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User security Attributes Changed")
SOURCE_ROLE = _dcm("110153", "Source Role ID")
DESTINATION_ROLE = _dcm("110152", "Destination Role ID")
APPLICATION_ROLE = _dcm("110150", "Application")
STUDY_UID = _dcm("110180", "Study Instance UID")


@dataclass(frozen=True)
class AtnaKind:
    """How one of our event types reads as a DICOM audit message."""

    event_id: Code
    action: str
    """EventActionCode: C create, R read, U update, D delete, E execute."""
    type_code: Code | None = None
    we_are_source: bool = False
    """Results we send: we are the source of the transfer, the peer the destination."""


KINDS: dict[str, AtnaKind] = {
    "dicom.association": AtnaKind(INSTANCES_TRANSFERRED, "C"),
    "export.sent": AtnaKind(INSTANCES_TRANSFERRED, "R", we_are_source=True),
    "export.failed": AtnaKind(INSTANCES_TRANSFERRED, "R", we_are_source=True),
    "export.resend": AtnaKind(INSTANCES_TRANSFERRED, "R", we_are_source=True),
    "study.view": AtnaKind(INSTANCES_ACCESSED, "R"),
    "results.download": AtnaKind(INSTANCES_ACCESSED, "R"),
    "worklist.view": AtnaKind(QUERY, "E"),
    "auth.login": AtnaKind(USER_AUTHENTICATION, "E", LOGIN),
    "auth.logout": AtnaKind(USER_AUTHENTICATION, "E", LOGOUT),
    "user.add": AtnaKind(SECURITY_ALERT, "E", SECURITY_ROLES_CHANGED),
    "user.disable": AtnaKind(SECURITY_ALERT, "E", SECURITY_ROLES_CHANGED),
    "user.passwd": AtnaKind(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "auth.token_created": AtnaKind(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "auth.token_revoked": AtnaKind(SECURITY_ALERT, "E", USER_SECURITY_ATTRIBUTES_CHANGED),
    "audit.export": AtnaKind(EXPORT, "R"),
}
"""Our event types that IHE ATNA asks for; the others (analysis, ingest) stay local."""


class AtnaError(Exception):
    """The collector could not be reached or refused the TLS handshake."""


def _coded(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.scheme,
                                "originalText": code.meaning})


def audit_message(event: AuditEvent, *, ae_title: str, host: str) -> str | None:
    """The PS3.15 A.5 ``AuditMessage`` XML of ``event``; ``None`` for a non-ATNA event.

    Participant objects name studies by Study Instance UID only: the syslog collector sits
    outside the patient-data boundary of the web app, so no patient name or ID goes there.
    """
    kind = KINDS.get(event.event_type)
    if kind is None:
        return None
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": kind.action,
        "EventDateTime": _utc(event.occurred_at).isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": OUTCOME.get(event.outcome, "4")})
    _coded(ident, "EventID", kind.event_id)
    if kind.type_code is not None:
        _coded(ident, "EventTypeCode", kind.type_code)
    details = event.details or {}
    ours = {"UserID": ae_title, "AlternativeUserID": str(os.getpid()),
            "NetworkAccessPointID": host, "NetworkAccessPointTypeCode": "1"}
    peer: dict[str, str] = {"UserID": event.actor or "unknown"}
    if event.source_ip:
        peer.update({"NetworkAccessPointID": event.source_ip,
                     "NetworkAccessPointTypeCode": "2"})
    if kind.event_id is INSTANCES_TRANSFERRED:
        if kind.we_are_source:
            destination = str(details.get("destination") or event.actor or "unknown")
            source, target = ours, {"UserID": destination}
        else:
            source, target = peer, ours
        _participant(root, source, SOURCE_ROLE, requestor=not kind.we_are_source)
        _participant(root, target, DESTINATION_ROLE, requestor=kind.we_are_source)
    else:
        _participant(root, peer, None, requestor=True)
        _participant(root, ours, APPLICATION_ROLE, requestor=False)
    source_id = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": ae_title})
    ET.SubElement(source_id, "AuditSourceTypeCode", {"csd-code": "4"})  # application server
    if event.study_instance_uid:
        study = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": event.study_instance_uid,
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        _coded(study, "ParticipantObjectIDTypeCode", STUDY_UID)
        count = details.get("instances")
        if isinstance(count, int):
            ET.SubElement(study, "ParticipantObjectDetail",
                          {"type": "NumberOfInstances", "value": str(count)})
    return ET.tostring(root, encoding="unicode")


def _participant(root: ET.Element, attrs: dict[str, str], role: Code | None, *,
                 requestor: bool) -> None:
    node = ET.SubElement(root, "ActiveParticipant",
                         {**attrs, "UserIsRequestor": "true" if requestor else "false"})
    if role is not None:
        _coded(node, "RoleIDCode", role)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def syslog_frame(xml: str, *, outcome: str, occurred_at: datetime, host: str) -> bytes:
    """One RFC 5424 message (UTF-8 with BOM, MSGID ``IHE+RFC-3881``) framed for TLS
    transport by octet counting (RFC 5425: ``MSG-LEN SP SYSLOG-MSG``)."""
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY.get(outcome, 4)
    stamp = _utc(occurred_at).isoformat(timespec="microseconds").replace("+00:00", "Z")
    header = f"<{pri}>1 {stamp} {host or '-'} {APP_NAME} {os.getpid()} {MSGID} - "
    message = header.encode("ascii") + "\ufeff".encode() + xml.encode("utf-8")
    return str(len(message)).encode("ascii") + b" " + message


def client_ssl_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.2+, the collector verified (``audit_syslog_tls_ca_file``, else system CAs) and
    named by ``audit_syslog_host``; our node certificate when configured (ATNA's mutual TLS)."""
    ca = settings.audit_syslog_tls_ca_file
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.audit_syslog_tls_cert_file and settings.audit_syslog_tls_key_file:
        context.load_cert_chain(str(settings.audit_syslog_tls_cert_file),
                                str(settings.audit_syslog_tls_key_file))
    return context


def send_frames(settings: Settings, frames: Sequence[bytes]) -> None:
    """Deliver frames over one TLS connection; AtnaError if it cannot be made or breaks."""
    host, port = settings.audit_syslog_host, settings.audit_syslog_port
    assert host is not None
    try:
        with socket.create_connection((host, port), timeout=settings.export_timeout_s) as raw, \
                client_ssl_context(settings).wrap_socket(raw, server_hostname=host) as tls:
            _await_acceptance(tls, settings.export_timeout_s)
            for frame in frames:
                tls.sendall(frame)
    except OSError as exc:  # ssl.SSLError included
        raise AtnaError(f"syslog {host}:{port}: {exc}") from exc


ACCEPTANCE_WAIT_S = 0.5


def _await_acceptance(tls: ssl.SSLSocket, timeout_s: float) -> None:
    """Wait briefly for the collector to refuse us after the handshake.

    Under TLS 1.3 the client's handshake completes before the server has checked the client
    certificate: a collector that refuses ours says so with an alert *after* that, and
    writes made meanwhile vanish without an error. A syslog collector never sends data, so
    a read that times out means accepted; an alert (SSLError) or a close means refused.
    """
    tls.settimeout(ACCEPTANCE_WAIT_S)
    try:
        if tls.recv(1) == b"":
            raise AtnaError("the collector closed the connection after the handshake")
    except TimeoutError:
        pass
    finally:
        tls.settimeout(timeout_s)


@dataclass
class AtnaForwarder:
    """Sends committed ATNA events after the offset in ``offset_file``; see the module doc."""

    settings: Settings
    batch: int = 500

    @property
    def offset_file(self) -> Path:
        return self.settings.data_dir / "audit-syslog.offset"

    def offset(self) -> int:
        try:
            return int(self.offset_file.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def _save(self, event_id: int) -> None:
        temp = self.offset_file.with_suffix(".tmp")
        self.offset_file.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(f"{event_id}\n")
        os.replace(temp, self.offset_file)

    def forward(self, session: Session) -> dict[str, Any]:
        """One batch: returns how many events were read and how many messages sent."""
        start = self.offset()
        events = list(session.execute(select(AuditEvent).where(AuditEvent.id > start)
                                      .order_by(AuditEvent.id).limit(self.batch)).scalars())
        if not events:
            return {"read": 0, "sent": 0, "offset": start}
        host = socket.gethostname()
        frames = []
        for event in events:
            xml = audit_message(event, ae_title=self.settings.ae_title, host=host)
            if xml is not None:
                frames.append(syslog_frame(xml, outcome=event.outcome,
                                           occurred_at=event.occurred_at, host=host))
        if frames:
            send_frames(self.settings, frames)
        self._save(events[-1].id)
        return {"read": len(events), "sent": len(frames), "offset": events[-1].id}
