"""Append-only, hash-chained audit events.

Every event's ``hash`` is the SHA-256 of the previous event's hash and the event's canonical
JSON, so removing or editing a row breaks the chain at that row, which ``verify_chain`` finds.
Writers in several processes serialise on a PostgreSQL advisory lock (SQLite already serialises
writers), so the chain never forks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime
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
class ChainReport:
    events: int
    first_broken_id: int | None

    @property
    def intact(self) -> bool:
        return self.first_broken_id is None


def verify_chain(session: Session) -> ChainReport:
    """Walk the whole chain; report the first event whose link or content does not verify."""
    prev = GENESIS_HASH
    count = 0
    for event in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
        count += 1
        if event.prev_hash != prev or _digest(prev, event) != event.hash:
            return ChainReport(events=count, first_broken_id=event.id)
        prev = event.hash
    return ChainReport(events=count, first_broken_id=None)
