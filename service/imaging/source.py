"""The DICOM side of loading: read headers cheaply, expand frames, decode pixels on demand.

Headers are read once with ``defer_size``: every element larger than :data:`DEFER_SIZE`
(the pixel data, large private blobs) is skipped and only its file offset remembered, so a
600-slice series costs a few megabytes until its pixels are decoded one frame at a time into
the caller's preallocated array. Nothing here decides whether a series is usable; that is
``service.imaging.volume``. Geometry values are kept exactly as DICOM states them: LPS
millimetres, Image Orientation (Patient) as (row direction, column direction).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ImplicitVRLittleEndian,
    LegacyConvertedEnhancedCTImageStorage,
)
from pydicom.valuerep import DA, DT, TM

logger = logging.getLogger(__name__)

DEFER_SIZE = 64 * 1024
"""Elements larger than this (bytes) are not read into memory with the header."""

PIXEL_DATA_TAG = 0x7FE00010
_OTHER_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)  # Float / Double Float Pixel Data

CT_IMAGE_SOP_CLASSES: frozenset[str] = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)


@dataclass(eq=False)
class SourceInstance:
    """One readable file of the series: its pixel-free header and where its pixels are."""

    path: Path
    header: Dataset
    """Pixel data and other deferred (> DEFER_SIZE) elements removed."""
    transfer_syntax: UID
    pixel_offset: int | None
    """File offset of the Pixel Data value; None when it is not addressable in the file
    (Deflated transfer syntax): such files are decoded from a full read."""
    pixel_vr: str | None
    has_pixel_data: bool
    """An integer Pixel Data (7FE0,0010) element is present."""
    has_float_pixel_data: bool
    number_of_frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int
    photometric_interpretation: str
    padding_range: tuple[int, int] | None
    """Inclusive range of *stored* values that mean "no data" (Pixel Padding Value/Range)."""
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    modality: str

    @property
    def is_multiframe(self) -> bool:
        return "PerFrameFunctionalGroupsSequence" in self.header or self.number_of_frames > 1

    @property
    def is_ct_image(self) -> bool:
        if self.sop_class_uid:
            return self.sop_class_uid in CT_IMAGE_SOP_CLASSES
        # Non-conformant files without a SOP Class: trust the modality.
        return self.modality == "CT"


@dataclass(eq=False)
class SourceFrame:
    """One 2D image: a single-frame instance or one frame of a multi-frame instance.

    Geometry is in DICOM LPS millimetres; ``iop`` is (row cosines, column cosines) as stored,
    ``pixel_spacing`` is (between rows, between columns) = (dy, dx).
    """

    instance: SourceInstance
    frame_index: int | None
    """0-based frame index within a multi-frame instance, None for a single-frame instance."""
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    slice_location: float | None
    instance_number: int | None
    is_localizer: bool
    reconstruction_diameter: float | None

    @property
    def sop_instance_uid(self) -> str:
        return self.instance.sop_instance_uid

    @property
    def frame_number(self) -> int | None:
        """1-based, as DICOM numbers frames."""
        return None if self.frame_index is None else self.frame_index + 1

    @property
    def canonical_key(self) -> tuple[str, int, str]:
        """Order that does not depend on arrival: used to choose among duplicates."""
        return (self.sop_instance_uid, self.frame_index or 0, str(self.instance.path))

    def label(self) -> str:
        """How a detail message names this frame (UIDs only, never patient data)."""
        if self.frame_index is None:
            return f"SOP {self.sop_instance_uid}"
        return f"SOP {self.sop_instance_uid} frame {self.frame_index + 1}"


# --------------------------------------------------------------------------- value parsing


def _floats(value: Any, count: int) -> np.ndarray | None:
    """A DS/FD multi-value as float64, or None when absent, malformed or non-finite."""
    if value is None or value == "":
        return None
    try:
        items = list(value) if not isinstance(value, str | bytes) else [value]
        arr = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        result = float(value[0] if isinstance(value, list | tuple) else value)
    except (TypeError, ValueError, IndexError):
        return None
    return result if np.isfinite(result) else None


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _get(ds: Dataset, keyword: str) -> Any:
    """``ds.get`` that treats a value that cannot be converted as absent."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed values
        logger.debug("unparseable %s ignored", keyword)
        return None


def _functional(
    per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str
) -> Any:
    """A value from a frame's functional group, else the shared one (PS3.3 C.7.6.16)."""
    for group in (per_frame, shared):
        if group is None:
            continue
        items = _get(group, sequence)
        if items:
            value = _get(items[0], keyword)
            if value is not None and value != "":
                return value
    return None


# --------------------------------------------------------------------------- reading


def read_instance(path: Path) -> SourceInstance:
    """Read one file's header without its pixels; raises on anything that is not DICOM.

    ``force=True`` accepts files without the 128-byte preamble (some archives strip it); a
    file without even a transfer syntax is read as Implicit VR Little Endian, the DICOM
    default.
    """
    header = pydicom.dcmread(os.fspath(path), defer_size=DEFER_SIZE, force=True)
    file_meta = getattr(header, "file_meta", None)
    ts_value = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    transfer_syntax = UID(str(ts_value)) if ts_value else ImplicitVRLittleEndian
    # With force=True arbitrary bytes "parse" into nonsense elements: a file without the DICM
    # prefix counts as DICOM only if it yields a SOP Instance UID.
    if len(header) == 0 or (
        not getattr(header, "preamble", None) and not _get(header, "SOPInstanceUID")
    ):
        raise pydicom.errors.InvalidDicomError(f"{Path(path).name}: not a DICOM dataset")

    pixel_offset: int | None = None
    pixel_vr: str | None = None
    has_pixel_data = PIXEL_DATA_TAG in header
    if has_pixel_data:
        raw = header.get_item(PIXEL_DATA_TAG, keep_deferred=True)
        pixel_vr = getattr(raw, "VR", None) or "OW"
        tell = getattr(raw, "value_tell", None)
        if transfer_syntax != DeflatedExplicitVRLittleEndian and tell is not None:
            pixel_offset = int(tell)
    has_float_pixel_data = any(tag in header for tag in _OTHER_PIXEL_TAGS)
    _strip_heavy_elements(header)

    samples = _int(_get(header, "SamplesPerPixel")) or 1
    pixel_representation = _int(_get(header, "PixelRepresentation")) or 0
    bits_allocated = _int(_get(header, "BitsAllocated"))
    padding = _padding_range(header, pixel_representation, bits_allocated)
    return SourceInstance(
        path=Path(path),
        header=header,
        transfer_syntax=transfer_syntax,
        pixel_offset=pixel_offset,
        pixel_vr=pixel_vr,
        has_pixel_data=has_pixel_data,
        has_float_pixel_data=has_float_pixel_data,
        number_of_frames=max(_int(_get(header, "NumberOfFrames")) or 1, 1),
        rows=_int(_get(header, "Rows")),
        columns=_int(_get(header, "Columns")),
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=_int(_get(header, "BitsStored")),
        pixel_representation=pixel_representation,
        photometric_interpretation=str(_get(header, "PhotometricInterpretation") or ""),
        padding_range=padding,
        sop_instance_uid=str(_get(header, "SOPInstanceUID") or ""),
        sop_class_uid=str(_get(header, "SOPClassUID") or ""),
        series_instance_uid=str(_get(header, "SeriesInstanceUID") or ""),
        study_instance_uid=str(_get(header, "StudyInstanceUID") or ""),
        frame_of_reference_uid=str(_get(header, "FrameOfReferenceUID") or "") or None,
        modality=str(_get(header, "Modality") or ""),
    )


def _strip_heavy_elements(header: Dataset) -> None:
    """Remove pixel data and every still-deferred element from a header kept in memory.

    Deferred elements would silently reopen the spool file when touched later (by results
    code, possibly after the file moved); they are large private blobs or overlays that no
    consumer of ``Volume.headers`` needs.
    """
    for tag in (PIXEL_DATA_TAG, *_OTHER_PIXEL_TAGS):
        if tag in header:
            del header[tag]
    deferred = [
        elem.tag
        for elem in (header.get_item(tag, keep_deferred=True) for tag in list(header.keys()))
        if elem is not None and getattr(elem, "value", 0) is None and getattr(elem, "length", None)
    ]
    for tag in deferred:
        logger.debug("dropping deferred element %s from kept header", tag)
        del header[tag]


def _padding_range(
    header: Dataset, pixel_representation: int, bits_allocated: int | None
) -> tuple[int, int] | None:
    value = _int(_get(header, "PixelPaddingValue"))
    if value is None:
        return None
    limit = _int(_get(header, "PixelPaddingRangeLimit"))

    def signed(v: int) -> int:
        # A value stored as US in a signed image (or read before VR correction) wraps.
        if pixel_representation == 1 and bits_allocated and v >= 1 << (bits_allocated - 1):
            return v - (1 << bits_allocated)
        return v

    value = signed(value)
    if limit is None:
        return (value, value)
    limit = signed(limit)
    return (min(value, limit), max(value, limit))


def frames_of(instance: SourceInstance) -> list[SourceFrame]:
    """Every 2D frame of an instance with its own geometry and rescale.

    For Enhanced / Legacy Converted Enhanced CT the per-frame functional groups win over the
    shared ones, which win over top-level attributes (tolerating non-conformant writers).
    """
    ds = instance.header
    top_image_type = [str(v).upper() for v in (_get(ds, "ImageType") or [])]
    top_localizer = "LOCALIZER" in top_image_type
    top_ipp = _floats(_get(ds, "ImagePositionPatient"), 3)
    top_iop = _floats(_get(ds, "ImageOrientationPatient"), 6)
    top_spacing = _floats(_get(ds, "PixelSpacing"), 2)
    top_slope = _float(_get(ds, "RescaleSlope"))
    top_intercept = _float(_get(ds, "RescaleIntercept"))
    slice_location = _float(_get(ds, "SliceLocation"))
    instance_number = _int(_get(ds, "InstanceNumber"))
    diameter = _float(_get(ds, "ReconstructionDiameter"))

    per_frame_items = _get(ds, "PerFrameFunctionalGroupsSequence")
    if not per_frame_items:
        return [
            _frame(instance, None, top_ipp, top_iop, top_spacing, top_slope, top_intercept,
                   slice_location, instance_number, top_localizer, diameter)
        ]

    shared_items = _get(ds, "SharedFunctionalGroupsSequence")
    shared = shared_items[0] if shared_items else None
    frames: list[SourceFrame] = []
    count = min(instance.number_of_frames, len(per_frame_items))
    if count != instance.number_of_frames:
        logger.warning(
            "SOP %s: NumberOfFrames %d but %d per-frame groups; using %d",
            instance.sop_instance_uid, instance.number_of_frames, len(per_frame_items), count,
        )
    for index in range(count):
        item = per_frame_items[index]
        ipp = _floats(_functional(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(
            _functional(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        )
        spacing = _floats(_functional(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        slope = _float(
            _functional(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
        )
        intercept = _float(
            _functional(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        )
        frame_type = _functional(item, shared, "CTImageFrameTypeSequence", "FrameType") or []
        localizer = top_localizer or "LOCALIZER" in [str(v).upper() for v in frame_type]
        frames.append(
            _frame(
                instance, index,
                ipp if ipp is not None else top_ipp,
                iop if iop is not None else top_iop,
                spacing if spacing is not None else top_spacing,
                slope if slope is not None else top_slope,
                intercept if intercept is not None else top_intercept,
                None, None, localizer, diameter,
            )
        )
    return frames


def _frame(
    instance: SourceInstance,
    index: int | None,
    ipp: np.ndarray | None,
    iop: np.ndarray | None,
    spacing: np.ndarray | None,
    slope: float | None,
    intercept: float | None,
    slice_location: float | None,
    instance_number: int | None,
    localizer: bool,
    diameter: float | None,
) -> SourceFrame:
    pixel_spacing = None
    if spacing is not None and np.all(spacing > 0):
        pixel_spacing = (float(spacing[0]), float(spacing[1]))
    if slope is None or slope == 0:
        slope = 1.0
    return SourceFrame(
        instance=instance,
        frame_index=index,
        ipp=ipp,
        iop=iop,
        pixel_spacing=pixel_spacing,
        slope=float(slope),
        intercept=float(intercept or 0.0),
        slice_location=slice_location,
        instance_number=instance_number,
        is_localizer=localizer,
        reconstruction_diameter=diameter if diameter and diameter > 0 else None,
    )


# --------------------------------------------------------------------------- pixel decoding


class FrameDecoder:
    """Decodes stored pixel values frame by frame, reading only those bytes from the file.

    Uses pydicom's decoders (native, RLE, and pylibjpeg / openjpeg / gdcm plugins for the JPEG
    family) on a file handle positioned at the Pixel Data value, so a frame is never held
    twice and a multi-frame file is never loaded whole. Returns *stored* values (before
    rescale) with unused high bits corrected, shape (rows, columns).
    """

    def __enter__(self) -> FrameDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is held between calls: each instance's file is opened and closed in
        :meth:`iter_frames`, so a failed load leaves no descriptor behind."""

    def _options(self, instance: SourceInstance) -> dict[str, Any]:
        opts = as_pixel_options(instance.header)
        opts.update(
            transfer_syntax_uid=instance.transfer_syntax,
            pixel_keyword="PixelData",
            correct_unused_bits=True,
            as_rgb=False,
        )
        if instance.pixel_vr:
            opts["pixel_vr"] = instance.pixel_vr
        return opts

    def iter_frames(
        self, instance: SourceInstance, indices: list[int] | None
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(frame_index, stored_values)`` of the wanted frames (None: all), file order."""
        wanted = list(range(instance.number_of_frames)) if indices is None else sorted(indices)
        if instance.pixel_offset is None:
            yield from self._iter_fallback(instance, wanted)
            return
        decoder = get_decoder(instance.transfer_syntax)
        opts = self._options(instance)
        handle = open(instance.path, "rb")  # noqa: SIM115 - closed below
        try:
            if instance.transfer_syntax.is_encapsulated:
                handle.seek(instance.pixel_offset)
                check_encoded_frames(handle, instance, wanted, opts.get("extended_offsets"))
            if instance.transfer_syntax.is_encapsulated or len(wanted) > 1:
                handle.seek(instance.pixel_offset)
                for index, (arr, _) in zip(
                    wanted,
                    decoder.iter_array(handle, indices=wanted, raw=True, validate=True, **opts),
                    strict=True,
                ):
                    yield index, self._check(instance, arr)
            else:
                for index in wanted:
                    handle.seek(instance.pixel_offset)
                    arr, _ = decoder.as_array(handle, index=index, raw=True, validate=True, **opts)
                    yield index, self._check(instance, arr)
        finally:
            handle.close()

    def _iter_fallback(
        self, instance: SourceInstance, wanted: list[int]
    ) -> Iterator[tuple[int, np.ndarray]]:
        # Deflated files: the pixel offset refers to the inflated stream, so read it whole.
        from pydicom.pixels import pixel_array

        ds = pydicom.dcmread(os.fspath(instance.path), force=True)
        for index in wanted:
            arr = pixel_array(ds, index=index if instance.number_of_frames > 1 else None,
                              raw=True, correct_unused_bits=True)
            yield index, self._check(instance, arr)

    @staticmethod
    def _check(instance: SourceInstance, arr: np.ndarray) -> np.ndarray:
        expected = (instance.rows, instance.columns)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.shape != expected:
            raise ValueError(f"decoded shape {arr.shape}, header says {expected}")
        return arr


_HEADER_SCAN = 64 * 1024
"""Bytes of an encoded frame searched for its image header (JPEG 2000 SIZ, JPEG SOF)."""
_J2K_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                       0xCE, 0xCF, 0xF7})
"""Start-of-frame markers: the JPEG processes of PS3.5 A.4 and JPEG-LS (SOF55, 0xF7)."""
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def encoded_frame_size(frame: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) that a JPEG-family frame's own header declares.

    ``None`` for other encodings (RLE, whose decoded size is Rows x Columns by definition).
    Raises ``ValueError`` for a JPEG or JPEG 2000 frame whose header is missing or cut short.
    """
    head = frame[:_HEADER_SCAN]
    if head.startswith(_J2K_SIZ) or head.startswith(_JP2_SIGNATURE):
        at = head.find(_J2K_SIZ)
        if at < 0 or len(head) < at + 42:
            raise ValueError("JPEG 2000 frame without a complete SIZ marker")
        # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz (ISO 15444-1 A.5.1)
        xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">LLLL", head, at + 8)
        (csiz,) = struct.unpack_from(">H", head, at + 40)
        return int(ysiz) - int(yosiz), int(xsiz) - int(xosiz), int(csiz)
    if head.startswith(b"\xff\xd8"):
        off = 2
        while off + 4 <= len(head):
            if head[off] != 0xFF:
                raise ValueError(f"JPEG frame: no marker at byte {off}")
            marker = head[off + 1]
            if marker == 0xFF:
                off += 1
                continue
            if marker in _JPEG_STANDALONE:
                off += 2
                continue
            if marker == 0xDA:
                break
            (length,) = struct.unpack_from(">H", head, off + 2)
            if marker in _JPEG_SOF:
                if off + 10 > len(head):
                    break
                rows, columns = struct.unpack_from(">HH", head, off + 5)
                return int(rows), int(columns), int(head[off + 9])
            off += 2 + int(length)
        raise ValueError("JPEG frame without a frame header (SOF)")
    return None


def check_encoded_frames(handle: Any, instance: SourceInstance, indices: list[int],
                         extended_offsets: Any = None) -> None:
    """Refuse, before decoding, frames whose own header states another size than the dataset.

    A JPEG 2000 or JPEG-LS header is a few bytes that the decoder trusts: a 500-byte frame
    declaring 60000 x 60000 makes OpenJPEG allocate gigabytes (and spend seconds) before it
    fails. Rows, Columns and Samples per Pixel are bounded by the loader's voxel limit, so
    agreeing with them bounds the decode. ``handle`` is positioned at the Pixel Data value;
    ``extended_offsets`` is the Extended Offset Table pair, as the decoder gets it.
    Raises ``ValueError`` (the loader's ``UNDECODABLE_PIXEL_DATA``).
    """
    wanted = set(indices)
    expected = (instance.rows, instance.columns, instance.samples_per_pixel)
    frames = generate_frames(handle, number_of_frames=instance.number_of_frames,
                             extended_offsets=extended_offsets)
    for index, frame in enumerate(frames):
        if index in wanted:
            if frame[:2] == b"\xff\xd8" and b"\xff\xd9" not in frame[-8:]:
                # Cut short: CharLS spends seconds on a truncated JPEG-LS frame (7 s for
                # half of a 512 x 512 one) before failing. Entropy-coded data cannot hold
                # FFD9 (byte or bit stuffing), so a complete stream ends with it (and at
                # most a pad byte or fill).
                raise ValueError(f"frame {index + 1}: JPEG stream without its end marker")
            declared = encoded_frame_size(frame)
            if declared is not None and declared != expected:
                raise ValueError(
                    f"frame {index + 1} declares {declared[0]}x{declared[1]} with "
                    f"{declared[2]} component(s); the header says {expected[0]}x{expected[1]} "
                    f"with {expected[2]}")
        if index >= max(wanted, default=-1):
            return


# --------------------------------------------------------------------------- acquisition time


_TIME_SOURCES: tuple[tuple[str, str | None], ...] = (
    ("AcquisitionDateTime", None),
    ("AcquisitionDate", "AcquisitionTime"),
    ("ContentDate", "ContentTime"),
    ("SeriesDate", "SeriesTime"),
    ("StudyDate", "StudyTime"),
)


def parse_utc_offset(value: Any) -> tzinfo | None:
    """Timezone Offset From UTC (0008,0201), ``+HHMM`` / ``-HHMM``, as a tzinfo."""
    text = str(value or "").strip()
    if len(text) != 5 or text[0] not in "+-" or not text[1:].isdigit():
        return None
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        return None
    delta = timedelta(hours=hours, minutes=minutes)
    return timezone(-delta if text[0] == "-" else delta)


def _combine(ds: Dataset, first: str, second: str | None) -> datetime | None:
    """A DICOM DT, or DA + TM, as a datetime (naive unless the DT carries an offset)."""
    raw_first = _get(ds, first)
    if not raw_first:
        return None
    try:
        if second is None:
            return datetime.fromisoformat(DT(str(raw_first)).isoformat())
        day: date = DA(str(raw_first))
        raw_second = _get(ds, second)
        moment: time = TM(str(raw_second)) if raw_second else time(0, 0)
        return datetime.combine(day, moment)
    except (ValueError, TypeError) as exc:
        logger.debug("unparseable %s/%s ignored: %s", first, second, exc)
        return None


def acquisition_datetime(headers: list[Dataset], default_tz: tzinfo = UTC) -> datetime | None:
    """When the series was acquired, as an aware UTC datetime, or None.

    Sources in order of preference: Acquisition DateTime, Acquisition Date + Time, Content
    Date + Time, Series Date + Time, and last Study Date + Time (the study's start: an
    early bound, so a turnaround measured from it errs long, never short). The first source
    present on any instance wins and the earliest value over the instances is taken (a
    sequential scan's first slice). A naive
    DICOM time is local time of the modality: the header's Timezone Offset From UTC if given,
    else ``default_tz`` (the configured site timezone).
    """
    for first, second in _TIME_SOURCES:
        values: list[datetime] = []
        for ds in headers:
            moment = _combine(ds, first, second)
            if moment is None:
                continue
            if moment.tzinfo is None:
                moment = moment.replace(
                    tzinfo=parse_utc_offset(_get(ds, "TimezoneOffsetFromUTC")) or default_tz
                )
            values.append(moment.astimezone(UTC))
        if values:
            return min(values)
    return None
