"""Reading the audit trail: search, filter, page, export, and the chain's state for display.

Read-only: nothing here writes an event (the caller audits its own read of the trail). The
hash chain and its anchors are checked by :func:`service.audit.trail.verify_chain`; this module
only adds what a page needs around it (the broken event and its predecessor, an anchor file
that cannot be read).

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
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, String, cast, func, or_, select
from sqlalchemy.orm import Session

from service.audit.trail import (
    Anchor,
    AuditError,
    ChainReport,
    read_anchors,
    verify_chain,
)
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
    """Study UIDs named by ``subject``: the studies whose UID, patient ID or accession number it
    is; when none is on record, ``subject`` itself (a study UID whose events outlive its rows,
    or a UID of a study never stored, such as a refused association's)."""
    rows = session.execute(
        select(Study.study_instance_uid)
        .where(or_(Study.study_instance_uid == subject, Study.patient_id == subject,
                   Study.accession_number == subject))
        .order_by(Study.id).limit(MAX_SUBJECT_STUDIES)).scalars()
    found = list(dict.fromkeys(rows))
    return found or [subject]


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
    """The chain's verification, with what a page shows about what broke."""

    report: ChainReport
    broken: AuditEvent | None
    """The first event whose link or content does not verify."""
    previous: AuditEvent | None
    """The event before it (the last one that verified), if any."""
    anchor_file: str | None = None
    anchor_error: str | None = None
    """The anchor file could not be used (unreadable line, anchors that disagree): the chain
    was verified without anchors, and the page says so."""

    @property
    def intact(self) -> bool:
        return self.report.intact and self.anchor_error is None

    def summary(self) -> dict[str, Any]:
        return {**self.report.as_dict(), "anchor_error": self.anchor_error}


def chain_status(session: Session, anchor_path: Path | None = None) -> ChainStatus:
    """Verify the whole chain now, against the anchors in ``anchor_path`` when it is given
    (the same check as ``triage audit verify``); it walks every event, so its cost grows with
    the trail."""
    anchors: list[Anchor] = []
    anchor_error = None
    report: ChainReport | None = None
    if anchor_path is not None:
        try:
            anchors = read_anchors(anchor_path)
            report = verify_chain(session, anchors)
        except (AuditError, OSError) as exc:
            anchor_error = str(exc)[:300]
            logger.error("audit anchors not usable: %s", anchor_error)
    if report is None:
        report = verify_chain(session)
    broken = previous = None
    if report.first_broken_id is not None:
        broken = session.get(AuditEvent, report.first_broken_id)
        previous = session.execute(
            select(AuditEvent).where(AuditEvent.id < report.first_broken_id)
            .order_by(AuditEvent.id.desc()).limit(1)).scalar_one_or_none()
        logger.error("audit chain broken at event %d", report.first_broken_id)
    if report.anchor_mismatch is not None:
        logger.error("audit anchor at event %d not reproduced", report.anchor_mismatch.event_id)
    return ChainStatus(report=report, broken=broken, previous=previous,
                       anchor_file=str(anchor_path) if anchor_path is not None else None,
                       anchor_error=anchor_error)
