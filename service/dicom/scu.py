"""Send result objects (SR, SEG, key image) to the PACS: C-STORE SCU, optional STOW-RS.

Two layers:

- :func:`send_files` / :func:`stow_files`: one association (or one STOW request) to one
  destination, no database. The SCU proposes, for each SOP class, the object's own transfer
  syntax and, separately, the uncompressed ones; when the peer refuses JPEG 2000 for a SEG
  (or answers a compressed C-STORE with a "cannot understand" status) the object is
  transcoded to Explicit VR Little Endian and sent again on the same association.
- :func:`export_analysis`: the ``Export`` rows of one analysis, per object and destination,
  ``PENDING -> SENT | RETRYING -> FAILED``, retried with exponential backoff (tenacity) for
  transient errors only, every transition audited (``export.sent``, ``export.retrying``,
  ``export.failed``).

Transient: connection refused or reset, timeouts, association rejected-transient, aborts,
C-STORE "out of resources" (0xA7xx) or a missing response. Permanent: association
rejected-permanent (e.g. unknown called AE title), SOP class refused by every presentation
context (e.g. LABELMAP SEG at a PACS that does not know the class), any other failure status.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.pixels import pack_bits
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from service.audit.trail import record
from service.config import PacsDestination, Settings
from service.db.tables import Analysis, Export, ExportState, Series
from service.db.types import utcnow
from service.results.build import kinds_for, kinds_for_destination
from service.results.store import StoredObject
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_STATUS_SUCCESS = 0x0000
_WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}
_MAX_BACKOFF_S = 600.0


class ExportDeferred(Exception):
    """Raised by the ``sleep`` of :func:`export_analysis` that hands the wait to the caller
    (the export task, which asks the broker to run it again in ``seconds``): rows are
    RETRYING and committed, the attempt count lives on the rows, so the next run continues
    the backoff schedule instead of holding a worker process while a PACS is down."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"export deferred by {seconds:.1f} s")
        self.seconds = seconds


class ExportError(Exception):
    """Sending to a destination failed; ``transient`` says whether a retry may help."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class StoreOutcome:
    """Result of sending one object to one destination."""

    sop_instance_uid: str
    ok: bool
    transient: bool = False
    status: int | None = None
    transfer_syntax_uid: str | None = None
    error: str | None = None


# --- transcoding ---------------------------------------------------------------------------------


def to_explicit_little_endian(ds: Dataset) -> Dataset:
    """Decompress ``ds`` in place to Explicit VR Little Endian (same UIDs, same pixels).

    pydicom decodes a 1-bit BINARY SEG to one byte per pixel; native encoding of
    BitsAllocated 1 needs the bits packed again (frames are contiguous, not byte-aligned).
    """
    if ds.file_meta.TransferSyntaxUID in UNCOMPRESSED:
        return ds
    bits_allocated = int(ds.get("BitsAllocated", 8))
    if bits_allocated == 1:
        pixels = np.asarray(ds.pixel_array, dtype=np.uint8)
        packed = pack_bits(pixels.ravel(), pad=True)
        del ds.PixelData
        ds.PixelData = packed
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds.decompress()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# --- C-STORE ----------------------------------------------------------------------------------


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    """Client TLS context: verify the peer against ``tls_ca_file`` (system CAs when unset) and
    present our certificate when one is configured (mutual TLS)."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH,
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None,
    )
    if settings.tls_cert_file and settings.tls_key_file:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    return context


def _make_ae(settings: Settings, datasets: Sequence[Dataset]) -> AE:
    ae = AE(ae_title=settings.ae_title)
    timeout = settings.export_timeout_s
    ae.acse_timeout = min(settings.acse_timeout_s, timeout)
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = settings.max_pdu_size
    proposed: set[tuple[str, tuple[str, ...]]] = set()
    for ds in datasets:
        sop_class = str(ds.SOPClassUID)
        own = str(ds.file_meta.TransferSyntaxUID)
        syntaxes: list[tuple[str, ...]] = [tuple(str(u) for u in UNCOMPRESSED)]
        if own not in UNCOMPRESSED:
            syntaxes.insert(0, (own,))
        for group in syntaxes:
            if (sop_class, group) not in proposed:
                ae.add_requested_context(sop_class, list(group))
                proposed.add((sop_class, group))
    return ae


def _status_transient(status: int) -> bool:
    return (status & 0xFF00) == 0xA700  # Refused: out of resources


def _needs_uncompressed_retry(status: int) -> bool:
    return (status & 0xF000) == 0xC000 or (status & 0xFF00) == 0xA900


def send_files(destination: PacsDestination, paths: Sequence[Path], *,
               settings: Settings) -> list[StoreOutcome]:
    """C-STORE the files in ``paths`` to ``destination`` over one association.

    Raises :class:`ExportError` when no association can be made; per-object failures are
    returned as outcomes.
    """
    datasets = [dcmread(path) for path in paths]
    return send_datasets(destination, datasets, settings=settings)


def send_datasets(destination: PacsDestination, datasets: Sequence[Dataset], *,
                  settings: Settings) -> list[StoreOutcome]:
    """As :func:`send_files`, for datasets already in memory (each with file meta)."""
    if not datasets:
        return []
    ae = _make_ae(settings, datasets)
    received: dict[str, Any] = {}

    def _on_acse_recv(event: evt.Event) -> None:
        received["primitive"] = getattr(event, "primitive", None)

    tls_args = (_ssl_context(settings), destination.host) if destination.tls else None
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args, evt_handlers=[(evt.EVT_ACSE_RECV, _on_acse_recv)])
    except (OSError, ssl.SSLError) as exc:
        raise ExportError(f"{destination.label}: {exc}", transient=True) from exc
    if not assoc.is_established:
        primitive = received.get("primitive")
        result = getattr(primitive, "result", None)
        # Trust a received A-ASSOCIATE-RJ even when the peer's immediate close was processed
        # first and flagged the association as aborted.
        if primitive is not None and result in (0x01, 0x02):
            reason = f"{primitive.result_str}, {primitive.source_str}: {primitive.reason_str}"
            raise ExportError(f"{destination.label}: association rejected ({reason})",
                              transient=result == 0x02)
        if assoc.is_aborted:
            raise ExportError(f"{destination.label}: association aborted "
                              "(no presentation context accepted?)", transient=True)
        raise ExportError(f"{destination.label}: cannot connect or no answer within "
                          f"{settings.export_timeout_s:g} s", transient=True)
    try:
        return [_store_one(assoc, ds, destination) for ds in datasets]
    finally:
        if assoc.is_established:
            assoc.release()


def _accepted_syntaxes(assoc: Any, sop_class: str) -> set[str]:
    return {str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if str(cx.abstract_syntax) == sop_class}


def _store_one(assoc: Any, ds: Dataset, destination: PacsDestination) -> StoreOutcome:
    uid = str(ds.SOPInstanceUID)
    sop_class = str(ds.SOPClassUID)
    accepted = _accepted_syntaxes(assoc, sop_class)
    if not accepted:
        return StoreOutcome(uid, ok=False, transient=False,
                            error=f"{destination.label} accepts no presentation context for "
                                  f"SOP class {UID(sop_class).name} ({sop_class})")
    own = str(ds.file_meta.TransferSyntaxUID)
    if own not in accepted:
        if not accepted & {str(u) for u in UNCOMPRESSED}:
            return StoreOutcome(uid, ok=False, error=f"{destination.label}: no usable transfer "
                                f"syntax for {UID(sop_class).name}")
        logger.info("%s refused %s for %s: sending Explicit VR Little Endian",
                    destination.label, UID(own).name, uid)
        ds = to_explicit_little_endian(ds)
    outcome = _c_store(assoc, ds, destination)
    if (not outcome.ok and outcome.status is not None and _needs_uncompressed_retry(outcome.status)
            and str(ds.file_meta.TransferSyntaxUID) not in UNCOMPRESSED
            and accepted & {str(u) for u in UNCOMPRESSED}):
        logger.info("%s answered 0x%04X to %s in %s: retrying Explicit VR Little Endian",
                    destination.label, outcome.status, uid,
                    UID(str(ds.file_meta.TransferSyntaxUID)).name)
        outcome = _c_store(assoc, to_explicit_little_endian(ds), destination)
    return outcome


def _c_store(assoc: Any, ds: Dataset, destination: PacsDestination) -> StoreOutcome:
    uid = str(ds.SOPInstanceUID)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    try:
        response = assoc.send_c_store(ds)
    except (OSError, RuntimeError, ValueError) as exc:
        return StoreOutcome(uid, ok=False, transient=True, transfer_syntax_uid=syntax,
                            error=f"{destination.label}: C-STORE failed: {exc}")
    status = getattr(response, "Status", None)
    if status is None:
        return StoreOutcome(uid, ok=False, transient=True, transfer_syntax_uid=syntax,
                            error=f"{destination.label}: no C-STORE response (timeout or abort)")
    status = int(status)
    if status == _STATUS_SUCCESS or status in _WARNING_STATUSES:
        return StoreOutcome(uid, ok=True, status=status, transfer_syntax_uid=syntax)
    comment = str(response.get("ErrorComment", "")) if hasattr(response, "get") else ""
    return StoreOutcome(uid, ok=False, transient=_status_transient(status), status=status,
                        transfer_syntax_uid=syntax,
                        error=f"{destination.label}: C-STORE status 0x{status:04X} {comment}"
                              .rstrip())


# --- STOW-RS ---------------------------------------------------------------------------------


def stow_label(url: str) -> str:
    """Destination name of a STOW-RS service in ``Export.destination`` (no credentials)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"STOW {parts.scheme}://{host}{port}{parts.path}"[:128]


def stow_files(url: str, paths: Sequence[Path], *, settings: Settings) -> list[StoreOutcome]:
    """Store the files through DICOMweb STOW-RS at ``url`` (the service root) in one request."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = [dcmread(path) for path in paths]
    if not datasets:
        return []
    client = DICOMwebClient(url=url, timeout=settings.export_timeout_s)
    label = stow_label(url)
    try:
        response = client.store_instances(datasets=datasets)
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        transient = status is None or status >= 500 or status in (408, 429)
        raise ExportError(f"{label}: HTTP {status}: {exc}", transient=transient) from exc
    except (requests.ConnectionError, requests.Timeout, OSError) as exc:
        raise ExportError(f"{label}: {exc}", transient=True) from exc
    failed = {str(item.ReferencedSOPInstanceUID): int(item.get("FailureReason", 0))
              for item in response.get("FailedSOPSequence", [])}
    outcomes = []
    for ds in datasets:
        uid = str(ds.SOPInstanceUID)
        if uid in failed:
            outcomes.append(StoreOutcome(uid, ok=False, transient=_status_transient(failed[uid]),
                                         status=failed[uid],
                                         error=f"{label}: failure reason 0x{failed[uid]:04X}"))
        else:
            outcomes.append(StoreOutcome(uid, ok=True,
                                         transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID)))
    return outcomes


# --- export state ---------------------------------------------------------------------------


Sender = Callable[[Sequence[Path]], list[StoreOutcome]]


@dataclass(frozen=True)
class ExportTarget:
    """A configured destination: its label in ``Export.destination``, the kinds it receives
    and how to send to it."""

    label: str
    kinds: list[ObjectKind]
    send: Sender = field(compare=False)


def export_targets(settings: Settings) -> list[ExportTarget]:
    """Every configured C-STORE destination, then the STOW-RS service when set."""
    def c_store_sender(destination: PacsDestination) -> Sender:
        def send(paths: Sequence[Path]) -> list[StoreOutcome]:
            return send_files(destination, paths, settings=settings)

        return send

    targets = [
        ExportTarget(label=destination.label[:128],
                     kinds=kinds_for_destination(destination, settings),
                     send=c_store_sender(destination))
        for destination in settings.pacs_destinations
    ]
    if settings.stow_rs_url:
        url = settings.stow_rs_url
        from service.config import SegFormat

        targets.append(ExportTarget(
            label=stow_label(url),
            kinds=kinds_for(SegFormat.BINARY, secondary_capture=settings.secondary_capture),
            send=lambda paths: stow_files(url, paths, settings=settings),
        ))
    return targets


def plan_exports(session: Session, analysis_id: int, stored: Mapping[ObjectKind, StoredObject],
                 targets: Sequence[ExportTarget]) -> list[Export]:
    """Create or refresh the ``Export`` rows of an analysis: one per object and destination.

    A row already SENT with the same SOP Instance UID stays SENT; anything else becomes
    PENDING with its attempt count reset. Kinds a destination wants but that were not built
    (e.g. no SEG because nothing was segmented, no key image without a suspicion) get no row.
    """
    existing = {
        (row.object_kind, row.destination): row
        for row in session.execute(select(Export).where(Export.analysis_id == analysis_id))
        .scalars()
    }
    rows: list[Export] = []
    for target in targets:
        for kind in target.kinds:
            obj = stored.get(kind)
            if obj is None:
                continue
            row = existing.get((kind.value, target.label))
            if row is None:
                row = Export(analysis_id=analysis_id, object_kind=kind.value,
                             destination=target.label, sop_instance_uid=obj.sop_instance_uid,
                             file_path=str(obj.path), state=ExportState.PENDING, attempts=0)
                session.add(row)
            elif row.state is not ExportState.SENT or row.sop_instance_uid != obj.sop_instance_uid:
                row.sop_instance_uid = obj.sop_instance_uid
                row.file_path = str(obj.path)
                row.state = ExportState.PENDING
                row.attempts = 0
                row.last_error = None
            else:
                row.file_path = str(obj.path)
            rows.append(row)
    session.flush()
    return rows


class _AttemptFailed(Exception):
    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__("; ".join(sorted(set(errors.values()))))
        self.errors = errors


@dataclass
class ExportSummary:
    """State of every export row of the analysis after :func:`export_analysis`."""

    states: dict[tuple[str, str], ExportState] = field(default_factory=dict)
    """(destination, object kind) -> state."""

    @property
    def all_sent(self) -> bool:
        return bool(self.states) and all(s is ExportState.SENT for s in self.states.values())


def _audit(session: Session, event_type: str, row: Export, analysis: Analysis, settings: Settings,
           *, outcome: str, error: str | None = None) -> None:
    series: Series | None = analysis.series
    record(
        session, event_type, outcome=outcome, actor=settings.ae_title,
        study_instance_uid=series.study.study_instance_uid if series is not None else None,
        series_instance_uid=series.series_instance_uid if series is not None else None,
        details={"analysis_id": analysis.id, "object_kind": row.object_kind,
                 "sop_instance_uid": row.sop_instance_uid, "destination": row.destination,
                 "attempts": row.attempts, **({"error": error} if error else {})},
    )


def export_analysis(
    session_factory: sessionmaker[Session],
    analysis_id: int,
    settings: Settings,
    *,
    targets: Sequence[ExportTarget] | None = None,
    resend: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportSummary:
    """Send every not-yet-SENT export row of the analysis (all rows with ``resend``).

    Each destination is tried up to ``settings.export_max_retries`` times, waiting
    ``export_retry_backoff_s * 2**n`` seconds (capped at 10 min) between tries; the rows
    are committed after every try, so the dashboard sees RETRYING while we wait.
    Re-sending is harmless: the objects keep their deterministic UIDs, so the PACS replaces
    rather than duplicates them. The schedule continues from the rows' attempt counts, so a
    ``sleep`` that raises :class:`ExportDeferred` (after every destination had its try)
    defers the wait to a later call without restarting the backoff.
    """
    targets = list(targets if targets is not None else export_targets(settings))
    deferred: list[float] = []
    for target in targets:
        try:
            _export_to_target(session_factory, analysis_id, target, settings, resend=resend,
                              sleep=sleep)
        except ExportDeferred as exc:
            deferred.append(exc.seconds)
    if deferred:
        raise ExportDeferred(min(deferred))
    summary = ExportSummary()
    with session_factory() as session:
        analysis = session.get(Analysis, analysis_id)
        if analysis is None:
            raise LookupError(f"analysis {analysis_id} does not exist")
        for row in analysis.exports:
            summary.states[(row.destination, row.object_kind)] = row.state
        if summary.all_sent and analysis.exported_at is None:
            analysis.exported_at = utcnow()
        session.commit()
    return summary


def _export_to_target(session_factory: sessionmaker[Session], analysis_id: int,
                      target: ExportTarget, settings: Settings, *, resend: bool,
                      sleep: Callable[[float], None]) -> None:
    def pending_ids(session: Session) -> list[int]:
        query = select(Export.id).where(Export.analysis_id == analysis_id,
                                        Export.destination == target.label)
        if not resend:
            query = query.where(Export.state != ExportState.SENT)
        rows = list(session.execute(query.order_by(Export.id)).scalars())
        return rows

    with session_factory() as session:
        todo = pending_ids(session)
        # Tries already made by earlier calls (a deferred export): the schedule goes on.
        tried = 0 if resend or not todo else min(session.execute(
            select(Export.attempts).where(Export.id.in_(todo))).scalars())
    if not todo:
        return
    if resend:
        with session_factory() as session:
            for row in session.execute(select(Export).where(Export.id.in_(todo))).scalars():
                row.state = ExportState.PENDING
            session.commit()

    # Rows still to send on the next try (successes and permanent failures drop out).
    remaining = list(todo)

    def attempt() -> None:
        with session_factory() as session:
            rows = list(session.execute(select(Export).where(Export.id.in_(remaining))
                                        .order_by(Export.id)).scalars())
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            for row in rows:
                row.attempts += 1
            paths = [Path(row.file_path or "") for row in rows]
            try:
                missing = [p for p in paths if not p.is_file()]
                if missing:
                    raise ExportError(f"result file missing: {missing[0]}", transient=False)
                outcomes = {o.sop_instance_uid: o for o in target.send(paths)}
            except ExportError as exc:
                outcomes = {row.sop_instance_uid: StoreOutcome(row.sop_instance_uid, ok=False,
                                                               transient=exc.transient,
                                                               error=str(exc)) for row in rows}
            transient_errors: dict[int, str] = {}
            for row in rows:
                outcome = outcomes.get(row.sop_instance_uid) or StoreOutcome(
                    row.sop_instance_uid, ok=False, transient=True,
                    error=f"{target.label}: object was not sent")
                if outcome.ok:
                    row.state = ExportState.SENT
                    row.sent_at = utcnow()
                    row.last_error = None
                    remaining.remove(row.id)
                    _audit(session, "export.sent", row, analysis, settings, outcome="success")
                    logger.info("export %d: %s %s sent to %s", row.id, row.object_kind,
                                row.sop_instance_uid, target.label)
                elif outcome.transient:
                    row.last_error = outcome.error
                    transient_errors[row.id] = outcome.error or "transient failure"
                else:
                    row.state = ExportState.FAILED
                    row.last_error = outcome.error
                    remaining.remove(row.id)
                    _audit(session, "export.failed", row, analysis, settings, outcome="failure",
                           error=outcome.error)
                    logger.warning("export %d: %s to %s failed permanently: %s", row.id,
                                   row.object_kind, target.label, outcome.error)
            session.commit()
        if transient_errors:
            raise _AttemptFailed(transient_errors)

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        errors = exc.errors if isinstance(exc, _AttemptFailed) else {}
        with session_factory() as session:
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            for row in session.execute(select(Export).where(Export.id.in_(list(errors))))\
                    .scalars():
                row.state = ExportState.RETRYING
                _audit(session, "export.retrying", row, analysis, settings, outcome="failure",
                       error=row.last_error)
            session.commit()
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning("export to %s: attempt %d failed, retrying in %.1f s", target.label,
                       state.attempt_number, wait)

    retrying = Retrying(
        stop=stop_after_attempt(max(1, settings.export_max_retries - tried)),
        wait=wait_exponential(multiplier=settings.export_retry_backoff_s * 2 ** min(tried, 16),
                              max=_MAX_BACKOFF_S),
        retry=retry_if_exception_type(_AttemptFailed),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    try:
        retrying(attempt)
    except _AttemptFailed as exc:
        with session_factory() as session:
            analysis = session.get(Analysis, analysis_id)
            assert analysis is not None
            for row in session.execute(select(Export).where(Export.id.in_(list(exc.errors))))\
                    .scalars():
                row.state = ExportState.FAILED
                _audit(session, "export.failed", row, analysis, settings, outcome="failure",
                       error=row.last_error)
            session.commit()
        logger.error("export to %s failed after %d attempts: %s", target.label,
                     settings.export_max_retries, exc)
