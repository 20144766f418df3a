"""IHE ATNA: audit events reach a real TLS syslog listener (RFC 5425 framing, mutual TLS with
certificates from a throwaway CA) as RFC 5424 messages carrying DICOM PS3.15 A.5 XML."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from harness.pki import Pki, make_pki
from service.audit import record
from service.audit.atna import AtnaError, AtnaForwarder
from service.config import Settings
from service.db import migrate
from service.db.session import make_engine, make_session_factory, session_scope

STUDY = "1.2.826.0.1.3680043.10.1455.77"
FRAME = re.compile(r"^<(\d+)>1 (\S+) (\S+) cspine-triage (\d+) IHE\+RFC-3881 - \ufeff(.*)$",
                   re.S)


class TlsSyslogListener:
    """An RFC 5425 collector: TLS that requires a client certificate from ``client_ca``,
    octet-counted frames (``LEN SP MSG``), every message kept."""

    def __init__(self, pki: Pki) -> None:
        self.messages: list[str] = []
        self.handshake_errors: list[str] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        self.context.load_verify_locations(str(pki.ca))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.server.accept()
            except OSError:
                return
            raw.settimeout(10)
            try:
                conn = self.context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                self.handshake_errors.append(str(exc))
                raw.close()
                continue
            with conn:
                self._read_frames(conn)

    def _read_frames(self, conn: ssl.SSLSocket) -> None:
        buffer = b""
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while b" " in buffer:
                length_text, rest = buffer.split(b" ", 1)
                length = int(length_text)
                if len(rest) < length:
                    break
                self.messages.append(rest[:length].decode("utf-8"))
                buffer = rest[length:]

    def wait_for(self, count: int, timeout_s: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count:
            assert time.monotonic() < deadline, f"{len(self.messages)} of {count} messages"
            time.sleep(0.05)
        return self.messages

    def close(self) -> None:
        """Stop listening. ``shutdown`` first: on Linux a bare ``close`` leaves the socket
        listening while the serving thread is blocked in ``accept``."""
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def collector(pki: Pki) -> Iterator[TlsSyslogListener]:
    listener = TlsSyslogListener(pki)
    yield listener
    listener.close()


@pytest.fixture
def factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def settings_for(tmp_path: Path, pki: Pki, port: int, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "var", "audit_syslog_host": "localhost",
        "audit_syslog_port": port, "audit_syslog_tls_ca_file": pki.ca,
        "audit_syslog_tls_cert_file": pki.client_cert,
        "audit_syslog_tls_key_file": pki.client_key, "export_timeout_s": 5}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def parse(message: str) -> tuple[int, ET.Element]:
    match = FRAME.match(message)
    assert match is not None, message[:200]
    return int(match.group(1)), ET.fromstring(match.group(5))


def event_id(root: ET.Element) -> str:
    node = root.find("EventIdentification/EventID")
    assert node is not None
    return node.attrib["csd-code"]


def test_events_reach_the_collector_as_dicom_audit_messages(
        tmp_path: Path, pki: Pki, collector: TlsSyslogListener,
        factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        record(session, "dicom.association", actor="CT_SCANNER", source_ip="10.1.2.3",
               study_instance_uid=STUDY, details={"instances": 300, "tls": True})
        record(session, "auth.login", actor="alice", source_ip="10.0.0.9")
        record(session, "auth.login", outcome="failure", actor="mallory",
               source_ip="10.0.0.66", details={"reason": "bad password"})
        record(session, "analysis.done", study_instance_uid=STUDY)  # not an ATNA event
        record(session, "worklist.view", actor="alice", source_ip="10.0.0.9")
        record(session, "export.sent", actor="CSPINE_TRIAGE", study_instance_uid=STUDY,
               details={"destination": "PACS@10.9.9.9:104", "object_kind": "SR"})
        record(session, "user.disable", actor="admin", details={"username": "bob"})
    settings = settings_for(tmp_path, pki, collector.port)
    forwarder = AtnaForwarder(settings)
    with factory() as session:
        assert forwarder.forward(session) == {"read": 7, "sent": 6, "offset": 7}
    messages = collector.wait_for(6)
    parsed = [parse(m) for m in messages]
    assert [event_id(root) for _, root in parsed] == [
        "110104", "110114", "110114", "110112", "110104", "110113"]
    # Facility authpriv (10): notice (5) for a success, warning (4) for a failure.
    assert [pri for pri, _ in parsed] == [85, 85, 84, 85, 85, 85]

    transfer = parsed[0][1]
    ident = transfer.find("EventIdentification")
    assert ident is not None and ident.attrib["EventOutcomeIndicator"] == "0"
    roles = {p.attrib["UserID"]: p.find("RoleIDCode").attrib["csd-code"]  # type: ignore[union-attr]
             for p in transfer.findall("ActiveParticipant")}
    assert roles == {"CT_SCANNER": "110153", settings.ae_title: "110152"}
    study = transfer.find("ParticipantObjectIdentification")
    assert study is not None and study.attrib["ParticipantObjectID"] == STUDY
    detail = study.find("ParticipantObjectDetail")
    assert detail is not None and detail.attrib["value"] == "300"
    source = transfer.find("AuditSourceIdentification")
    assert source is not None and source.attrib["AuditSourceID"] == settings.ae_title

    failed_login = parsed[2][1]
    ident = failed_login.find("EventIdentification")
    assert ident is not None and ident.attrib["EventOutcomeIndicator"] == "4"
    type_code = failed_login.find("EventIdentification/EventTypeCode")
    assert type_code is not None and type_code.attrib["csd-code"] == "110122"  # Login
    users = [p.attrib for p in failed_login.findall("ActiveParticipant")]
    assert users[0]["UserID"] == "mallory" and users[0]["NetworkAccessPointID"] == "10.0.0.66"

    export_roles = {p.find("RoleIDCode").attrib["csd-code"]: p.attrib["UserID"]  # type: ignore[union-attr]
                    for p in parsed[4][1].findall("ActiveParticipant")}
    assert export_roles == {"110153": settings.ae_title, "110152": "PACS@10.9.9.9:104"}

    # Delivered once: the next run sends only what is new.
    with factory() as session:
        assert forwarder.forward(session)["sent"] == 0
        record(session, "auth.logout", actor="alice")
        session.commit()
        assert forwarder.forward(session) == {"read": 1, "sent": 1, "offset": 8}
    logout = parse(collector.wait_for(7)[6])[1]
    type_code = logout.find("EventIdentification/EventTypeCode")
    assert type_code is not None and type_code.attrib["csd-code"] == "110123"


def test_a_collector_outage_loses_nothing(tmp_path: Path, pki: Pki,
                                          factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        record(session, "auth.login", actor="alice")
    # The collector is down: its port is held, bound but not listening, so nothing else can
    # take it and every connection is refused.
    down = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    down.bind(("127.0.0.1", 0))
    forwarder = AtnaForwarder(settings_for(tmp_path, pki, int(down.getsockname()[1]),
                                           audit_syslog_host="127.0.0.1"))
    try:
        with factory() as session, pytest.raises(AtnaError):
            forwarder.forward(session)
    finally:
        down.close()
    assert forwarder.offset() == 0
    back = TlsSyslogListener(pki)
    try:
        forwarder = AtnaForwarder(settings_for(tmp_path, pki, back.port))
        with factory() as session:
            assert forwarder.forward(session)["sent"] == 1
        assert len(back.wait_for(1)) == 1
    finally:
        back.close()


def test_tls_is_verified_both_ways(tmp_path: Path, pki: Pki, collector: TlsSyslogListener,
                                   factory: sessionmaker[Session]) -> None:
    with session_scope(factory) as session:
        record(session, "auth.login", actor="alice")
    untrusting = settings_for(tmp_path, pki, collector.port, audit_syslog_tls_ca_file=pki.other_ca)
    anonymous = settings_for(tmp_path, pki, collector.port, audit_syslog_tls_cert_file=None,
                             audit_syslog_tls_key_file=None)
    for settings in (untrusting, anonymous):
        with factory() as session, pytest.raises(AtnaError):
            AtnaForwarder(settings).forward(session)
    time.sleep(0.5)
    assert collector.messages == []


def test_the_tracker_forwards(tmp_path: Path, pki: Pki, collector: TlsSyslogListener,
                              factory: sessionmaker[Session]) -> None:
    from service.ingest.spool import Spool
    from service.ingest.tracker import Tracker

    settings = settings_for(tmp_path, pki, collector.port, tracker_interval_s=0.05,
                            audit_syslog_interval_s=0.1, audit_anchor_interval_s=0)
    spool = Spool(settings.spool_path)
    spool.prepare()
    tracker = Tracker(factory, settings, spool)
    tracker.start()
    try:
        with session_scope(factory) as session:
            record(session, "auth.login", actor="alice")
        collector.wait_for(1)
        with session_scope(factory) as session:
            record(session, "study.view", actor="alice", study_instance_uid=STUDY)
        assert event_id(parse(collector.wait_for(2)[1])[1]) == "110103"
    finally:
        tracker.stop()
