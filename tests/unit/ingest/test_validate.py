"""The hot-path structural walk: complete datasets pass with their UIDs, any cut fails."""

from __future__ import annotations

import io
import zlib

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from harness.data.ctdata import SeriesSpec, ct_dataset
from service.ingest.validate import UndecodableDataset, scan_dataset


def encode(ds: Dataset, syntax: str) -> bytes:
    """The dataset bytes as they travel in a C-STORE (no preamble, no file meta)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def with_sequences(ds: Dataset) -> Dataset:
    """Add nested sequences so undefined-length items get walked."""
    inner = Dataset()
    inner.CodeValue = "T-1500"
    inner.CodingSchemeDesignator = "SRT"
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, item])
    ds["ReferencedImageSequence"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                    ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_complete_dataset_passes_with_its_uids(syntax: str) -> None:
    spec = SeriesSpec()
    ds = with_sequences(ct_dataset(spec, 3))
    keys = scan_dataset(encode(ds, syntax), syntax)
    assert keys.sop_instance_uid == ds.SOPInstanceUID
    assert keys.study_instance_uid == spec.study_uid
    assert keys.series_instance_uid == spec.series_uid
    assert keys.sop_class_uid == ds.SOPClassUID
    assert keys.has_pixel_data


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_cut_inside_an_element_is_detected(syntax: str) -> None:
    data = encode(with_sequences(ct_dataset(SeriesSpec(rows=8, columns=8), 0)), syntax)
    boundaries = _element_boundaries(data, syntax)
    for cut in range(len(data)):
        if cut in boundaries:
            continue
        with pytest.raises(UndecodableDataset):
            scan_dataset(data[:cut], syntax)


def _element_boundaries(data: bytes, syntax: str) -> set[int]:
    """Offsets at which a top-level element ends (a cut there is structurally valid)."""
    from pydicom.filereader import read_dataset

    fp = io.BytesIO(data)
    ds = read_dataset(fp, syntax == ImplicitVRLittleEndian, True)
    ends = {0}
    # Re-encode element by element to find where each top-level element ends.
    partial = Dataset()
    for element in ds:
        partial.add(element)
        ends.add(len(encode(partial, syntax)))
    return ends


def test_cut_before_pixel_data_is_visible_as_missing_pixel_data() -> None:
    ds = ct_dataset(SeriesSpec(), 0)
    del ds.PixelData
    keys = scan_dataset(encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert not keys.has_pixel_data


def test_encapsulated_pixel_data_is_walked_and_truncation_found() -> None:
    ds = ct_dataset(SeriesSpec(rows=16, columns=16), 0)
    ds.PixelData = encapsulate([b"\x01" * 100, b"\x02" * 60])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = encode(ds, ExplicitVRLittleEndian)
    keys = scan_dataset(data, JPEG2000Lossless)
    assert keys.has_pixel_data
    for cut in (len(data) - 1, len(data) - 8, len(data) - 70, len(data) - 170):
        with pytest.raises(UndecodableDataset):
            scan_dataset(data[:cut], JPEG2000Lossless)


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"not a dicom dataset at all, just text" * 10, bytes(range(256)) * 4,
    b"\xff" * 1000,
])
def test_garbage_is_undecodable(payload: bytes) -> None:
    with pytest.raises(UndecodableDataset):
        scan_dataset(payload, ExplicitVRLittleEndian)


def test_bad_deflate_stream_is_undecodable() -> None:
    with pytest.raises(UndecodableDataset, match="inflate"):
        scan_dataset(b"\x00\x01garbage", DeflatedExplicitVRLittleEndian)


def test_real_scanner_file_passes(real_ct_dir) -> None:  # type: ignore[no-untyped-def]
    path = sorted(real_ct_dir.glob("*.dcm"))[0]
    raw = path.read_bytes()
    ds = dcmread(io.BytesIO(raw))
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    keys = scan_dataset(raw[meta_end:], ds.file_meta.TransferSyntaxUID)
    assert keys.sop_instance_uid == ds.SOPInstanceUID
    assert keys.has_pixel_data


def test_deflate_bomb_refused_while_inflating() -> None:
    """Fuzzing (tests/fuzz): 16 KiB of deflated zeros inflated whole to 16 MiB on the hot path;
    beyond ``max_inflated_bytes`` the walk now refuses without holding the rest."""
    import tracemalloc

    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = packer.compress(b"\x00" * (16 << 20)) + packer.flush()
    tracemalloc.start()
    try:
        with pytest.raises(UndecodableDataset, match="inflates beyond"):
            scan_dataset(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bomb) < 20_000 and peak < 4 << 20


def test_deflated_stream_cut_short_is_undecodable() -> None:
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(b"\x08\x00\x16\x00UI\x04\x001.2\x00" * 100) + packer.flush()
    with pytest.raises(UndecodableDataset, match="does not inflate"):
        scan_dataset(stream[:-4], DeflatedExplicitVRLittleEndian)
