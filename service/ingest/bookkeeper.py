"""Database bookkeeping for received instances, batched off the C-STORE hot path.

The SCP hands each stored instance (and each association start/end) to a
:class:`Bookkeeper`; a thread drains the queue every ``ingest_batch_interval_s``, hashes and
parses what it got (hashlib releases the GIL, so hashing overlaps the network threads), and
writes the whole batch in one transaction: Study / Series / Instance rows, series counters and
timestamps, reopening of completed series, and the audit events of the associations.

If the database is down the batch stays in memory and is retried with backoff; if the process
dies first, nothing acknowledged is lost either, because :func:`rebuild_from_spool` derives the
missing rows from the spool files at the next start. Every write is idempotent (unique
``(sop_instance_uid, sha256)``, ``INSERT .. ON CONFLICT DO NOTHING``), so several SCP
processes, a rebuild and a live SCP may all write the same instance without double counting.

Concurrency rules, for PostgreSQL and SQLite alike: a transaction writes before it reads what
it will update (the study upsert comes first, so SQLite holds its write lock from there on),
series rows are locked in id order (``FOR UPDATE`` on PostgreSQL), and counters are only ever
advanced for rows this transaction actually inserted.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.audit import record
from service.db.tables import Instance, Series, SeriesState, Study
from service.db.types import utcnow
from service.ingest.header import InstanceHeader, UnreadableHeader, read_header_bytes
from service.ingest.spool import Spool, StoredFile, StoreOutcome, path_component
from service.ingest.validate import DatasetKeys, UndecodableDataset, scan_dataset, split_part10

logger = logging.getLogger(__name__)

EVENT_ASSOCIATION = "dicom.association"
EVENT_DUPLICATE_CONFLICT = "dicom.instance.duplicate_conflict"
EVENT_SERIES_REOPENED = "ingest.series.reopened"
EVENT_REBUILD = "ingest.rebuild"


@dataclass(slots=True)
class ReceivedInstance:
    """One instance made durable by the SCP (or found in the spool by a rebuild)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    stored: StoredFile
    received_at: datetime
    association_id: str | None = None
    calling_ae: str | None = None
    data: bytes | None = None
    """The Part 10 bytes; dropped once hashed."""
    keys: DatasetKeys | None = None
    """What the hot-path walk read (UIDs and raw header elements); dropped once used."""
    transfer_syntax_uid: str | None = None
    header: InstanceHeader | None = None
    sha256: str | None = None


@dataclass(slots=True)
class AssociationRecord:
    """One accepted association: counted by the SCP while it runs (only its reactor thread
    touches it), handed to the bookkeeper once released or aborted (``ended_at``, ``how``)."""

    association_id: str
    calling_ae: str
    called_ae: str
    address: str
    port: int
    started_at: datetime
    ended_at: datetime | None = None
    """Set when the association ends; the bookkeeper writes only ended ones."""
    how: str = ""
    """``released`` or ``aborted`` once ended."""
    instances: int = 0
    bytes: int = 0
    duplicates: int = 0
    conflicts: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    """Failure status (hex) -> count."""
    tls: bool = False
    mpps: int = 0

    def failed(self, status: int) -> None:
        key = f"0x{status:04X}"
        self.failures[key] = self.failures.get(key, 0) + 1

    def end(self, how: str, at: datetime | None = None) -> AssociationRecord:
        self.how = how
        self.ended_at = at or utcnow()
        return self


@dataclass(slots=True)
class AssociationRejected:
    calling_ae: str
    called_ae: str
    address: str
    port: int
    reason: str
    at: datetime
    tls: bool = False


BookItem = ReceivedInstance | AssociationRecord | AssociationRejected


@dataclass(slots=True)
class BatchResult:
    instances_new: int = 0
    instances_known: int = 0
    conflicts: int = 0
    reopened: list[int] = field(default_factory=list)
    touched_series_ids: set[int] = field(default_factory=set)


def _insert(session: Session, table: Any) -> Any:
    """Dialect ``INSERT`` that supports ``ON CONFLICT DO NOTHING`` (PostgreSQL and SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def prepare(item: ReceivedInstance) -> None:
    """Hash the bytes and build the per-instance header (idempotent); the bytes are dropped.

    The header comes from the elements the hot-path walk already captured
    (:attr:`~service.ingest.validate.DatasetKeys.elements`), decoded without pydicom; only
    items without them are parsed with pydicom. The study and series columns are decoded
    later, once per series and batch (:func:`_complete_header`).
    """
    if item.header is None and item.keys is not None:
        item.header = InstanceHeader.per_instance(
            item.keys.elements, study_uid=item.study_instance_uid,
            series_uid=item.series_instance_uid, sop_uid=item.sop_instance_uid,
            transfer_syntax_uid=item.transfer_syntax_uid)
    if item.data is not None:
        if item.sha256 is None:
            item.sha256 = item.stored.sha256 or hashlib.sha256(item.data).hexdigest()
        if item.header is None:
            try:
                item.header = InstanceHeader.from_dataset(
                    read_header_bytes(item.data), study_uid=item.study_instance_uid,
                    series_uid=item.series_instance_uid, sop_uid=item.sop_instance_uid)
            except UnreadableHeader as exc:
                logger.warning("header of %s unreadable after a valid walk: %s",
                               item.sop_instance_uid, exc)
        item.data = None
    if item.header is None:
        item.header = InstanceHeader(study_instance_uid=item.study_instance_uid,
                                     series_instance_uid=item.series_instance_uid,
                                     sop_instance_uid=item.sop_instance_uid, sop_class_uid="",
                                     transfer_syntax_uid=item.transfer_syntax_uid)
    if item.sha256 is None:
        raise ValueError(f"instance {item.sop_instance_uid} has neither bytes nor a hash")


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _complete_header(item: ReceivedInstance) -> InstanceHeader:
    """The header with study and series columns (pydicom decodes the character set)."""
    if item.keys is not None:
        return InstanceHeader.from_dataset(item.keys.header_dataset(),
                                           study_uid=item.study_instance_uid,
                                           series_uid=item.series_instance_uid,
                                           sop_uid=item.sop_instance_uid)
    assert item.header is not None
    return item.header


def _upsert_studies(session: Session, items: Sequence[ReceivedInstance]) -> dict[str, int]:
    first: dict[str, ReceivedInstance] = {}
    for item in items:
        first.setdefault(item.study_instance_uid, item)
    for uid in sorted(first):
        values = {"study_instance_uid": uid, **_complete_header(first[uid]).study_values(),
                  "created_at": utcnow(), "updated_at": utcnow()}
        session.execute(_insert(session, Study).values(**values)
                        .on_conflict_do_nothing(index_elements=["study_instance_uid"]))
    rows = session.execute(select(Study.study_instance_uid, Study.id)
                           .where(Study.study_instance_uid.in_(list(first)))).all()
    return {uid: study_id for uid, study_id in rows}


def _upsert_series(session: Session, items: Sequence[ReceivedInstance],
                   study_ids: dict[str, int]) -> dict[str, int]:
    first: dict[str, ReceivedInstance] = {}
    for item in items:
        first.setdefault(item.series_instance_uid, item)
    for uid in sorted(first):
        item = first[uid]
        values = {"series_instance_uid": uid, "study_id": study_ids[item.study_instance_uid],
                  **_complete_header(item).series_values(), "state": SeriesState.RECEIVING,
                  "instance_count": 0, "bytes_received": 0, "reopened_count": 0,
                  "created_at": utcnow(), "updated_at": utcnow()}
        session.execute(_insert(session, Series).values(**values)
                        .on_conflict_do_nothing(index_elements=["series_instance_uid"]))
    rows = session.execute(select(Series.series_instance_uid, Series.id)
                           .where(Series.series_instance_uid.in_(list(first)))).all()
    return {uid: series_id for uid, series_id in rows}


@dataclass(slots=True)
class _SeriesDelta:
    new_distinct: int = 0
    new_rows: int = 0
    conflicts: int = 0
    bytes: int = 0
    first_received: datetime | None = None
    last_received: datetime | None = None
    acquired_at: datetime | None = None
    expected: int | None = None
    association_id: str | None = None
    any_association: bool = False


def _chunks(values: Sequence[Any], size: int = 400) -> list[Sequence[Any]]:
    return [values[i:i + size] for i in range(0, len(values), size)]


def write_instances(session: Session, items: Sequence[ReceivedInstance], *,
                    use_images_in_acquisition: bool = True) -> BatchResult:
    """Record prepared instances in the caller's transaction; see the module docstring.

    A handful of statements per batch whatever its size (multi-row ``INSERT .. ON CONFLICT
    DO NOTHING RETURNING``, one grouped sibling query, one ``UPDATE`` per series), because
    this runs in the SCP process and every millisecond of Python here competes for the GIL
    with the C-STORE hot path.
    """
    result = BatchResult()
    if not items:
        return result
    study_ids = _upsert_studies(session, items)
    series_ids = _upsert_series(session, items, study_ids)
    lock = select(Series.id, Series.state).where(Series.id.in_(sorted(series_ids.values()))) \
        .order_by(Series.id)
    if _is_postgres(session):
        lock = lock.with_for_update()
    states = {row.id: row.state for row in session.execute(lock)}

    unique: dict[tuple[str, str], ReceivedInstance] = {}
    for item in items:
        assert item.sha256 is not None
        unique.setdefault((item.sop_instance_uid, item.sha256), item)
    rows = []
    for (sop_uid, sha), item in unique.items():
        header = item.header
        assert header is not None
        rows.append({
            "series_id": series_ids[item.series_instance_uid], "sop_instance_uid": sop_uid,
            "sop_class_uid": header.sop_class_uid[:64], "instance_number": header.instance_number,
            "transfer_syntax_uid": header.transfer_syntax_uid,
            "spool_path": item.stored.relative_path, "size_bytes": item.stored.size,
            "sha256": sha, "duplicate_conflict": False, "association_id": item.association_id,
            "calling_ae": item.calling_ae, "received_at": item.received_at})
    # executemany with RETURNING ("insertmanyvalues"): compiled once, cached across batches.
    statement = (_insert(session, Instance)
                 .on_conflict_do_nothing(index_elements=["sop_instance_uid", "sha256"])
                 .returning(Instance.sop_instance_uid, Instance.sha256))
    inserted: set[tuple[str, str]] = set()
    for chunk in _chunks(rows):
        inserted.update((sop, sha) for sop, sha in session.execute(statement, list(chunk)).all())
    result.instances_new = len(inserted)
    result.instances_known = len(items) - len(inserted)
    if not inserted:
        return result

    new_per_sop: dict[str, int] = {}
    for sop_uid, _ in inserted:
        new_per_sop[sop_uid] = new_per_sop.get(sop_uid, 0) + 1
    copies: dict[str, int] = {}
    for chunk in _chunks(sorted(new_per_sop)):
        copies.update(session.execute(
            select(Instance.sop_instance_uid, func.count(Instance.id))
            .where(Instance.sop_instance_uid.in_(list(chunk)))
            .group_by(Instance.sop_instance_uid)
            .having(func.count(Instance.id) > 1)).all())
    for chunk in _chunks(sorted(copies)):
        session.execute(update(Instance).where(Instance.sop_instance_uid.in_(list(chunk)))
                        .values(duplicate_conflict=True))

    deltas: dict[int, _SeriesDelta] = {}
    counted: set[str] = set()
    series_keys: dict[int, tuple[str, str]] = {}
    for key, item in unique.items():
        if key not in inserted:
            continue
        sop_uid = key[0]
        series_id = series_ids[item.series_instance_uid]
        series_keys[series_id] = (item.study_instance_uid, item.series_instance_uid)
        delta = deltas.setdefault(series_id, _SeriesDelta())
        delta.new_rows += 1
        delta.bytes += item.stored.size
        total = copies.get(sop_uid, 1)
        earlier = total - new_per_sop[sop_uid]
        if earlier == 0 and sop_uid not in counted:
            delta.new_distinct += 1
            counted.add(sop_uid)
        else:
            delta.conflicts += 1
            result.conflicts += 1
            # Same SOP Instance UID, different bytes: both kept, both flagged, audited.
            record(session, EVENT_DUPLICATE_CONFLICT, outcome="warning", actor=item.calling_ae,
                   study_instance_uid=item.study_instance_uid,
                   series_instance_uid=item.series_instance_uid,
                   details={"sop_instance_uid": sop_uid, "spool_path": item.stored.relative_path,
                            "sha256": key[1], "copies": total,
                            "association_id": item.association_id})
        header = item.header
        assert header is not None
        delta.first_received = _earliest(delta.first_received, item.received_at)
        delta.last_received = _latest(delta.last_received, item.received_at)
        delta.acquired_at = _earliest(delta.acquired_at, header.acquired_at)
        # A multi-frame object's own count wins: its Images in Acquisition counts frames.
        hint = header.frame_instances or (header.images_in_acquisition
                                          if use_images_in_acquisition else None)
        if hint:
            delta.expected = max(delta.expected or 0, hint)
        if item.association_id is not None:
            delta.association_id = item.association_id
            delta.any_association = True

    for series_id in sorted(deltas):
        delta = deltas[series_id]
        current = session.execute(
            select(Series.first_received_at, Series.last_received_at, Series.acquired_at,
                   Series.expected_instances).where(Series.id == series_id)).one()
        values: dict[str, Any] = {
            "instance_count": Series.instance_count + delta.new_distinct,
            "bytes_received": Series.bytes_received + delta.bytes,
            "first_received_at": _earliest(current.first_received_at, delta.first_received),
            "last_received_at": _latest(current.last_received_at, delta.last_received),
            "acquired_at": _earliest(current.acquired_at, delta.acquired_at),
            "updated_at": utcnow(),
        }
        if delta.expected and (current.expected_instances or 0) < delta.expected:
            values["expected_instances"] = delta.expected
        if delta.any_association:
            # An open association just delivered: the release clock starts again.
            values["last_association_id"] = delta.association_id
            values["association_released_at"] = None
        previous_state = states.get(series_id, SeriesState.RECEIVING)
        if previous_state != SeriesState.RECEIVING:
            values.update(state=SeriesState.RECEIVING, reopened_count=Series.reopened_count + 1,
                          completion_reason=None, state_reason=None, state_detail=None,
                          qualified=None, qualification_reason=None, qualification_detail=None)
            result.reopened.append(series_id)
            study_uid, series_uid = series_keys[series_id]
            record(session, EVENT_SERIES_REOPENED, study_instance_uid=study_uid,
                   series_instance_uid=series_uid,
                   details={"previous_state": str(previous_state),
                            "new_instances": delta.new_rows})
            logger.info("series %s reopened (was %s): %d new instances", series_uid,
                        previous_state, delta.new_rows)
        session.execute(update(Series).where(Series.id == series_id).values(**values))
        result.touched_series_ids.add(series_id)
    return result


def write_association(session: Session, item: AssociationRecord | AssociationRejected) -> None:
    """Audit one association; an ended one also starts the release clock of its series."""
    if isinstance(item, AssociationRejected):
        record(session, EVENT_ASSOCIATION, outcome="failure", actor=item.calling_ae,
               source_ip=item.address, occurred_at=item.at,
               details={"accepted": False, "reason": item.reason, "called_ae": item.called_ae,
                        "calling_ae": item.calling_ae, "address": item.address,
                        "port": item.port, "tls": item.tls})
        return
    ended_at = item.ended_at or utcnow()
    session.execute(update(Series)
                    .where(Series.last_association_id == item.association_id,
                           Series.state == SeriesState.RECEIVING)
                    .values(association_released_at=ended_at, updated_at=utcnow()))
    outcome = "success" if item.how == "released" and not item.failures else "warning"
    record(session, EVENT_ASSOCIATION, outcome=outcome, actor=item.calling_ae,
           source_ip=item.address, occurred_at=ended_at,
           details={"accepted": True, "association_id": item.association_id,
                    "ended": item.how, "called_ae": item.called_ae,
                    "calling_ae": item.calling_ae, "address": item.address, "port": item.port,
                    "instances": item.instances, "bytes": item.bytes,
                    "duplicates": item.duplicates, "conflicts": item.conflicts,
                    "failures": item.failures, "mpps": item.mpps, "tls": item.tls,
                    "started_at": item.started_at.isoformat(),
                    "duration_s": round((ended_at - item.started_at).total_seconds(), 3)})


def write_batch(session: Session, items: Sequence[BookItem], *,
                use_images_in_acquisition: bool = True) -> BatchResult:
    """Write a mixed batch in order: instances before the association events that follow."""
    result = BatchResult()
    run: list[ReceivedInstance] = []

    def flush_run() -> None:
        if run:
            part = write_instances(session, run,
                                   use_images_in_acquisition=use_images_in_acquisition)
            result.instances_new += part.instances_new
            result.instances_known += part.instances_known
            result.conflicts += part.conflicts
            result.reopened.extend(part.reopened)
            result.touched_series_ids |= part.touched_series_ids
            run.clear()

    for item in items:
        if isinstance(item, ReceivedInstance):
            prepare(item)
            run.append(item)
        else:
            flush_run()
            write_association(session, item)
    flush_run()
    return result


class Bookkeeper:
    """Queue + flusher thread. ``submit`` is cheap and never touches the database."""

    def __init__(self, session_factory: sessionmaker[Session], *, interval_s: float = 0.2,
                 use_images_in_acquisition: bool = True,
                 on_flushed: Callable[[BatchResult], None] | None = None,
                 max_backoff_s: float = 10.0) -> None:
        self._factory = session_factory
        self._interval_s = interval_s
        self._use_iia = use_images_in_acquisition
        self._on_flushed = on_flushed
        self._max_backoff_s = max_backoff_s
        self._queue: queue.SimpleQueue[BookItem] = queue.SimpleQueue()
        self._pending: list[BookItem] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.last_error: str | None = None

    def submit(self, item: BookItem) -> None:
        self._queue.put(item)

    @property
    def backlog(self) -> int:
        return len(self._pending) + self._queue.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-bookkeeper", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread after a last flush (retried until ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.backlog and time.monotonic() < deadline:
            if self.flush():
                break
            time.sleep(0.5)
        if self.backlog:
            logger.error("bookkeeper stopped with %d unwritten items: the next start rebuilds "
                         "them from the spool", self.backlog)

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self._interval_s
            if self._failures:
                delay = min(self._max_backoff_s, self._interval_s * 2 ** self._failures)
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - the flusher thread must never die
                logger.exception("bookkeeper flush crashed")

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, ReceivedInstance):
                # Hash and parse now, even if the database is down, so no bytes pile up.
                prepare(item)
            self._pending.append(item)

    def flush(self) -> bool:
        """Write everything queued so far; ``True`` when the backlog is empty afterwards."""
        with self._flush_lock:
            self._drain()
            if not self._pending:
                return True
            batch = list(self._pending)
            try:
                result = self._write(batch)
            except Exception as exc:  # noqa: BLE001 - a bad item must not stop the flusher
                if _is_outage(exc):
                    return self._keep(batch, exc)
                try:
                    result, failed = self._write_one_by_one(batch)
                except SQLAlchemyError as again:
                    return self._keep(batch, again)
                if len(failed) == len(batch):
                    # Nothing at all could be written (e.g. the schema is not there yet):
                    # a problem of the database, not of the items. Keep them all.
                    return self._keep(batch, exc)
                for item in failed:
                    logger.error("bookkeeping item skipped (its file stays in the spool; the "
                                 "next rebuild retries it): %s", _describe(item))
            del self._pending[:len(batch)]
            self._failures = 0
            self.last_error = None
        if self._on_flushed is not None and (result.touched_series_ids or result.reopened):
            try:
                self._on_flushed(result)
            except Exception:  # noqa: BLE001
                logger.exception("on_flushed callback failed")
        return not self._pending

    def _keep(self, batch: Sequence[BookItem], exc: Exception) -> bool:
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        logger.warning("database unavailable, %d bookkeeping items kept for retry (%s)",
                       len(batch), self.last_error)
        return False

    def _write(self, batch: Sequence[BookItem]) -> BatchResult:
        with self._factory() as session, session.begin():
            return write_batch(session, batch, use_images_in_acquisition=self._use_iia)

    def _write_one_by_one(self, batch: Sequence[BookItem]
                          ) -> tuple[BatchResult, list[BookItem]]:
        """A batch that failed for a reason other than connectivity: isolate bad items.

        Returns what was written and the items that could not be; an outage meanwhile
        raises (nothing is lost: every write is idempotent and the caller keeps the batch).
        """
        total = BatchResult()
        failed: list[BookItem] = []
        for item in batch:
            try:
                part = self._write([item])
            except Exception as exc:  # noqa: BLE001
                if _is_outage(exc):
                    raise
                logger.warning("bookkeeping item failed: %s (%s)", _describe(item),
                               str(exc).splitlines()[0][:200])
                failed.append(item)
                continue
            total.instances_new += part.instances_new
            total.instances_known += part.instances_known
            total.conflicts += part.conflicts
            total.reopened.extend(part.reopened)
            total.touched_series_ids |= part.touched_series_ids
        return total, failed


def _is_outage(exc: Exception) -> bool:
    """Connection-level failures: the database is away, the batch must wait for it."""
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError)
                                                 and bool(exc.connection_invalidated))


def _describe(item: BookItem) -> str:
    if isinstance(item, ReceivedInstance):
        return f"instance {item.sop_instance_uid} ({item.stored.relative_path})"
    if isinstance(item, AssociationRecord):
        return f"association {item.association_id}"
    return f"rejected association from {item.calling_ae}@{item.address}"


# --- rebuild from the spool --------------------------------------------------------------------

@dataclass(slots=True)
class RebuildReport:
    series_dirs: int = 0
    files: int = 0
    recovered: int = 0
    quarantined: int = 0
    partials_removed: int = 0


def _known_counts(session: Session) -> dict[str, int]:
    """``"<study>/<series>"`` path prefix -> number of instance rows, from one query."""
    rows = session.execute(
        select(Study.study_instance_uid, Series.series_instance_uid, func.count(Instance.id))
        .join(Series, Series.study_id == Study.id)
        .join(Instance, Instance.series_id == Series.id)
        .group_by(Study.study_instance_uid, Series.series_instance_uid)).all()
    return {f"{path_component(study)}/{path_component(series)}": count
            for study, series, count in rows}


def _recover_file(spool: Spool, path: Any) -> ReceivedInstance:
    """The bookkeeping item of a spool file, after the same structural check as the SCP's.

    A file that fails it was never acknowledged (e.g. a crash between the link and the fsync
    of the spool write): it goes to quarantine rather than into the database.
    """
    relative = path.relative_to(spool.root).as_posix()
    data = path.read_bytes()
    try:
        syntax, offset = split_part10(data)
        keys = scan_dataset(data[offset:], syntax)
    except UndecodableDataset as exc:
        raise UnreadableHeader(f"{relative}: {exc}") from exc
    if not (keys.study_instance_uid and keys.series_instance_uid and keys.sop_instance_uid):
        raise UnreadableHeader(f"{relative}: missing Study/Series/SOP Instance UID")
    stat = path.stat()
    return ReceivedInstance(
        study_instance_uid=keys.study_instance_uid,
        series_instance_uid=keys.series_instance_uid,
        sop_instance_uid=keys.sop_instance_uid,
        stored=StoredFile(relative, len(data), StoreOutcome.NEW, None),
        received_at=datetime.fromtimestamp(stat.st_mtime, UTC), data=data, keys=keys,
        transfer_syntax_uid=syntax)


def rebuild_from_spool(spool: Spool, session_factory: sessionmaker[Session], *,
                       batch_size: int = 200, use_images_in_acquisition: bool = True,
                       partial_max_age_s: float = 600.0) -> RebuildReport:
    """Make the database know every instance file in the spool (the spool is the truth).

    Series directories whose file count matches the database are skipped with one grouped
    query; only the others are compared file by file. Files that cannot be read are moved to
    the quarantine directory (never deleted). Safe to run while SCPs are receiving.
    """
    report = RebuildReport()
    report.partials_removed = spool.remove_partials(partial_max_age_s)
    with session_factory() as session:
        known = _known_counts(session)
    pending: list[BookItem] = []

    def write_pending() -> None:
        if pending:
            with session_factory() as session, session.begin():
                write_batch(session, pending, use_images_in_acquisition=use_images_in_acquisition)
            pending.clear()

    for series_dir in spool.iter_series_dirs():
        report.series_dirs += 1
        files = list(spool.iter_instance_files(series_dir))
        report.files += len(files)
        prefix = series_dir.relative_to(spool.root).as_posix()
        if known.get(prefix, 0) >= len(files):
            continue
        with session_factory() as session:
            have = set(session.execute(select(Instance.spool_path)
                                       .where(Instance.spool_path.like(prefix + "/%")))
                       .scalars())
        for path in files:
            relative = path.relative_to(spool.root).as_posix()
            if relative in have:
                continue
            try:
                pending.append(_recover_file(spool, path))
            except (UnreadableHeader, OSError) as exc:
                spool.quarantine(path, str(exc))
                report.quarantined += 1
                continue
            report.recovered += 1
            if len(pending) >= batch_size:
                write_pending()
    write_pending()
    if report.recovered or report.quarantined:
        with session_factory() as session, session.begin():
            record(session, EVENT_REBUILD, details={
                "recovered": report.recovered, "quarantined": report.quarantined,
                "files": report.files, "series_dirs": report.series_dirs})
        logger.info("rebuilt %d instance rows from the spool (%d quarantined)",
                    report.recovered, report.quarantined)
    return report

