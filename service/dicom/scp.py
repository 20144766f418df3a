"""The Storage SCP: C-ECHO, C-STORE of every common storage class, and MPPS N-CREATE/N-SET.

The C-STORE handler is the hot path and does, in order: a structural walk of the dataset bytes
as received (:mod:`service.ingest.validate`; no pydicom parse, no decode), the Part 10 file
(preamble and file meta encoded by hand, then the dataset bytes exactly as received), the
durable spool write (:meth:`service.ingest.spool.Spool.store`: link, then fsync), a
non-blocking hand-off to the bookkeeper, and only then Success. Everything that touches the
database happens on the bookkeeper's thread, in batches.

Status codes (PS3.4 GG.4, PS3.7 C): ``0xC210`` bytes that are not a complete dataset,
``0xA900`` a dataset that does not match its SOP class (UIDs missing or different from the
request, no pixel data in an image), ``0xA700`` the spool cannot take it (write error, disk
below reserve), ``0xC211`` anything unexpected. A handler never raises into the association.

Access control happens on ``EVT_REQUESTED``, before negotiation, so a rejected peer learns
nothing about our presentation contexts, and every rejection is audited with its reason.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
import time
import uuid
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_SET
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.tables import MppsStatus, PerformedProcedureStep, PerformedProcedureStepReference
from service.db.types import utcnow
from service.dicom.security import AccessPolicy, Rejection, exposure_warning
from service.ingest.bookkeeper import (
    AssociationRecord,
    AssociationRejected,
    Bookkeeper,
    ReceivedInstance,
)
from service.ingest.spool import Spool, SpoolError, SpoolFullError, StoreOutcome
from service.ingest.validate import UndecodableDataset, file_meta_prefix, scan_dataset

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_UNEXPECTED = 0xC211
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_INSTANCE = 0x0111
STATUS_NO_SUCH_INSTANCE = 0x0112
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122

MAX_ASSOCIATIONS = 64


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _requires_pixel_data(sop_class_uid: str) -> bool:
    return "Image Storage" in UID(sop_class_uid).name


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, stoppable without registering in the AE."""

    daemon_threads = True
    block_on_close = False

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class _ReusePortAssociationServer(_AssociationServer):
    """Several receiver processes may bind the same port; the kernel spreads connections."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StorageSCP:
    """One receiver: an AE with its handlers and a listening server thread."""

    def __init__(self, settings: Settings, spool: Spool, bookkeeper: Bookkeeper,
                 session_factory: sessionmaker[Session] | None = None, *,
                 policy: AccessPolicy | None = None,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False) -> None:
        self.settings = settings
        self.spool = spool
        self.bookkeeper = bookkeeper
        self.session_factory = session_factory
        self.policy = policy or AccessPolicy.from_settings(settings)
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        self.ae = self._make_ae()
        self.server: _AssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._stats: dict[int, AssociationRecord] = {}
        self._stats_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_size
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.maximum_associations = MAX_ASSOCIATIONS
        # Access is checked on EVT_REQUESTED (audited); pynetdicom's own checks stay off.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(ModalityPerformedProcedureStep, ALL_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_N_CREATE, self.on_n_create),
            (evt.EVT_N_SET, self.on_n_set),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Bind and serve in a background thread; returns the bound address."""
        address = (host or self.settings.dicom_host, self.settings.dicom_port
                   if port is None else port)
        server_class = _ReusePortAssociationServer if self.reuse_port else _AssociationServer
        server = self.ae.make_server(address, ssl_context=self.ssl_context,
                                     evt_handlers=self.handlers(), server_class=server_class)
        assert isinstance(server, _AssociationServer)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's standard handlers format a log dump of every PDU and DIMSE message
            # (an INFO line per C-STORE among them); we audit and log what matters ourselves.
            for event, handler in ((evt.EVT_PDU_RECV, standard_pdu_recv_handler),
                                   (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
                                   (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
                                   (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler)):
                server.unbind(event, handler)
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-acceptor",
                                        daemon=True)
        self._thread.start()
        bound = server.server_address
        logger.info("DICOM SCP %s listening on %s:%s%s", self.settings.ae_title, bound[0],
                    bound[1], " (TLS)" if self.ssl_context else "")
        exposure = exposure_warning(self.settings, str(bound[0]))
        if exposure:
            logger.warning("%s", exposure)
        return str(bound[0]), int(bound[1])

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def active_associations(self) -> int:
        with self._stats_lock:
            return len(self._stats)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, let running associations finish for ``grace_s``, abort the rest."""
        if self.server is not None:
            self.server.shutdown()
        deadline = time.monotonic() + grace_s
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.server is not None:
            for assoc in self.server.active_associations:
                assoc.abort()
        self.server = None

    # --- association events --------------------------------------------------------------------
    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        address = str(assoc.requestor.address)
        port = int(assoc.requestor.port)
        rejection: Rejection | None = self.policy.check(called, calling, address)
        if rejection is not None:
            logger.warning("association from %s@%s rejected: %s", calling, address,
                           rejection.reason.value)
            self.bookkeeper.submit(AssociationRejected(
                calling_ae=calling, called_ae=called, address=address, port=port,
                reason=rejection.reason.value, at=utcnow(), tls=self.ssl_context is not None))
            assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
            assoc.kill()
            return
        stats = AssociationRecord(association_id=uuid.uuid4().hex, calling_ae=calling,
                                  called_ae=called, address=address, port=port,
                                  started_at=utcnow(), tls=self.ssl_context is not None)
        with self._stats_lock:
            self._stats[id(assoc)] = stats

    def _stats_for(self, assoc: Any) -> AssociationRecord:
        stats = self._stats.get(id(assoc))
        if stats is None:  # pragma: no cover - EVT_REQUESTED always runs first
            stats = AssociationRecord(uuid.uuid4().hex, "", "", "", 0, utcnow(),
                                      tls=self.ssl_context is not None)
            with self._stats_lock:
                self._stats[id(assoc)] = stats
        return stats

    def _ended(self, assoc: Any, how: str) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is None:
            return
        self.bookkeeper.submit(stats.end(how))

    def on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejection during negotiation (e.g. too many associations)."""
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is not None:
            self.bookkeeper.submit(AssociationRejected(
                calling_ae=stats.calling_ae, called_ae=stats.called_ae, address=stats.address,
                port=stats.port, reason="NEGOTIATION_REJECTED", at=utcnow(),
                tls=self.ssl_context is not None))

    def on_released(self, event: evt.Event) -> None:
        self._ended(event.assoc, "released")

    def on_aborted(self, event: evt.Event) -> None:
        self._ended(event.assoc, "aborted")

    def on_closed(self, event: evt.Event) -> None:
        # A peer that vanished without A-RELEASE or A-ABORT (killed, cable pulled).
        self._ended(event.assoc, "aborted")

    # --- services ---------------------------------------------------------------------------
    def on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: evt.Event) -> int | Dataset:
        """The hot path; see the module docstring. Never raises."""
        stats = self._stats_for(event.assoc)
        try:
            return self._store(event, stats)
        except Exception:  # noqa: BLE001 - never raise into the association
            logger.exception("unexpected failure storing an instance")
            stats.failed(STATUS_UNEXPECTED)
            return _status(STATUS_UNEXPECTED, "unexpected error; see SCP log")

    def _store(self, event: evt.Event, stats: AssociationRecord) -> int | Dataset:
        request = cast(C_STORE, event.request)
        transfer_syntax = event.context.transfer_syntax
        dataset_bytes = cast(BytesIO, request.DataSet).getvalue()
        try:
            keys = scan_dataset(dataset_bytes, transfer_syntax,
                                max_inflated_bytes=self.settings.max_inflated_dataset_mb << 20)
        except UndecodableDataset as exc:
            logger.warning("undecodable dataset from %s: %s", stats.calling_ae, exc)
            stats.failed(STATUS_CANNOT_UNDERSTAND)
            return _status(STATUS_CANNOT_UNDERSTAND, f"cannot decode: {exc}")
        problem = None
        sop_uid = keys.sop_instance_uid
        if not sop_uid or not keys.study_instance_uid or not keys.series_instance_uid:
            problem = "Study/Series/SOP Instance UID missing"
        elif sop_uid != str(request.AffectedSOPInstanceUID).strip():
            problem = "SOP Instance UID differs from the request"
        elif keys.sop_class_uid and keys.sop_class_uid != str(request.AffectedSOPClassUID):
            problem = "SOP Class UID differs from the request"
        elif not keys.has_pixel_data and _requires_pixel_data(str(request.AffectedSOPClassUID)):
            problem = "image without Pixel Data"
        if problem is not None:
            logger.warning("dataset from %s refused: %s", stats.calling_ae, problem)
            stats.failed(STATUS_DATASET_MISMATCH)
            return _status(STATUS_DATASET_MISMATCH, problem)
        data = file_meta_prefix(
            str(request.AffectedSOPClassUID), sop_uid, str(transfer_syntax),
            PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION,
            stats.calling_ae or None) + dataset_bytes
        try:
            stored = self.spool.store(keys.study_instance_uid, keys.series_instance_uid,
                                      sop_uid, data)
        except SpoolError as exc:
            level = logging.WARNING if isinstance(exc, SpoolFullError) else logging.ERROR
            logger.log(level, "spool refused %s: %s", sop_uid, exc)
            stats.failed(STATUS_OUT_OF_RESOURCES)
            return _status(STATUS_OUT_OF_RESOURCES, "storage unavailable"
                           if not isinstance(exc, SpoolFullError) else "storage full")
        if stored.outcome is StoreOutcome.SAME:
            stats.duplicates += 1
        else:
            stats.instances += 1
            stats.bytes += stored.size
            if stored.outcome is StoreOutcome.CONFLICT:
                stats.conflicts += 1
        self.bookkeeper.submit(ReceivedInstance(
            study_instance_uid=keys.study_instance_uid,
            series_instance_uid=keys.series_instance_uid, sop_instance_uid=sop_uid,
            stored=stored, received_at=utcnow(), association_id=stats.association_id,
            calling_ae=stats.calling_ae[:16], data=data, sha256=stored.sha256, keys=keys,
            transfer_syntax_uid=str(transfer_syntax)))
        return STATUS_SUCCESS

    # --- MPPS ---------------------------------------------------------------------------------
    def on_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        stats = self._stats_for(event.assoc)
        request = cast(N_CREATE, event.request)
        if str(request.AffectedSOPClassUID) != ModalityPerformedProcedureStep:
            return STATUS_SOP_CLASS_NOT_SUPPORTED, None
        try:
            attributes = event.attribute_list
        except Exception:  # noqa: BLE001
            return STATUS_PROCESSING_FAILURE, None
        uid = request.AffectedSOPInstanceUID
        reply = Dataset()
        if uid is None:
            from pydicom.uid import generate_uid

            uid = generate_uid()
            reply.AffectedSOPInstanceUID = uid
        status = _mpps_status(attributes) or MppsStatus.IN_PROGRESS
        study_uid = None
        scheduled = attributes.get("ScheduledStepAttributesSequence")
        if scheduled:
            study_uid = str(scheduled[0].get("StudyInstanceUID") or "") or None
        if self.session_factory is None:
            return STATUS_PROCESSING_FAILURE, None
        try:
            with self.session_factory() as session, session.begin():
                step = PerformedProcedureStep(sop_instance_uid=str(uid), status=status,
                                              study_instance_uid=study_uid,
                                              calling_ae=stats.calling_ae[:16],
                                              created_at=utcnow(), updated_at=utcnow())
                session.add(step)
                session.flush()
                _replace_references(session, step, attributes)
        except IntegrityError:
            return STATUS_DUPLICATE_INSTANCE, None
        except SQLAlchemyError:
            logger.exception("MPPS N-CREATE not recorded")
            return STATUS_PROCESSING_FAILURE, None
        stats.mpps += 1
        logger.info("MPPS %s created (%s)", uid, status.value)
        return STATUS_SUCCESS, reply

    def on_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        stats = self._stats_for(event.assoc)
        set_request = cast(N_SET, event.request)
        if str(set_request.RequestedSOPClassUID) != ModalityPerformedProcedureStep:
            return STATUS_SOP_CLASS_NOT_SUPPORTED, None
        if self.session_factory is None:
            return STATUS_PROCESSING_FAILURE, None
        try:
            changes = event.modification_list
        except Exception:  # noqa: BLE001
            return STATUS_PROCESSING_FAILURE, None
        uid = str(set_request.RequestedSOPInstanceUID)
        try:
            with self.session_factory() as session, session.begin():
                step = session.execute(
                    select(PerformedProcedureStep)
                    .where(PerformedProcedureStep.sop_instance_uid == uid)).scalar_one_or_none()
                if step is None:
                    return STATUS_NO_SUCH_INSTANCE, None
                if step.status != MppsStatus.IN_PROGRESS:
                    # PS3.4 F.7.2.2: a finished step may not be changed.
                    return STATUS_PROCESSING_FAILURE, None
                new_status = _mpps_status(changes)
                if new_status is not None:
                    step.status = new_status
                step.updated_at = utcnow()
                if "PerformedSeriesSequence" in changes:
                    _replace_references(session, step, changes)
        except SQLAlchemyError:
            logger.exception("MPPS N-SET not recorded")
            return STATUS_PROCESSING_FAILURE, None
        stats.mpps += 1
        logger.info("MPPS %s set (%s)", uid, new_status.value if new_status else "no status")
        return STATUS_SUCCESS, changes


def _mpps_status(ds: Dataset) -> MppsStatus | None:
    raw = str(ds.get("PerformedProcedureStepStatus") or "").strip().upper()
    try:
        return MppsStatus(raw) if raw else None
    except ValueError:
        return None


def _replace_references(session: Session, step: PerformedProcedureStep, ds: Dataset) -> None:
    """Store every image the Performed Series Sequence lists, replacing earlier lists."""
    session.execute(delete(PerformedProcedureStepReference)
                    .where(PerformedProcedureStepReference.mpps_id == step.id))
    seen: set[str] = set()
    for series in ds.get("PerformedSeriesSequence") or []:
        series_uid = str(series.get("SeriesInstanceUID") or "").strip()
        if not series_uid:
            continue
        for key in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in series.get(key) or []:
                sop_uid = str(ref.get("ReferencedSOPInstanceUID") or "").strip()
                if sop_uid and sop_uid not in seen:
                    seen.add(sop_uid)
                    session.add(PerformedProcedureStepReference(
                        mpps_id=step.id, series_instance_uid=series_uid[:64],
                        sop_instance_uid=sop_uid[:64]))
