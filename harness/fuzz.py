"""Hostile DICOM input: the strategies and checks shared by ``tests/fuzz`` and ``bench.fuzz``.

Four surfaces, each with a hypothesis strategy that builds hostile input from a valid
original and a ``check_*`` function that runs the service on it and raises
:class:`PropertyViolation` when a property fails; otherwise it returns the outcome (a DIMSE
status or a reason code) that the benchmark tallies:

* the C-STORE hot path: :func:`service.ingest.validate.scan_dataset` and the SCP's store
  handler, in process (:func:`check_scan`, :func:`check_store_handler`) and over a real
  association (:func:`check_network_store`): byte-mutated datasets (truncation, altered and
  undefined lengths, wrong VRs, nested sequences, garbage, deflate bombs);
* header parsing (:mod:`service.ingest.header`): hostile element values and VRs;
* the volume loader (:func:`service.imaging.volume.load_volume`): huge declared matrices,
  frame counts and bit depths, pixel data of the wrong length, truncated and corrupt
  JPEG 2000 / JPEG-LS / RLE frames, frames whose own header declares an enormous image;
* many one-slice series through the bookkeeper and the tracker (:func:`run_one_slice_series`).

"Crash" means any exception other than the one the surface declares, a time over the
bound, or a traced allocation (numpy arrays included) over the bound.
"""

from __future__ import annotations

import io
import logging
import resource
import struct
import time
import tracemalloc
import uuid
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from harness.data.ctdata import SeriesSpec, ct_dataset

MIB = 1 << 20
STORE_STATUSES = frozenset({0x0000, 0xA700, 0xA900, 0xC210})
"""What the SCP may answer a hostile C-STORE; 0xC211 (unexpected error) is a crash."""


class PropertyViolation(AssertionError):
    """A hostile input broke a property: a crash, an unbounded allocation, a wrong answer."""


@contextmanager
def bounded(what: str, *, max_bytes: int, max_seconds: float) -> Iterator[None]:
    """Fail when the block allocates more than ``max_bytes`` at its peak (tracemalloc: Python
    objects and numpy arrays, allocated or merely reserved) or runs over ``max_seconds``."""
    started_tracing = not tracemalloc.is_tracing()
    if started_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        if started_tracing:
            tracemalloc.stop()
    if peak - base > max_bytes:
        raise PropertyViolation(f"{what}: allocated {(peak - base) / MIB:.1f} MiB, "
                                f"bound {max_bytes / MIB:.1f} MiB")
    if elapsed > max_seconds:
        raise PropertyViolation(f"{what}: took {elapsed:.2f} s, bound {max_seconds} s")


def pass_interrupts(exc: BaseException) -> None:
    """Re-raise what ends the run (Ctrl-C, exit); every other exception is a finding, even
    one that is no ``Exception`` (pyo3's PanicException from a Rust decoder)."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        raise exc


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# =============================================================================== C-STORE


@dataclass(frozen=True)
class Span:
    """One top-level element of an encoded dataset: byte offsets of its parts."""

    start: int
    end: int
    value_start: int
    length_at: int
    length_size: int
    vr_at: int | None
    """Offset of the two VR bytes (explicit VR), ``None`` for implicit VR."""


@dataclass(frozen=True)
class Original:
    """A valid dataset as it travels in a C-STORE (no file meta), and its element spans."""

    transfer_syntax: str
    plain: bytes
    """Inflated bytes (the wire bytes unless the syntax is deflated)."""
    spans: tuple[Span, ...]
    sop_class_uid: str
    sop_instance_uid: str

    @property
    def deflated(self) -> bool:
        return UID(self.transfer_syntax).is_deflated

    def wire(self, plain: bytes) -> bytes:
        if not self.deflated:
            return plain
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        return packer.compress(plain) + packer.flush()


def _spans(plain: bytes, implicit: bool) -> tuple[Span, ...]:
    starts: list[tuple[int, int, int, int, int | None]] = []
    for element in data_element_generator(io.BytesIO(plain), implicit, True):
        raw = cast(RawDataElement, element)
        long_header = implicit or raw.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV",
                                             "UC", "UN", "UR", "UT", "UV")
        header = 8 if implicit or not long_header else 12
        start = raw.value_tell - header
        length_at = start + (4 if implicit else (8 if long_header else 6))
        starts.append((start, raw.value_tell, length_at, 4 if long_header else 2,
                       None if implicit else start + 4))
    ends = [s[0] for s in starts[1:]] + [len(plain)]
    return tuple(Span(s, e, v, la, ls, vr) for (s, v, la, ls, vr), e in zip(starts, ends,
                                                                            strict=True))


def _with_nested_sequences(ds: Dataset) -> Dataset:
    """A private sequence three levels deep, so the walk meets nesting in the original."""
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = generate_uid()
    middle = Dataset()
    middle.ReferencedImageSequence = [inner]
    ds.ReferencedSeriesSequence = [middle, Dataset()]
    return ds


def make_original(transfer_syntax: str, rows: int = 16) -> Original:
    """A small CT image, valid, encoded in ``transfer_syntax`` (uncompressed pixels)."""
    ds = _with_nested_sequences(ct_dataset(SeriesSpec(rows=rows, columns=rows), 0))
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    from service.ingest.validate import split_part10

    raw = buffer.getvalue()
    _, offset = split_part10(raw)
    wire = raw[offset:]
    syntax = UID(transfer_syntax)
    plain = zlib.decompress(wire, -zlib.MAX_WBITS) if syntax.is_deflated else wire
    return Original(transfer_syntax, plain, _spans(plain, syntax.is_implicit_VR),
                    str(ds.SOPClassUID), str(ds.SOPInstanceUID))


_ORIGINALS: dict[str, Original] = {}


def original(transfer_syntax: str) -> Original:
    if transfer_syntax not in _ORIGINALS:
        _ORIGINALS[transfer_syntax] = make_original(transfer_syntax)
    return _ORIGINALS[transfer_syntax]


CSTORE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                   DeflatedExplicitVRLittleEndian)


@dataclass(frozen=True)
class Mutation:
    """A hostile C-STORE: the wire bytes and what the request says."""

    kind: str
    detail: str
    transfer_syntax: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    must_succeed: bool = False
    must_fail: bool = False
    inflated_size: int = 0

    def label(self) -> str:
        return f"{self.kind} ({UID(self.transfer_syntax).keyword}): {self.detail}"


def _nested(depth: int, implicit: bool, terminated: bool) -> bytes:
    """A private SQ (0009,1010) of undefined length nested ``depth`` levels deep."""
    def sq_header() -> bytes:
        if implicit:
            return struct.pack("<HHL", 0x0009, 0x1010, 0xFFFFFFFF)
        return struct.pack("<HH2sHL", 0x0009, 0x1010, b"SQ", 0, 0xFFFFFFFF)

    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    body = b""
    for _ in range(depth):
        body = sq_header() + item + body + item_end + seq_end
    if not terminated and body:
        body = body[:-8]
    return body


MUTATION_KINDS = ("intact", "truncate", "length", "vr", "undefined_length", "nested", "garbage",
                  "flip", "random", "uid_mismatch", "deflate_bomb")


@st.composite
def mutations(draw: st.DrawFn, *, bomb_bytes: int = 16 * MIB) -> Mutation:
    """A byte-level mutation of a valid CT dataset; ``bomb_bytes``: what a deflate bomb
    inflates to (set above the checker's inflation limit)."""
    syntax = draw(st.sampled_from(CSTORE_SYNTAXES))
    base = original(syntax)
    plain, spans = base.plain, base.spans
    implicit = UID(syntax).is_implicit_VR
    kind = draw(st.sampled_from(MUTATION_KINDS))
    uid = base.sop_instance_uid
    must_succeed = must_fail = False
    if kind == "intact":
        detail, must_succeed = "unchanged", True
    elif kind == "truncate":
        cut = draw(st.integers(0, len(plain) - 1))
        plain, detail, must_fail = plain[:cut], f"cut at {cut} of {len(base.plain)}", True
    elif kind in ("length", "undefined_length"):
        index = draw(st.integers(0, len(spans) - 1))
        span = spans[index]
        limit = 0xFFFFFFFF if span.length_size == 4 else 0xFFFF
        old = int.from_bytes(plain[span.length_at:span.length_at + span.length_size], "little")
        if kind == "undefined_length":
            new = limit
        else:
            new = draw(st.one_of(st.sampled_from([0, 1, old + 1, old + 2, max(old - 1, 0),
                                                  limit, limit - 1, 0x7FFFFFFF & limit]),
                                 st.integers(0, limit)))
        if new == old:
            new = (old + 2) & limit
        plain = (plain[:span.length_at] + new.to_bytes(span.length_size, "little")
                 + plain[span.length_at + span.length_size:])
        detail = f"element {index} length {old} -> {new}"
        # The last element's length pointing past the end can never parse.
        must_fail = index == len(spans) - 1 and new > old and new != 0xFFFFFFFF
    elif kind == "vr":
        candidates = [s for s in spans if s.vr_at is not None]
        if not candidates:  # implicit VR has none: corrupt a tag instead
            span = draw(st.sampled_from(spans))
            tag = draw(st.binary(min_size=4, max_size=4))
            plain = plain[:span.start] + tag + plain[span.start + 4:]
            detail = f"tag at {span.start} -> {tag.hex()}"
        else:
            span = draw(st.sampled_from(candidates))
            assert span.vr_at is not None
            vr = draw(st.one_of(st.sampled_from([b"SQ", b"UN", b"OB", b"OW", b"UT", b"US",
                                                 b"UL", b"FD", b"DA", b"XX", b"\x00\x00",
                                                 b"ob", b"  "]),
                                st.binary(min_size=2, max_size=2)))
            plain = plain[:span.vr_at] + vr + plain[span.vr_at + 2:]
            detail = f"VR at {span.vr_at} -> {vr!r}"
    elif kind == "nested":
        depth = draw(st.integers(1, 80))
        terminated = draw(st.booleans())
        at = draw(st.sampled_from([s.start for s in spans] + [len(plain)]))
        plain = plain[:at] + _nested(depth, implicit, terminated) + plain[at:]
        detail = f"{depth} levels at {at}, {'terminated' if terminated else 'unterminated'}"
        must_succeed = terminated and depth <= 30
        must_fail = not terminated or depth >= 40
    elif kind == "garbage":
        at = draw(st.integers(0, len(plain)))
        junk = draw(st.binary(min_size=1, max_size=64))
        plain = plain[:at] + junk + plain[at:]
        detail = f"{len(junk)} bytes inserted at {at}"
    elif kind == "flip":
        positions = draw(st.lists(st.integers(0, len(plain) - 1), min_size=1, max_size=8))
        buf = bytearray(plain)
        for pos in positions:
            buf[pos] ^= draw(st.integers(1, 255))
        plain = bytes(buf)
        detail = f"bytes flipped at {sorted(set(positions))}"
    elif kind == "random":
        plain = draw(st.binary(min_size=0, max_size=512))
        detail, must_fail = f"{len(plain)} random bytes", True
    elif kind == "uid_mismatch":
        uid = generate_uid()
        detail, must_fail = "request names another SOP Instance UID", True
    else:
        return deflate_bomb(bomb_bytes)
    return Mutation(kind, detail, syntax, base.wire(plain), base.sop_class_uid, uid,
                    must_succeed=must_succeed, must_fail=must_fail, inflated_size=len(plain))


def deflate_bomb(size: int = 16 * MIB) -> Mutation:
    """A valid deflated dataset followed by ``size`` zero bytes: a few KiB on the wire."""
    base = original(DeflatedExplicitVRLittleEndian)
    plain = base.plain + b"\x00" * size
    return Mutation("deflate_bomb", f"inflates to {len(plain)} bytes", base.transfer_syntax,
                    base.wire(plain), base.sop_class_uid, base.sop_instance_uid,
                    must_fail=True, inflated_size=len(plain))


def check_scan(mutation: Mutation, *, max_inflated_bytes: int = MIB) -> str:
    """``scan_dataset`` returns keys or raises ``UndecodableDataset``, within bounds."""
    from service.ingest.validate import UndecodableDataset, scan_dataset

    # The walk copies nothing but the captured header values; inflating holds the output.
    bound = 2 * len(mutation.data) + min(mutation.inflated_size, max_inflated_bytes) + 2 * MIB
    with bounded(f"scan_dataset {mutation.label()}", max_bytes=bound, max_seconds=2.0):
        try:
            keys = scan_dataset(mutation.data, mutation.transfer_syntax,
                                max_inflated_bytes=max_inflated_bytes)
        except UndecodableDataset:
            keys = None
        except BaseException as exc:  # noqa: BLE001 - the property under test
            pass_interrupts(exc)
            raise PropertyViolation(f"scan_dataset {mutation.label()}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    if keys is None:
        if mutation.must_succeed:
            raise PropertyViolation(f"scan_dataset refused a valid dataset: {mutation.label()}")
        return "UndecodableDataset"
    return "keys"


class RecordingBookkeeper:
    """Stands in for the bookkeeper: keeps what the SCP hands over."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def submit(self, item: Any) -> None:
        self.items.append(item)


def store_event(mutation: Mutation) -> Any:
    """The parts of a pynetdicom ``EVT_C_STORE`` event that the handler reads."""
    request = SimpleNamespace(DataSet=io.BytesIO(mutation.data),
                              AffectedSOPInstanceUID=UID(mutation.sop_instance_uid),
                              AffectedSOPClassUID=UID(mutation.sop_class_uid))
    return SimpleNamespace(assoc=SimpleNamespace(), request=request,
                           context=SimpleNamespace(transfer_syntax=UID(mutation.transfer_syntax)))


def _status_of(result: Any) -> int:
    return int(result) if isinstance(result, int) else int(result.Status)


def _spooled(spool_root: Path) -> set[Path]:
    return set(spool_root.rglob("*.dcm"))


def check_status(mutation: Mutation, status: int) -> None:
    """The answer fits the input: a known status, Success exactly where it must be."""
    if status not in STORE_STATUSES:
        raise PropertyViolation(f"status 0x{status:04X} for {mutation.label()}")
    if mutation.must_succeed and status != 0:
        raise PropertyViolation(f"valid dataset refused 0x{status:04X}: {mutation.label()}")
    if mutation.must_fail and status == 0:
        raise PropertyViolation(f"broken dataset stored: {mutation.label()}")


def check_store_handler(scp: Any, mutation: Mutation) -> int:
    """The SCP's C-STORE handler on ``mutation``: a proper status, within bounds; only a
    Success leaves a file in the spool (the exact bytes received, readable by pydicom)."""
    spool_root = Path(scp.spool.root)
    before = _spooled(spool_root)
    handed = len(scp.bookkeeper.items)
    bound = 4 * len(mutation.data) + min(mutation.inflated_size,
                                         scp.settings.max_inflated_dataset_mb * MIB) + 4 * MIB
    with bounded(f"store {mutation.label()}", max_bytes=bound, max_seconds=2.0):
        status = _status_of(scp.on_store(store_event(mutation)))
    check_status(mutation, status)
    new = _spooled(spool_root) - before
    if status != 0:
        if new or len(scp.bookkeeper.items) != handed:
            raise PropertyViolation(f"refused (0x{status:04X}) but spooled: {mutation.label()}")
        return status
    item = scp.bookkeeper.items[-1]
    stored = spool_root / item.stored.relative_path
    if not stored.read_bytes().endswith(mutation.data):
        raise PropertyViolation(f"spooled bytes differ from those received: {mutation.label()}")
    try:
        ds = dcmread(stored, stop_before_pixels=True)
    except BaseException as exc:  # noqa: BLE001
        pass_interrupts(exc)
        raise PropertyViolation(f"stored {mutation.label()} but pydicom cannot read it: "
                                f"{type(exc).__name__}: {exc}") from exc
    if str(ds.file_meta.MediaStorageSOPInstanceUID) != mutation.sop_instance_uid:
        raise PropertyViolation(f"stored under another UID: {mutation.label()}")
    return status


def part10(mutation: Mutation) -> bytes:
    """The mutation as a Part 10 file (valid file meta, hostile dataset) for an SCU to send."""
    from service.ingest.validate import file_meta_prefix

    return file_meta_prefix(mutation.sop_class_uid, mutation.sop_instance_uid,
                            mutation.transfer_syntax, "1.2.826.0.1.3680043.9.9999", "FUZZ"
                            ) + mutation.data


def check_network_store(port: int, batch: list[Mutation], workdir: Path,
                        spool_root: Path) -> list[int]:
    """Send ``batch`` over one real association to the SCP on ``port``; every dataset gets a
    proper status, the SCP still answers a C-ECHO afterwards, and exactly the successes are
    in the spool. Needs pynetdicom's ``STORE_SEND_CHUNKED_DATASET`` (bytes sent as they are
    in the file), which this function sets and restores."""
    from pynetdicom import _config

    from harness.peers.dicom import Scu

    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, mutation in enumerate(batch):
        path = workdir / f"{uuid.uuid4().hex}-{index}.dcm"
        path.write_bytes(part10(mutation))
        paths.append(path)
    before = _spooled(spool_root)
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        statuses = Scu(port).store(paths)
        assoc = Scu(port).associate([("1.2.840.10008.1.1", ExplicitVRLittleEndian)])
        alive = assoc.is_established and int(assoc.send_c_echo().Status) == 0
        if assoc.is_established:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        for path in paths:
            path.unlink()
    if not alive:
        raise PropertyViolation("the SCP does not answer a C-ECHO after hostile C-STOREs")
    for mutation, status in zip(batch, statuses, strict=True):
        if status == -1:
            raise PropertyViolation(f"no C-STORE response: {mutation.label()}")
        check_status(mutation, status)
    # A dataset may repeat an earlier one byte for byte (stored once): compare contents.
    accepted = [m.data for m, status in zip(batch, statuses, strict=True) if status == 0]
    for path in _spooled(spool_root) - before:
        content = path.read_bytes()
        if not any(content.endswith(data) for data in accepted):
            raise PropertyViolation(f"a refused dataset was spooled as {path.name}")
    contents = [p.read_bytes() for p in _spooled(spool_root)]
    for mutation, status in zip(batch, statuses, strict=True):
        if status == 0 and not any(c.endswith(mutation.data) for c in contents):
            raise PropertyViolation(f"Success without a spool file: {mutation.label()}")
    return statuses


# =============================================================================== header

_DATES = ["20240102", "00010101", "99991231", "20240230", "2024-01-02", "2024", "", "0",
          "19700101", "abcdefgh", "20240102\\20240103", "99999999"]
_TIMES = ["101500", "246060", "235959.9999999", "25", "12:30:00", "1", "", "120000.",
          "9" * 40]
_DATETIMES = ["20240102101500", "99991231235959+1400", "00010101000000-1200", "2024",
              "20240101+9999", "20240101000000.000000-2359", "x"]
_OFFSETS = ["+0100", "+9999", "-2400", "+1400", "-1200", "+0000", "1400", "abcde", "-9959",
            "+"]
_NUMBERS = ["1", "-1", "0", "1e999", "nan", "inf", "-0", "9" * 30, "12.5", " 7 ", "1\\2",
            "0x10", ""]
_UIDS = ["1.2.3", "", "1." + "9" * 100, "not a uid", "1.2.3\x00"]
_CHARSETS = ["ISO_IR 100", "ISO_IR 192", "GB18030", "bogus", "ISO 2022 IR 87\\ISO 2022 IR 159",
             "\\\\"]

_HEADER_TAGS: dict[int, tuple[str, list[str]]] = {
    0x00080005: ("CS", _CHARSETS),
    0x00080016: ("UI", _UIDS), 0x00080018: ("UI", _UIDS),
    0x00080020: ("DA", _DATES), 0x00080021: ("DA", _DATES), 0x00080022: ("DA", _DATES),
    0x00080023: ("DA", _DATES), 0x0008002A: ("DT", _DATETIMES),
    0x00080030: ("TM", _TIMES), 0x00080031: ("TM", _TIMES), 0x00080032: ("TM", _TIMES),
    0x00080033: ("TM", _TIMES), 0x00080050: ("SH", ["ACC1", ""]),
    0x00080060: ("CS", ["CT", "MR", ""]), 0x00080090: ("PN", ["Doe^John", "=^^^", "a=b=c=d"]),
    0x00080201: ("SH", _OFFSETS), 0x00081030: ("LO", ["CT NECK"]),
    0x0008103E: ("LO", ["C-SPINE"]), 0x00100010: ("PN", ["Doe^Jane", "^^^^^^", "a=b=c"]),
    0x00100020: ("LO", ["ID1"]), 0x00100030: ("DA", _DATES),
    0x00100040: ("CS", ["M", "F", "O", "X", ""]), 0x00180015: ("CS", ["CSPINE"]),
    0x00181030: ("LO", ["PROTO"]), 0x0020000D: ("UI", _UIDS), 0x0020000E: ("UI", _UIDS),
    0x00200011: ("IS", _NUMBERS), 0x00200013: ("IS", _NUMBERS), 0x00200052: ("UI", _UIDS),
    0x00201002: ("IS", _NUMBERS), 0x00209163: ("US", []), 0x00280008: ("IS", _NUMBERS),
}
_WRONG_VRS = ["SQ", "US", "UL", "FD", "OB", "UN", "DA", "AT", "SS", "XX", "ox"]


@st.composite
def header_elements(draw: st.DrawFn) -> dict[int, tuple[str | None, bytes]]:
    """Raw header elements (tag -> (VR, value bytes)) with hostile values and VRs."""
    out: dict[int, tuple[str | None, bytes]] = {}
    tags = draw(st.lists(st.sampled_from(sorted(_HEADER_TAGS)), min_size=1, max_size=12,
                         unique=True))
    for tag in tags:
        vr, pool = _HEADER_TAGS[tag]
        choice = draw(st.integers(0, 9))
        if choice <= 4 and pool:
            value = draw(st.sampled_from(pool)).encode("latin-1")
        elif choice == 5:
            value = b"A" * draw(st.sampled_from([64, 65, 1024, 10_000]))
        elif choice == 6:
            value = draw(st.binary(max_size=40))
        elif choice == 7:
            value = draw(st.text(max_size=20)).encode("utf-8")
        else:
            value = draw(st.binary(max_size=8))
        if draw(st.integers(0, 5)) == 0:
            vr = draw(st.sampled_from(_WRONG_VRS))
        out[tag] = (vr, value)
    return out


def _encode_explicit(elements: dict[int, tuple[str | None, bytes]]) -> bytes:
    parts = []
    for tag, (vr, value) in sorted(elements.items()):
        vr_bytes = (vr or "UN").encode("latin-1")[:2].ljust(2, b" ")
        if len(value) % 2:
            value += b" "
        if vr_bytes in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL",
                        b"OV", b"SV", b"UV"):
            parts.append(struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, vr_bytes, 0,
                                     len(value)) + value)
        else:
            value = value[:0xFFFE]
            parts.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr_bytes, len(value))
                         + value)
    return b"".join(parts)


def check_header(elements: dict[int, tuple[str | None, bytes]]) -> str:
    """``InstanceHeader`` from raw elements and from a pydicom parse never raises (malformed
    values become ``None``), respects the column widths, and gives aware UTC times;
    ``read_header_bytes`` raises nothing but ``UnreadableHeader``."""
    from service.ingest.header import InstanceHeader, UnreadableHeader, read_header_bytes
    from service.ingest.validate import DatasetKeys

    keys = DatasetKeys("", "", "", "", False, elements, implicit_vr=False, little_endian=True)
    outcome = "parsed"
    headers = []
    with bounded("header", max_bytes=16 * MIB, max_seconds=2.0):
        try:
            headers.append(InstanceHeader.per_instance(
                elements, study_uid="1.2", series_uid="1.2.3", sop_uid="1.2.3.4",
                transfer_syntax_uid=ExplicitVRLittleEndian))
            headers.append(InstanceHeader.from_dataset(keys.header_dataset()))
        except BaseException as exc:  # noqa: BLE001 - the property under test
            pass_interrupts(exc)
            raise PropertyViolation(f"InstanceHeader on {elements!r:.300}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        data = _part10_header(_encode_explicit(elements))
        try:
            ds = read_header_bytes(data)
        except UnreadableHeader:
            outcome = "UnreadableHeader"
        except BaseException as exc:  # noqa: BLE001
            pass_interrupts(exc)
            raise PropertyViolation(f"read_header_bytes on {elements!r:.300}: "
                                    f"{type(exc).__name__}: {exc}") from exc
        else:
            try:
                headers.append(InstanceHeader.from_dataset(ds))
            except BaseException as exc:  # noqa: BLE001
                pass_interrupts(exc)
                raise PropertyViolation(f"from_dataset on {elements!r:.300}: "
                                        f"{type(exc).__name__}: {exc}") from exc
    widths = {"patient_id": 64, "patient_name": 324, "accession_number": 64,
              "study_description": 128, "modality": 16, "series_description": 128,
              "sop_class_uid": 64, "frame_of_reference_uid": 64, "study_time": 32}
    for header in headers:
        for name, width in widths.items():
            value = getattr(header, name)
            if value is not None and len(value) > width:
                raise PropertyViolation(f"{name} of {len(value)} characters (column {width})")
        moment = header.acquired_at
        if moment is not None and moment.utcoffset() != timedelta(0):
            raise PropertyViolation(f"acquired_at {moment!r} is not UTC")
    return outcome


def _part10_header(body: bytes) -> bytes:
    from service.ingest.validate import file_meta_prefix

    return file_meta_prefix("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", ExplicitVRLittleEndian,
                            "1.2.826.0.1.3680043.9.9999", "FUZZ") + body


# =============================================================================== volume

VOLUME_SYNTAXES = (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless)
VOLUME_KINDS = ("intact", "huge_matrix", "huge_frames", "bits", "pixel_short", "pixel_long",
                "wrong_vr", "frame_truncate", "frame_corrupt", "frame_bomb", "rle_header")
SERIES_SLICES = 4
FUZZ_MAX_VOXELS = 1 << 20
"""The voxel limit the volume checks load with: every "huge" matrix the strategy draws is
beyond it, so a loader that allocates first would show up in the traced peak."""


@dataclass(frozen=True)
class SeriesCase:
    kind: str
    transfer_syntax: str
    slices: tuple[int, ...]
    """Which slices are altered."""
    params: tuple[tuple[str, Any], ...] = ()
    must_load: bool = False
    must_refuse: bool = False
    reasons: frozenset[str] = frozenset()
    """When not empty: the reason codes the refusal must carry."""

    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params)
        return (f"{self.kind} ({UID(self.transfer_syntax).keyword}) slices {list(self.slices)}"
                + (f": {extra}" if extra else ""))


@st.composite
def series_cases(draw: st.DrawFn) -> SeriesCase:
    """A hostile alteration of a small valid series (4 slices of 32 x 32)."""
    kind = draw(st.sampled_from(VOLUME_KINDS))
    if kind in ("frame_truncate", "frame_corrupt"):
        syntax = draw(st.sampled_from(VOLUME_SYNTAXES[1:]))
    elif kind == "frame_bomb":  # RLE decodes to Rows x Columns whatever its header says
        syntax = draw(st.sampled_from([JPEG2000Lossless, JPEGLSLossless]))
    elif kind == "rle_header":
        syntax = RLELossless
    elif kind in ("pixel_short", "pixel_long"):
        syntax = ExplicitVRLittleEndian
    else:
        syntax = draw(st.sampled_from(VOLUME_SYNTAXES))
    every = tuple(range(SERIES_SLICES))
    slices = every if draw(st.booleans()) else (draw(st.integers(0, SERIES_SLICES - 1)),)
    params: dict[str, Any] = {}
    case = SeriesCase(kind, syntax, slices)
    if kind == "intact":
        return replace(case, slices=(), must_load=True)
    if kind == "huge_matrix":
        params["rows"] = draw(st.sampled_from([2048, 4096, 16384, 65535]))
        params["columns"] = draw(st.sampled_from([2048, 4096, 16384, 65535]))
        reasons = {"VOLUME_TOO_LARGE"} if slices == every else {"INCONSISTENT_MATRIX"}
        return replace(case, params=tuple(params.items()), must_refuse=True,
                       reasons=frozenset(reasons))
    if kind == "huge_frames":
        params["frames"] = draw(st.sampled_from([2, 1000, 65535, 2**31 - 1]))
    elif kind == "bits":
        params["bits_allocated"] = draw(st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64,
                                                         65535]))
        params["bits_stored"] = draw(st.sampled_from([0, 1, 12, 16, 17, 64]))
        params["pixel_representation"] = draw(st.sampled_from([0, 1, 2, 65535]))
        params["samples"] = draw(st.sampled_from([1, 0, 3, 65535]))
    elif kind == "pixel_short":
        params["keep"] = draw(st.integers(0, SERIES_MATRIX * SERIES_MATRIX * 2 - 2))
        return replace(case, params=tuple(params.items()), must_refuse=True,
                       reasons=frozenset({"UNDECODABLE_PIXEL_DATA"}))
    elif kind == "pixel_long":
        params["extra"] = draw(st.integers(1, 4096))
    elif kind == "wrong_vr":
        params["tag"] = draw(st.sampled_from(["Rows", "Columns", "BitsAllocated",
                                              "PixelSpacing", "ImagePositionPatient"]))
        params["value"] = draw(st.sampled_from(["65535x", "", "-1", "1e999", "nan", "\\\\"]))
    elif kind == "frame_truncate":
        params["keep_fraction"] = draw(st.floats(0.0, 0.99))
    elif kind == "frame_corrupt":
        params["flips"] = tuple(draw(st.lists(st.tuples(st.floats(0.0, 0.999),
                                                        st.integers(1, 255)),
                                              min_size=1, max_size=8)))
    elif kind == "frame_bomb":
        params["size"] = draw(st.sampled_from([4096, 16384, 60000, 65535]))
        return replace(case, params=tuple(params.items()), must_refuse=True,
                       reasons=frozenset({"UNDECODABLE_PIXEL_DATA"}))
    elif kind == "rle_header":
        params["segments"] = draw(st.sampled_from([0, 2, 15, 16, 0xFFFFFFFF]))
        params["offset"] = draw(st.sampled_from([0, 64, 65, 1 << 20, 0xFFFFFFFF]))
    return replace(case, params=tuple(params.items()))


SERIES_MATRIX = 32
"""Rows and Columns of the fuzzed series (OpenJPEG cannot encode 16 x 16 with its default
resolution levels)."""
_ENCODED: dict[str, list[bytes]] = {}


def _valid_slice(index: int, syntax: str) -> Dataset:
    """Slice ``index`` of one valid series, encoded once per transfer syntax and re-read."""
    if syntax not in _ENCODED:
        spec = SeriesSpec(slices=SERIES_SLICES, rows=SERIES_MATRIX, columns=SERIES_MATRIX)
        encoded = []
        for k in range(SERIES_SLICES):
            ds = ct_dataset(spec, k)
            if UID(syntax).is_compressed:
                ds.compress(UID(syntax))
            else:
                ds.file_meta.TransferSyntaxUID = UID(syntax)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            encoded.append(buffer.getvalue())
        _ENCODED[syntax] = encoded
    return dcmread(io.BytesIO(_ENCODED[syntax][index]))


def _frame_of(ds: Dataset) -> bytearray:
    return bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))


def _declare_size(frame: bytearray, syntax: str, size: int) -> None:
    """Make a frame's own header declare ``size`` x ``size`` (a decompression bomb)."""
    if syntax == JPEG2000Lossless:
        at = bytes(frame).find(b"\xff\x4f\xff\x51")
        struct.pack_into(">LLLLLL", frame, at + 8, size, size, 0, 0, size, size)
        return
    if syntax == JPEGLSLossless:
        at = bytes(frame).find(b"\xff\xf7")
        struct.pack_into(">HH", frame, at + 5, size, size)
        return
    raise ValueError(f"no size to declare in a {syntax} frame")


def _alter(ds: Dataset, case: SeriesCase) -> None:
    params = dict(case.params)
    syntax = case.transfer_syntax
    if case.kind == "huge_matrix":
        ds.Rows, ds.Columns = params["rows"], params["columns"]
    elif case.kind == "huge_frames":
        ds.NumberOfFrames = params["frames"]
    elif case.kind == "bits":
        ds.BitsAllocated = params["bits_allocated"]
        ds.BitsStored = params["bits_stored"]
        ds.HighBit = max(params["bits_stored"] - 1, 0)
        ds.PixelRepresentation = params["pixel_representation"]
        ds.SamplesPerPixel = params["samples"]
    elif case.kind == "pixel_short":
        ds.PixelData = ds.PixelData[:params["keep"] & ~1]
    elif case.kind == "pixel_long":
        ds.PixelData = ds.PixelData + b"\x01" * (params["extra"] + params["extra"] % 2)
    elif case.kind == "wrong_vr":
        number = tag_for_keyword(params["tag"])
        assert number is not None
        del ds[number]
        ds.add_new(number, "LO", params["value"])
    elif case.kind in ("frame_truncate", "frame_corrupt", "frame_bomb", "rle_header"):
        frame = _frame_of(ds)
        if case.kind == "frame_truncate":
            frame = frame[:max(int(len(frame) * params["keep_fraction"]), 2)]
        elif case.kind == "frame_corrupt":
            for where, xor in params["flips"]:
                frame[int(where * len(frame))] ^= xor
        elif case.kind == "frame_bomb":
            _declare_size(frame, syntax, params["size"])
        else:
            struct.pack_into("<LL", frame, 0, params["segments"], params["offset"])
        ds.PixelData = encapsulate([bytes(frame)])


def write_series_case(case: SeriesCase, directory: Path) -> list[Path]:
    """The series of ``case`` as Part 10 files under ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(SERIES_SLICES):
        ds = _valid_slice(index, case.transfer_syntax)
        if index in case.slices:
            _alter(ds, case)
        path = directory / f"{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def check_volume(case: SeriesCase, paths: list[Path], *,
                 max_voxels: int = FUZZ_MAX_VOXELS) -> str:
    """``load_volume`` returns a volume or refuses with a ``SeriesReason``, never anything
    else, allocating at most a few volumes' worth (the bound is the voxel limit) and never
    more than 256 MiB of untraced (decoder) memory."""
    from service.imaging.qc import VolumeError
    from service.imaging.volume import load_volume
    from service.outcomes import SeriesReason

    rss_before = peak_rss_mb()
    result: Any = None
    with bounded(f"load_volume {case.label()}", max_bytes=8 * max_voxels + 16 * MIB,
                 max_seconds=10.0):
        try:
            result = load_volume(paths, min_slices=2, max_voxels=max_voxels)
        except VolumeError as exc:
            result = exc
        except BaseException as exc:  # noqa: BLE001 - the property under test
            pass_interrupts(exc)
            raise PropertyViolation(f"load_volume {case.label()}: "
                                    f"{type(exc).__name__}: {exc}") from exc
    if peak_rss_mb() - rss_before > 256:
        raise PropertyViolation(f"load_volume {case.label()}: peak RSS grew by "
                                f"{peak_rss_mb() - rss_before:.0f} MB")
    if isinstance(result, VolumeError):
        if result.reason not in SeriesReason:
            raise PropertyViolation(f"reason {result.reason!r} is not in the vocabulary")
        if case.must_load:
            raise PropertyViolation(f"valid series refused: {case.label()}: {result}")
        if case.reasons and result.reason.value not in case.reasons:
            raise PropertyViolation(f"{case.label()}: {result.reason.value}, expected one of "
                                    f"{sorted(case.reasons)} ({result.detail})")
        return result.reason.value
    if case.must_refuse:
        raise PropertyViolation(f"hostile series loaded: {case.label()}")
    assert result is not None
    if result.hu.shape[1:] != (SERIES_MATRIX, SERIES_MATRIX):
        raise PropertyViolation(f"{case.label()}: loaded as {result.hu.shape}")
    return "loaded"


# =============================================================================== many series


@dataclass
class FakeBroker:
    """Stands in for the Celery app: records what would have been queued."""

    sent: list[tuple[str, list[Any], str]] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any], queue: str, retry: bool) -> Any:
        self.sent.append((name, args, queue))
        return SimpleNamespace(id=uuid.uuid4().hex)


@dataclass
class ManySeriesReport:
    series: int
    recorded: int
    outcomes: Counter[str]
    analyses: int
    queued: int
    seconds: float
    peak_traced_mb: float


def run_one_slice_series(count: int, workdir: Path, *, database_url: str | None = None,
                         batch: int = 500, trace_memory: bool = True) -> ManySeriesReport:
    """``count`` one-slice series received the way the SCP hands them over (spool file,
    bookkeeper batch), then completed and decided by one tracker tick (clock past the idle
    timeout). Returns what the database says about each series and what was queued;
    ``trace_memory`` measures the traced peak (slows the run about threefold)."""
    from sqlalchemy import func, select

    from service.config import Settings
    from service.db import migrate
    from service.db.session import make_engine, make_session_factory
    from service.db.tables import Analysis, Series
    from service.db.types import utcnow
    from service.ingest.bookkeeper import ReceivedInstance, write_batch
    from service.ingest.dispatch import AnalysisDispatcher
    from service.ingest.spool import Spool
    from service.ingest.tracker import Tracker

    url = database_url or f"sqlite:///{workdir / 'triage.db'}"
    settings = Settings(data_dir=workdir / "var", database_url=url,
                        broker_url="redis://127.0.0.1:1/0", min_slices=10,
                        completion_idle_s=30.0, model_dir=workdir / "no-model")
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    spool = Spool(settings.spool_path)
    spool.prepare()
    study = generate_uid()
    template = ct_dataset(SeriesSpec(slices=1, rows=8, columns=8, study_uid=study), 0)
    started = time.perf_counter()
    logging.getLogger("service.ingest").setLevel(logging.WARNING)
    peak = 0
    if trace_memory:
        tracemalloc.start()
    try:
        pending: list[ReceivedInstance] = []
        for index in range(count):
            ds = template
            ds.SeriesInstanceUID = f"2.25.{uuid.uuid4().int}"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(
                f"2.25.{uuid.uuid4().int}")
            ds.SeriesNumber = index + 1
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            data = buffer.getvalue()
            stored = spool.store(study, ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
            pending.append(ReceivedInstance(
                study_instance_uid=study, series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, stored=stored, received_at=utcnow(),
                association_id="fuzz", calling_ae="FUZZSCU", data=data))
            if len(pending) >= batch or index == count - 1:
                with factory() as session, session.begin():
                    write_batch(session, pending)
                pending = []
        broker = FakeBroker()

        def later() -> Any:
            return utcnow() + timedelta(seconds=settings.completion_idle_s + 1)

        dispatcher = AnalysisDispatcher(factory, settings, app_factory=lambda: broker,
                                        clock=later)
        tracker = Tracker(factory, settings, spool, dispatcher=dispatcher, clock=later)
        tracker.tick()
        if trace_memory:
            _, peak = tracemalloc.get_traced_memory()
    finally:
        if trace_memory:
            tracemalloc.stop()
    with factory() as session:
        rows = session.execute(select(Series.state, Series.state_reason)).all()
        analyses = session.execute(select(func.count()).select_from(Analysis)).scalar_one()
    engine.dispose()
    outcomes: Counter[str] = Counter(f"{state.value}:{reason}" for state, reason in rows)
    return ManySeriesReport(count, len(rows), outcomes, int(analyses), len(broker.sent),
                            time.perf_counter() - started, peak / MIB)


def outcome_of(result: Any) -> str:
    """A DIMSE status as ``0xNNNN``; anything else as it is."""
    return f"0x{result:04X}" if isinstance(result, int) else str(result)
