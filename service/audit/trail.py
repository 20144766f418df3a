"""Append-only, hash-chained audit events, anchored outside the database.

Every event's ``hash`` is the SHA-256 of the previous event's hash and the event's canonical
JSON, so removing or editing a row breaks the chain at that row, which ``verify_chain`` finds.
Writers in several processes serialise on a PostgreSQL advisory lock (SQLite already serialises
writers), so the chain never forks.

Three layers, each catching what the one before cannot:

1. the chain: an edit or a deletion made without recomputing the hashes;
2. the database (migration ``0006_audit_append_only``): triggers refuse UPDATE, DELETE and
   TRUNCATE, and the runtime role holds only SELECT and INSERT on the table;
3. anchors: someone who can bypass the triggers (the table owner, a superuser) can rewrite a
   row *and* recompute every later hash, and the chain verifies again. An anchor is the head
   (event id, hash) at some moment, appended to a file an operator keeps elsewhere and written
   to the log; a rewritten history no longer has that hash at that id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from service.db.tables import AuditEvent
from service.db.types import utcnow

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
_ADVISORY_LOCK_KEY = 0x43535054  # "CSPT"


class AuditError(Exception):
    """The audit chain is broken."""


def _canonical(event: AuditEvent) -> str:
    payload = {
        "occurred_at": event.occurred_at.isoformat(timespec="microseconds"),
        "event_type": event.event_type,
        "outcome": event.outcome,
        "actor": event.actor,
        "source_ip": event.source_ip,
        "study_instance_uid": event.study_instance_uid,
        "series_instance_uid": event.series_instance_uid,
        "details": event.details,
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def _digest(prev_hash: str, event: AuditEvent) -> str:
    return hashlib.sha256((prev_hash + _canonical(event)).encode()).hexdigest()


def record(
    session: Session,
    event_type: str,
    *,
    outcome: str = "success",
    actor: str | None = None,
    source_ip: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    details: dict[str, Any] | None = None,
    occurred_at: datetime | None = None,
) -> AuditEvent:
    """Append one event in the caller's transaction (it commits with the caller's work)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
    elif bind.dialect.name == "sqlite":
        # A write statement (even one matching no row) opens SQLite's write transaction, so
        # no other process can append between our read of the chain head and our insert.
        session.execute(text("UPDATE audit_event SET id = id WHERE id < 0"))
    prev = session.execute(
        select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)
    ).scalar_one_or_none()
    event = AuditEvent(
        occurred_at=occurred_at or utcnow(),
        event_type=event_type,
        outcome=outcome,
        actor=actor,
        source_ip=source_ip,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        details=details,
    )
    event.prev_hash = prev or GENESIS_HASH
    event.hash = _digest(event.prev_hash, event)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class Anchor:
    """The chain head at one moment: event ``event_id`` had hash ``hash``."""

    event_id: int
    hash: str
    anchored_at: str
    """ISO 8601, UTC."""

    def to_line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class AnchorMismatch:
    """An anchor the stored chain does not reproduce: the history was rewritten."""

    event_id: int
    expected_hash: str
    found_hash: str | None
    """``None``: the anchored event is gone (rows removed from the tail)."""
    last_good_event_id: int
    """The newest anchored event that still matched (0: none): the rewrite lies after it."""


@dataclass(frozen=True)
class ChainReport:
    events: int
    first_broken_id: int | None
    """The first event whose link or content does not verify (the chain alone)."""
    anchors_checked: int = 0
    anchor_mismatch: AnchorMismatch | None = None

    @property
    def intact(self) -> bool:
        return self.first_broken_id is None and self.anchor_mismatch is None

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "intact": self.intact,
                "first_broken_id": self.first_broken_id,
                "anchors_checked": self.anchors_checked,
                "anchor_mismatch": (asdict(self.anchor_mismatch)
                                    if self.anchor_mismatch else None)}


def chain_head(session: Session) -> tuple[int, str] | None:
    """The newest event's (id, hash); ``None`` on an empty trail."""
    row = session.execute(select(AuditEvent.id, AuditEvent.hash)
                          .order_by(AuditEvent.id.desc()).limit(1)).first()
    return (int(row[0]), str(row[1])) if row else None


def write_anchor(session: Session, path: Path) -> Anchor | None:
    """Append the committed chain head to ``path`` (JSON lines) and log it; ``None`` if empty.

    Only committed events are seen (the caller's session must not hold uncommitted appends),
    so an anchor never names a hash that a rollback could take back. The line is written with
    one ``O_APPEND`` write and fsynced: concurrent anchor writers (several SCP processes) never
    interleave and an acknowledged anchor survives a crash. Keep the file, or a copy of it, on
    storage the database's administrators cannot write (another host, WORM storage, a ticket).
    """
    head = chain_head(session)
    if head is None:
        return None
    anchor = Anchor(event_id=head[0], hash=head[1],
                    anchored_at=utcnow().isoformat(timespec="seconds"))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, (anchor.to_line() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.info("audit anchor: event %d hash %s", anchor.event_id, anchor.hash)
    return anchor


def read_anchors(path: Path) -> list[Anchor]:
    """The anchors of ``path`` (missing file: none); AuditError on an unreadable line."""
    if not path.exists():
        return []
    anchors = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            anchors.append(Anchor(event_id=int(data["event_id"]), hash=str(data["hash"]),
                                  anchored_at=str(data["anchored_at"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditError(f"{path}:{number}: not an anchor line") from exc
    return anchors


def verify_chain(session: Session, anchors: Sequence[Anchor] = ()) -> ChainReport:
    """Walk the whole chain; report the first event whose link or content does not verify,
    and the first anchor (by event id) that the stored events no longer reproduce.

    With no anchors only an un-rechained edit is found; a history rewritten and re-chained by
    someone who bypassed the triggers verifies, and only an anchor taken before the rewrite
    shows it.
    """
    expected: dict[int, str] = {}
    for anchor in anchors:
        if expected.setdefault(anchor.event_id, anchor.hash) != anchor.hash:
            # Two anchors disagree about one event: the anchor file itself was edited.
            raise AuditError(f"anchors disagree about event {anchor.event_id}")
    found: dict[int, str] = {}
    prev = GENESIS_HASH
    count = 0
    first_broken: int | None = None
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
        count += 1
        if event.id in expected:
            found[event.id] = event.hash
        if first_broken is None and (event.prev_hash != prev
                                     or _digest(prev, event) != event.hash):
            first_broken = event.id
        prev = event.hash
    mismatch: AnchorMismatch | None = None
    last_good = 0
    for event_id in sorted(expected):
        if found.get(event_id) != expected[event_id]:
            mismatch = AnchorMismatch(event_id=event_id, expected_hash=expected[event_id],
                                      found_hash=found.get(event_id),
                                      last_good_event_id=last_good)
            break
        last_good = event_id
    return ChainReport(events=count, first_broken_id=first_broken,
                       anchors_checked=len(expected), anchor_mismatch=mismatch)
