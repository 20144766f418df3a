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
