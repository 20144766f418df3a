"""Reading the audit trail: search, filter, page, export, and the chain's state for display.

Read-only: nothing here writes an event (the caller audits its own read of the trail). The
hash chain itself is checked by :func:`service.audit.trail.verify_chain`; this module only
adds what a page needs around it (the broken event and its predecessor).

Who viewed a patient: a study page read is an event with the study's UID in
``study_instance_uid``, but a worklist read lists the studies it showed in
``details["studies"]``. The patient/study filter therefore matches both: the column, and the
UID as a quoted string inside ``details`` (a text match on the JSON, the same on PostgreSQL and
SQLite). A patient ID or accession number is first resolved to its studies' UIDs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, cast, func, or_, select
from sqlalchemy.orm import Session

from service.audit.trail import ChainReport, verify_chain
from service.db.tables import AuditEvent, Study

logger = logging.getLogger(__name__)

MAX_SUBJECT_STUDIES = 50
"""A patient with more studies than this is matched on the first ones only (bounded query)."""
CSV_COLUMNS = ("id", "occurred_at", "event_type", "outcome", "actor", "source_ip",
               "study_instance_uid", "series_instance_uid", "details", "hash")


@dataclass(frozen=True)
class AuditQuery:
    """Filters; each one set narrows the result (AND). ``since`` inclusive, ``until``
    exclusive, both timezone-aware UTC."""

    actor: str | None = None
    """Exact user name (or calling AE title for DICOM events)."""
    event_type: str | None = None
    """Exact type (``study.view``) or a prefix ending with a dot (``auth.``)."""
    subject: str | None = None
    """Study Instance UID, patient ID or accession number."""
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class AuditPage:
    events: list[AuditEvent]
    total: int
    offset: int
    limit: int
    subject_studies: list[str]
    """The study UIDs the subject filter resolved to (empty when unset or unmatched)."""


def subject_studies(session: Session, subject: str) -> list[str]:
    """Study UIDs named by ``subject``: itself if it is a study UID on record, plus the studies
    of a patient ID or accession number. A UID not on record still matches itself (its
    events may outlive the study's rows)."""
    rows = session.execute(
        select(Study.study_instance_uid)
        .where(or_(Study.study_instance_uid == subject, Study.patient_id == subject,
                   Study.accession_number == subject))
        .order_by(Study.id).limit(MAX_SUBJECT_STUDIES)).scalars()
    found = list(dict.fromkeys(rows))
    return found if subject in found else [subject, *found][:MAX_SUBJECT_STUDIES]


def _conditions(session: Session, query: AuditQuery) -> tuple[list[ColumnElement[bool]],
                                                              list[str]]:
    where: list[ColumnElement[bool]] = []
    uids: list[str] = []
    if query.actor:
        where.append(AuditEvent.actor == query.actor)
    if query.event_type:
        if query.event_type.endswith("."):
            where.append(AuditEvent.event_type.startswith(query.event_type, autoescape=True))
        else:
            where.append(AuditEvent.event_type == query.event_type)
    if query.outcome:
        where.append(AuditEvent.outcome == query.outcome)
    if query.since is not None:
        where.append(AuditEvent.occurred_at >= query.since)
    if query.until is not None:
        where.append(AuditEvent.occurred_at < query.until)
    if query.subject:
        uids = subject_studies(session, query.subject)
        details = cast(AuditEvent.details, String)
        where.append(or_(AuditEvent.study_instance_uid.in_(uids),
                         *[details.contains(json.dumps(uid), autoescape=True)
                           for uid in uids]))
    return where, uids


def search(session: Session, query: AuditQuery, *, limit: int = 50,
           offset: int = 0) -> AuditPage:
    """One page of matching events, newest first, and the number of all matches."""
    where, uids = _conditions(session, query)
    total = int(session.execute(select(func.count(AuditEvent.id)).where(*where)).scalar_one())
    events = list(session.execute(
        select(AuditEvent).where(*where).order_by(AuditEvent.id.desc())
        .limit(limit).offset(offset)).scalars())
    return AuditPage(events=events, total=total, offset=offset, limit=limit,
                     subject_studies=uids)


def iter_events(session: Session, query: AuditQuery, *, batch: int = 1000,
                max_rows: int | None = None) -> Iterator[AuditEvent]:
    """Every matching event, oldest first, fetched by keyset pages of ``batch`` (a large
    trail never sits in memory at once)."""
    where, _uids = _conditions(session, query)
    last_id = 0
    sent = 0
    while True:
        rows = list(session.execute(
            select(AuditEvent).where(*where, AuditEvent.id > last_id)
            .order_by(AuditEvent.id).limit(batch)).scalars())
        if not rows:
            return
        for row in rows:
            if max_rows is not None and sent >= max_rows:
                return
            sent += 1
            yield row
        last_id = rows[-1].id
        session.expunge_all()


def csv_row(event: AuditEvent) -> list[str]:
    return [str(event.id), event.occurred_at.isoformat(), event.event_type, event.outcome,
            event.actor or "", event.source_ip or "", event.study_instance_uid or "",
            event.series_instance_uid or "",
            json.dumps(event.details, sort_keys=True, default=str) if event.details else "",
            event.hash]


def csv_lines(events: Iterator[AuditEvent]) -> Iterator[str]:
    """The CSV text, a header then one line per event (RFC 4180 quoting, ``\\r\\n``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    yield buffer.getvalue()
    for event in events:
        buffer.seek(0)
        buffer.truncate()
        writer.writerow([_neutralise(value) for value in csv_row(event)])
        yield buffer.getvalue()


def _neutralise(value: str) -> str:
    """A spreadsheet runs a cell starting with ``= + - @`` as a formula: an actor name typed
    at the login form must not become one in the admin's export."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def event_types(session: Session) -> list[str]:
    """The event types on record, for the filter's choices."""
    return sorted(session.execute(select(AuditEvent.event_type).distinct()).scalars())


@dataclass(frozen=True)
class ChainStatus:
    """The chain's verification, with what a page shows about its first broken link."""

    report: ChainReport
    broken: AuditEvent | None
    """The first event whose link or content does not verify."""
    previous: AuditEvent | None
    """The event before it (the last one that verified), if any."""

    @property
    def intact(self) -> bool:
        return self.report.intact

    def summary(self) -> dict[str, Any]:
        return {"events_checked": self.report.events, "intact": self.intact,
                "first_broken_id": self.report.first_broken_id}


def chain_status(session: Session) -> ChainStatus:
    """Verify the whole chain now (it walks every event: cost grows with the trail)."""
    report = verify_chain(session)
    broken = previous = None
    if report.first_broken_id is not None:
        broken = session.get(AuditEvent, report.first_broken_id)
        previous = session.execute(
            select(AuditEvent).where(AuditEvent.id < report.first_broken_id)
            .order_by(AuditEvent.id.desc()).limit(1)).scalar_one_or_none()
        logger.error("audit chain broken at event %d", report.first_broken_id)
    return ChainStatus(report=report, broken=broken, previous=previous)
