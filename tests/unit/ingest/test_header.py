"""Header extraction: what a real archive's quirks become in the database."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydicom.dataset import Dataset

from service.ingest.header import InstanceHeader, da


def _ds(**values: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2", "1.2.3", "1.2.3.4"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_a_hash_in_a_date_is_no_date() -> None:
    ds = _ds(StudyDate="61d6b371-5759-36d4-a66b-402c0333d1a9", StudyTime="153256.843000",
             SeriesDate="20170811", SeriesTime="153824.967000",
             PatientBirthDate="ba6d74f4-8a35-38e8-b696-a8cb0d0d87f4",
             PatientSex="64a6a8cd-c69c-3874-890c-3cb1ac7009e0")
    header = InstanceHeader.from_dataset(ds)
    # Not "61d6b371": a truncated hash is not a date.
    assert header.study_date is None and header.patient_birth_date is None
    assert header.patient_sex is None
    # The acquisition time falls back to the series date and time.
    assert header.acquired_at == datetime(2017, 8, 11, 15, 38, 24, 967000, tzinfo=UTC)


def test_valid_and_impossible_dates() -> None:
    assert da(_ds(StudyDate="20240229"), "StudyDate") == "20240229"
    assert da(_ds(StudyDate="20230229"), "StudyDate") is None  # no 29 February in 2023
    assert da(_ds(StudyDate="2024"), "StudyDate") is None
    assert da(_ds(), "StudyDate") is None


def test_the_real_chest_ct_header(real_chest_ct_dir: Path) -> None:
    from pydicom import dcmread

    first = sorted(real_chest_ct_dir.iterdir())[0]
    header = InstanceHeader.from_dataset(dcmread(first, stop_before_pixels=True))
    assert header.study_date is None
    assert header.body_part_examined == "CHEST"
    assert header.acquired_at is not None and header.acquired_at.year == 2017


def test_dates_at_the_ends_of_the_calendar_are_no_time() -> None:
    """Fuzzing (tests/fuzz): ``00010101`` (year 0 in local time) and ``+1400`` on it
    overflowed in the shift to UTC and an offset ``+9999`` made ``timezone()`` raise, out of
    the bookkeeper's ``prepare`` (the instance's row was lost until a rebuild)."""
    for elements in (
        {0x00080020: ("DA", b"00010101")},
        {0x00080020: ("DA", b"00010101"), 0x00080201: ("SH", b"+1400")},
        {0x0008002A: ("DT", b"00010101000000+1400")},
    ):
        header = InstanceHeader.per_instance(elements, study_uid="1.2", series_uid="1.2.3",
                                             sop_uid="1.2.3.4", transfer_syntax_uid=None)
        assert header.acquired_at is None, elements
    offset_nonsense = InstanceHeader.per_instance(
        {0x00080020: ("DA", b"20240101"), 0x00080201: ("SH", b"+9999")}, study_uid="1.2",
        series_uid="1.2.3", sop_uid="1.2.3.4", transfer_syntax_uid=None)
    assert offset_nonsense.acquired_at is not None  # the impossible offset is ignored
    ds = _ds(StudyDate="00010101", TimezoneOffsetFromUTC="+1400")
    assert InstanceHeader.from_dataset(ds).acquired_at is None
    ds = _ds(StudyDate="20240101", StudyTime="120000", TimezoneOffsetFromUTC="+9999")
    assert InstanceHeader.from_dataset(ds).acquired_at is not None  # offset ignored


def test_wrong_vr_on_the_character_set_is_an_unreadable_header(tmp_path: Path) -> None:
    """Fuzzing (tests/fuzz): Specific Character Set stored as UL made pydicom raise
    ``BytesLengthException`` (no ``ValueError``) out of ``read_header``, so every tracker tick
    failed on that one spool file."""
    import pytest

    from service.ingest.header import UnreadableHeader, read_header, read_header_bytes
    from service.ingest.validate import file_meta_prefix

    body = b"\x08\x00\x05\x00UL\x0a\x00ISO_IR 100"
    data = file_meta_prefix("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1",
                            "1.2.3", "T") + body
    with pytest.raises(UnreadableHeader):
        read_header_bytes(data)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    with pytest.raises(UnreadableHeader):
        read_header(path)


def test_string_attribute_sent_as_a_sequence_and_a_date_that_is_no_date() -> None:
    """Fuzzing (bench.fuzz): Content Time with VR SQ parsed lazily into an unknown VR and
    raised out of ``text`` (``NotImplementedError``); a Study Date of non-ASCII bytes passed
    ``DA`` and made ``datetime.combine`` raise (year 54760). Both out of ``per_instance``."""
    for elements in (
        {0x00080023: ("DA", b"20240101"), 0x00080033: ("SQ", b"A" * 64)},
        {0x00080020: ("DA", b"\xd5\xe8\n/"), 0x00080201: ("SH", b"A" * 64)},
    ):
        header = InstanceHeader.per_instance(elements, study_uid="1.2", series_uid="1.2.3",
                                             sop_uid="1.2.3.4", transfer_syntax_uid=None)
        assert header.acquired_at is None or header.acquired_at.tzinfo is not None
