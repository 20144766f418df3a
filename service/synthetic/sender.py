"""Send DICOM files to an SCP the way a PACS routes a study: C-STORE over one or several
associations, series by series, with the file's own transfer syntax when the SCP accepts
it and a decompressed Explicit VR Little Endian copy when it does not.

This is a test and demo tool (``triage demo send``); the service's own result export lives
in ``service.dicom.scu``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

logger = logging.getLogger(__name__)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass
class SendReport:
    """Outcome of a send: counts per DICOM status and the files that failed."""

    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(file, reason) for every file not stored with status 0x0000 (warnings count as sent)."""
    associations: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def merge(self, other: SendReport) -> None:
        self.sent += other.sent
        self.failed += other.failed
        self.associations += other.associations
        for k, v in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v


def find_dicom_files(root: Path) -> list[Path]:
    """Every file under ``root`` that has a DICOM preamble ('DICM' at byte 128)."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as fh:
                fh.seek(128)
                if fh.read(4) == b"DICM":
                    out.append(path)
        except OSError:
            continue
    return out


def group_by_series(paths: list[Path]) -> dict[tuple[str, str], list[tuple[Path, str, str]]]:
    """(study, series) -> [(path, SOP Class UID, Transfer Syntax UID)] in path order."""
    groups: dict[tuple[str, str], list[tuple[Path, str, str]]] = defaultdict(list)
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True,
                     specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"])
        groups[(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))].append(
            (path, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)))
    return dict(groups)


def _send_batch(items: list[tuple[Path, str, str]], host: str, port: int, called_ae: str,
                calling_ae: str, timeout: float) -> SendReport:
    from pynetdicom import AE

    report = SendReport()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    pairs = sorted({(sop, ts) for _, sop, ts in items})
    for sop, ts in pairs:
        if ts not in UNCOMPRESSED:
            ae.add_requested_context(sop, [ts])
    for sop in sorted({sop for sop, _ in pairs}):
        ae.add_requested_context(sop, list(UNCOMPRESSED))
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed"
        report.failed += [(str(p), reason) for p, _, _ in items]
        return report
    report.associations = 1
    try:
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        for path, sop, ts in items:
            if not assoc.is_established:
                report.failed.append((str(path), "association lost"))
                continue
            ds: Dataset = dcmread(path)
            if (sop, ts) not in accepted:
                converted = _uncompressed_copy(ds, sop, accepted)
                if converted is None:
                    report.failed.append((str(path), f"no accepted context for {sop}"))
                    continue
                ds = converted
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            key = f"0x{code:04X}" if code >= 0 else "no response"
            report.statuses[key] = report.statuses.get(key, 0) + 1
            if code == 0x0000 or (code >= 0 and (code & 0xF000) == 0xB000):
                report.sent += 1
            else:
                report.failed.append((str(path), key))
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _uncompressed_copy(ds: Dataset, sop: str, accepted: set[tuple[str, str]]) -> Dataset | None:
    for ts in UNCOMPRESSED:
        if (sop, str(ts)) in accepted:
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            target = UID(ts)
            ds.file_meta.TransferSyntaxUID = target
            # pynetdicom refuses a dataset whose recorded encoding disagrees with its
            # transfer syntax ("encoded as explicit VR ... but the file meta has implicit"):
            # record the encoding it will be sent in.
            ds.set_original_encoding(target.is_implicit_VR, target.is_little_endian,
                                     ds.original_character_set)
            return ds
    return None


def send_files(paths: list[Path], host: str, port: int, called_ae: str, calling_ae: str,
               associations: int = 1, per_series: bool = False,
               timeout: float = 30.0) -> SendReport:
    """Send ``paths`` (grouped series by series, in path order within a series).

    ``per_series``: one association per series (as many PACS route). ``associations`` > 1:
    the files are spread round-robin over that many concurrent associations, which also
    interleaves instances of one series across associations (what a multi-threaded
    router does).
    """
    start = time.perf_counter()
    groups = group_by_series(paths)
    batches: list[list[tuple[Path, str, str]]]
    if per_series:
        batches = list(groups.values())
    else:
        ordered = [item for items in groups.values() for item in items]
        n = max(1, min(associations, len(ordered)))
        batches = [ordered[i::n] for i in range(n)]
    report = SendReport()
    workers = max(1, associations if not per_series else min(associations, len(batches)))
    with ThreadPoolExecutor(workers) as pool:
        for part in pool.map(lambda b: _send_batch(b, host, port, called_ae, calling_ae,
                                                   timeout), batches):
            report.merge(part)
    report.seconds = time.perf_counter() - start
    logger.info("sent %d files over %d associations, %d failed", report.sent,
                report.associations, len(report.failed))
    return report
