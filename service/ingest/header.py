"""Header reading for bookkeeping and rules: pydicom, off the C-STORE hot path.

Values are cut to the widths of their database columns and decoded leniently: a malformed
optional attribute becomes ``None`` rather than an error, because the instance is already
acknowledged and on disk; only the qualification rules decide whether it is usable.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.valuerep import DA, DT, TM

logger = logging.getLogger(__name__)


class UnreadableHeader(ValueError):
    """A spool file whose header pydicom cannot read."""


_PARSE_ERRORS = (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError,
                 BytesLengthException, NotImplementedError)
"""What pydicom raises on a structurally valid dataset with hostile values: the parse
converts Specific Character Set eagerly, and a wrong VR on it (``UL`` holding
``ISO_IR 100``) raises ``BytesLengthException``, which is no ``ValueError``. Uncaught, one
such instance failed every tracker tick (the tracker retries forever) until it was removed."""


def read_header_bytes(data: bytes) -> Dataset:
    """Parse a Part 10 byte string up to (not including) the pixel data."""
    try:
        return dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (*_PARSE_ERRORS, OSError) as exc:
        raise UnreadableHeader(str(exc)) from exc


def read_header(path: Path) -> Dataset:
    """Parse a spool file's header (pixel data not read); ``OSError`` passes through."""
    try:
        return dcmread(path, stop_before_pixels=True)
    except _PARSE_ERRORS as exc:
        raise UnreadableHeader(f"{path.name}: {exc}") from exc


def text(ds: Dataset, keyword: str, width: int | None = None) -> str | None:
    """A string attribute, stripped, ``None`` when absent or empty; multi-values joined by \\."""
    try:
        value = ds.get(keyword)
        if value is None or value == "" or isinstance(value, Sequence):
            # A string attribute sent as SQ parses, lazily, into whatever its bytes say.
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            result = "\\".join(str(v) for v in value)
        else:
            result = str(value)
    except Exception:  # noqa: BLE001 - malformed optional attribute (conversion is lazy)
        return None
    result = result.strip().replace("\x00", "")
    if not result:
        return None
    return result[:width] if width else result


def da(ds: Dataset, keyword: str) -> str | None:
    """A DA attribute as ``YYYYMMDD`` when it is a real calendar date, else ``None``.

    De-identification tools and old archives put hash strings or partial values in dates
    (the real chest CT in ``../shared/data`` holds a UUID in Study Date): truncating such a
    value to eight characters would store a date that never was. ``acquisition_time`` falls
    back to the other date attributes for the turnaround figures.
    """
    value = text(ds, keyword)
    if value is None:
        return None
    return value if _fast_date(value) is not None else None


def _sex(value: str | None) -> str | None:
    """Patient's Sex as the standard's M, F or O; anything else (a hash) is unknown."""
    return value if value in ("M", "F", "O") else None


def integer(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return int(value)
    except Exception:  # noqa: BLE001
        return None


def number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return float(value)
    except Exception:  # noqa: BLE001
        return None


def _tz_from_offset(ds: Dataset) -> timezone | None:
    raw = text(ds, "TimezoneOffsetFromUTC")
    if not raw or len(raw) != 5 or raw[0] not in "+-" or not raw[1:].isdigit():
        return None
    if int(raw[1:3]) > 14 or int(raw[3:5]) > 59:
        # Real offsets run from -12:00 to +14:00; "+9999" would make timezone() raise.
        return None
    minutes = int(raw[1:3]) * 60 + int(raw[3:5])
    return timezone(timedelta(minutes=minutes if raw[0] == "+" else -minutes))


def _combine(day: str | None, clock: str | None, tz: timezone | None) -> datetime | None:
    if not day:
        return None
    try:
        parsed_day: date = DA(day)
        parsed_time: time = TM(clock) if clock else time(0, 0)
        if parsed_day is None:
            return None
        # Inside the try: DA accepts some non-dates (bytes that decode to digits of a year
        # beyond 9999) that only datetime.combine refuses.
        moment = datetime.combine(parsed_day, parsed_time or time(0, 0))
    except (ValueError, TypeError, OverflowError):
        return None
    return _aware(moment, tz)


def _aware(moment: datetime, tz: timezone | None) -> datetime | None:
    """``moment`` as aware UTC, or ``None`` when it has no UTC equivalent.

    Dates at the ends of the calendar (``00010101``, ``99991231`` with an offset, which
    de-identification tools and broken modalities write) overflow when shifted to UTC; such
    a value says nothing about when the images were taken.
    """
    try:
        if moment.tzinfo is None:
            # DICOM dates carry no zone unless Timezone Offset From UTC says so: the scanner
            # and this service are assumed to share the site's local time zone.
            moment = moment.replace(tzinfo=tz) if tz else moment.astimezone()
        return moment.astimezone(UTC)
    except (OverflowError, ValueError, OSError):
        return None


def acquisition_time(ds: Dataset) -> datetime | None:
    """When the images were acquired, as aware UTC; the first of these that parses wins:
    Acquisition DateTime, Acquisition Date+Time, Content Date+Time, Series Date+Time,
    Study Date+Time."""
    tz = _tz_from_offset(ds)
    raw_dt = text(ds, "AcquisitionDateTime")
    if raw_dt:
        try:
            parsed = DT(raw_dt)
            if parsed is not None:
                moment = _aware(datetime(parsed.year, parsed.month, parsed.day, parsed.hour,
                                         parsed.minute, parsed.second, parsed.microsecond,
                                         parsed.tzinfo), tz)
                if moment is not None:
                    return moment
        except (ValueError, TypeError, OverflowError):
            pass
    for day_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"),
                            ("ContentDate", "ContentTime"),
                            ("SeriesDate", "SeriesTime"),
                            ("StudyDate", "StudyTime")):
        moment = _combine(text(ds, day_kw), text(ds, time_kw), tz)
        if moment is not None:
            return moment
    return None


def _ascii(raw: bytes | None) -> str:
    if not raw:
        return ""
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace").strip()


def _fast_date(raw: str) -> date | None:
    if len(raw) == 8 and raw.isdigit():
        try:
            return date(int(raw[:4]), int(raw[4:6]), int(raw[6:8]))
        except ValueError:
            return None
    return None


def _fast_time(raw: str) -> time | None:
    whole, _, fraction = raw.partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (fraction and not
                                                               fraction.isdigit()):
        return None
    try:
        return time(int(whole[:2]), int(whole[2:4] or 0), min(int(whole[4:6] or 0), 59),
                    int((fraction + "000000")[:6]) if fraction else 0)
    except ValueError:
        return None


def fast_acquisition_time(elements: dict[int, tuple[str | None, bytes]]) -> datetime | None:
    """:func:`acquisition_time` from raw captured elements, without pydicom conversion.

    Handles the standard DA (YYYYMMDD) and TM (HH[MM[SS[.F]]]) forms; anything else (old
    colon forms, DT with offsets) falls back to the pydicom-based :func:`acquisition_time`.
    """
    def get(tag: int) -> str:
        element = elements.get(tag)
        return _ascii(element[1]) if element else ""

    if get(0x0008002A) or get(0x00080201):
        return None  # DT or an explicit offset: let the complete parser decide
    for day_tag, time_tag in ((0x00080022, 0x00080032), (0x00080023, 0x00080033),
                              (0x00080021, 0x00080031), (0x00080020, 0x00080030)):
        day_raw = get(day_tag)
        if not day_raw:
            continue
        day = _fast_date(day_raw)
        clock_raw = get(time_tag)
        clock = _fast_time(clock_raw) if clock_raw else time(0, 0)
        if day is None or clock is None:
            return None
        return _aware(datetime.combine(day, clock), None)
    return None


def frame_instances(number_of_frames: int | None, concatenation_total: int | None
                    ) -> int | None:
    """How many instances a series of multi-frame images holds, from one of them.

    An enhanced (multi-frame) CT object carries its whole stack unless it is one part of a
    concatenation, whose parts all state the total (PS3.3 C.7.6.16). Single-frame images say
    nothing (``None``).
    """
    if number_of_frames is None or number_of_frames <= 1:
        return None
    if concatenation_total is not None and concatenation_total > 0:
        return concatenation_total
    return 1


@dataclass(slots=True)
class InstanceHeader:
    """What the database keeps about one instance, its series and its study."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str | None = None
    instance_number: int | None = None
    acquired_at: datetime | None = None
    images_in_acquisition: int | None = None
    frame_instances: int | None = None
    """Instances the series holds according to a multi-frame header (Number of Frames > 1):
    In-concatenation Total Number when the frames are split over a concatenation, else 1 (the
    object is the whole stack); ``None`` for single-frame images. A completion hint."""
    # study
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician: str | None = None
    # series
    modality: str | None = None
    series_number: int | None = None
    series_description: str | None = None
    body_part_examined: str | None = None
    protocol_name: str | None = None
    frame_of_reference_uid: str | None = None

    @classmethod
    def from_dataset(cls, ds: Dataset, *, study_uid: str | None = None,
                     series_uid: str | None = None, sop_uid: str | None = None) -> InstanceHeader:
        """Extract the fields; explicit UIDs (already validated on the hot path) win."""
        meta = getattr(ds, "file_meta", None)
        transfer_syntax = None
        if meta is not None:
            transfer_syntax = text(meta, "TransferSyntaxUID", 64)
        return cls(
            study_instance_uid=study_uid or text(ds, "StudyInstanceUID", 64) or "",
            series_instance_uid=series_uid or text(ds, "SeriesInstanceUID", 64) or "",
            sop_instance_uid=sop_uid or text(ds, "SOPInstanceUID", 64) or "",
            sop_class_uid=text(ds, "SOPClassUID", 64) or "",
            transfer_syntax_uid=transfer_syntax,
            instance_number=integer(ds, "InstanceNumber"),
            acquired_at=acquisition_time(ds),
            images_in_acquisition=integer(ds, "ImagesInAcquisition"),
            frame_instances=frame_instances(integer(ds, "NumberOfFrames"),
                                            integer(ds, "InConcatenationTotalNumber")),
            patient_id=text(ds, "PatientID", 64),
            patient_name=text(ds, "PatientName", 324),
            patient_birth_date=da(ds, "PatientBirthDate"),
            patient_sex=_sex(text(ds, "PatientSex")),
            accession_number=text(ds, "AccessionNumber", 64),
            study_date=da(ds, "StudyDate"),
            study_time=text(ds, "StudyTime", 32),
            study_description=text(ds, "StudyDescription", 128),
            referring_physician=text(ds, "ReferringPhysicianName", 324),
            modality=text(ds, "Modality", 16),
            series_number=integer(ds, "SeriesNumber"),
            series_description=text(ds, "SeriesDescription", 128),
            body_part_examined=text(ds, "BodyPartExamined", 64),
            protocol_name=text(ds, "ProtocolName", 128),
            frame_of_reference_uid=text(ds, "FrameOfReferenceUID", 64),
        )

    @classmethod
    def per_instance(cls, elements: dict[int, tuple[str | None, bytes]], *, study_uid: str,
                     series_uid: str, sop_uid: str,
                     transfer_syntax_uid: str | None) -> InstanceHeader:
        """Only the per-instance columns, straight from the walk's raw elements (fast).

        Study and series columns are left ``None``; the bookkeeper fills them from a
        complete header of one instance per series (:meth:`from_dataset`).
        """
        def number_of(tag: int) -> int | None:
            element = elements.get(tag)
            value = _ascii(element[1]) if element else ""
            try:
                return int(value) if value else None
            except ValueError:
                return None

        def unsigned_short(tag: int) -> int | None:
            element = elements.get(tag)
            if element is None or len(element[1]) < 2:
                return None
            return int.from_bytes(element[1][:2], "little")

        acquired = fast_acquisition_time(elements)
        if acquired is None and any(t in elements for t in (0x0008002A, 0x00080022,
                                                             0x00080023, 0x00080021,
                                                             0x00080020)):
            acquired = acquisition_time(_dataset_from(elements))
        sop_class = elements.get(0x00080016)
        return cls(study_instance_uid=study_uid, series_instance_uid=series_uid,
                   sop_instance_uid=sop_uid,
                   sop_class_uid=_ascii(sop_class[1])[:64] if sop_class else "",
                   transfer_syntax_uid=transfer_syntax_uid,
                   instance_number=number_of(0x00200013), acquired_at=acquired,
                   images_in_acquisition=number_of(0x00201002),
                   frame_instances=frame_instances(number_of(0x00280008),
                                                   unsigned_short(0x00209163)))

    def study_values(self) -> dict[str, Any]:
        return {
            "patient_id": self.patient_id, "patient_name": self.patient_name,
            "patient_birth_date": self.patient_birth_date, "patient_sex": self.patient_sex,
            "accession_number": self.accession_number, "study_date": self.study_date,
            "study_time": self.study_time, "study_description": self.study_description,
            "referring_physician": self.referring_physician,
        }

    def series_values(self) -> dict[str, Any]:
        return {
            "modality": self.modality, "series_number": self.series_number,
            "series_description": self.series_description,
            "body_part_examined": self.body_part_examined, "protocol_name": self.protocol_name,
            "frame_of_reference_uid": self.frame_of_reference_uid,
        }


def _dataset_from(elements: dict[int, tuple[str | None, bytes]]) -> Dataset:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    return Dataset({Tag(tag): RawDataElement(Tag(tag), vr, len(value), value, 0, vr is None,
                                             True)
                    for tag, (vr, value) in sorted(elements.items())})
