"""DICOM writer: every transfer syntax reads back losslessly (pydicom, highdicom, DCMTK),
dciodvfy accepts the CT objects, and every option does what it says."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.synthetic import (
    DESCRIPTION_VARIANTS,
    MultiFrame,
    TransferSyntax,
    WriterOptions,
    instance_number_of,
    write_series,
    write_study,
)
from service.synthetic.phantom import Phantom
from tests.unit.synthetic.conftest import small_phantom

BODY_PARTS = {"CSPINE", "NECK", "SPINE", "HEADNECK"}


def tiny() -> Phantom:
    return small_phantom(n_slices=12, fractures=1)


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


def _slice_index(phantom: Phantom, ds: pydicom.Dataset) -> int:
    z = float(ds.ImagePositionPatient[2])
    return int(round((z - phantom.origin[2]) / phantom.spacing[0]))


def _errors(tool: str, path: Path) -> list[str]:
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


@pytest.mark.parametrize("syntax", list(TransferSyntax))
def test_every_transfer_syntax_reads_back_losslessly(syntax: TransferSyntax, tmp_path: Path,
                                                     dcmdump: str) -> None:
    p = tiny()
    paths = write_series(p, tmp_path, WriterOptions(transfer_syntax=syntax))
    assert len(paths) == p.shape[0]
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax.uid
        k = _slice_index(p, ds)
        assert np.array_equal(_hu(ds), p.hu[k])
        assert int(ds.InstanceNumber) == instance_number_of(p, k)
    # DCMTK parses every syntax (dcmdump exits non-zero and prints E: on a broken file).
    for path in paths[:3]:
        result = subprocess.run([dcmdump, "+P", "7fe0,0010", str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "E:" not in result.stderr


def test_head_first_instance_order_and_geometry(tmp_path: Path) -> None:
    p = tiny()
    paths = write_series(p, tmp_path)
    by_number = {int(pydicom.dcmread(f).InstanceNumber): f for f in paths}
    first, last = pydicom.dcmread(by_number[1]), pydicom.dcmread(by_number[len(paths)])
    assert float(first.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2])
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    top = p.slice_position(p.shape[0] - 1)[2]
    assert float(first.ImagePositionPatient[2]) == pytest.approx(top)
    assert [float(v) for v in first.PixelSpacing] == [p.spacing[1], p.spacing[2]]
    assert first.Modality == "CT" and first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.AcquisitionDateTime and first.ConvolutionKernel == "BONE"
    assert first.BodyPartExamined in BODY_PARTS
    feet = write_series(p, tmp_path / "feet", WriterOptions(instance_order="feet_first"))
    one = next(pydicom.dcmread(f) for f in feet if f.name == "1.dcm")
    assert _slice_index(p, one) == 0


def test_uids_are_deterministic(tmp_path: Path) -> None:
    p = tiny()
    a = {pydicom.dcmread(f).SOPInstanceUID for f in write_series(p, tmp_path / "a")}
    b = {pydicom.dcmread(f).SOPInstanceUID for f in write_series(p, tmp_path / "b")}
    assert a == b and len(a) == p.shape[0]
    assert all(len(uid) <= 64 for uid in a)


def test_dciodvfy_accepts_the_ct_objects(tmp_path: Path, dciodvfy: str) -> None:
    p = tiny()
    single = write_series(p, tmp_path / "single")
    enhanced = write_series(p, tmp_path / "enh", WriterOptions(multiframe=MultiFrame.ENHANCED))
    written = write_study(p, tmp_path / "study", WriterOptions(localizer=True,
                                                               non_ct_series=True))
    localizer = next(s for s in written if s.role == "localizer").paths[0]
    dose = next(s for s in written if s.role == "non_ct").paths[0]
    for path in (single[0], single[-1], enhanced[0], localizer, dose):
        assert _errors(dciodvfy, path) == [], path


def test_dciodvfy_on_the_legacy_converted_multiframe(tmp_path: Path, dciodvfy: str) -> None:
    p = tiny()
    (path,) = write_series(p, tmp_path, WriterOptions(multiframe=MultiFrame.LEGACY_CONVERTED))
    errors = _errors(dciodvfy, path)
    # highdicom references the source instances through ConversionSourceAttributesSequence
    # and fills the Common Instance Reference module accordingly; dciodvfy does not count
    # that sequence as a reference and reports exactly this one message.
    assert [e for e in errors if "ReferencedSeriesSequence present but Instance does not "
            "reference Instances" not in e] == []


@pytest.mark.parametrize("multiframe", [MultiFrame.ENHANCED, MultiFrame.LEGACY_CONVERTED])
@pytest.mark.parametrize("syntax", [TransferSyntax.EXPLICIT_VR_LE, TransferSyntax.RLE_LOSSLESS])
def test_multiframe_variants_hold_every_slice(multiframe: MultiFrame, syntax: TransferSyntax,
                                             tmp_path: Path) -> None:
    p = tiny()
    (path,) = write_series(p, tmp_path, WriterOptions(multiframe=multiframe,
                                                      transfer_syntax=syntax))
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == p.shape[0]
    image = hd.imread(str(path))
    frames = ds.pixel_array.astype(np.int32) + int(
        ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleIntercept)
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        k = int(round((z - p.origin[2]) / p.spacing[0]))
        assert np.array_equal(frames[i], p.hu[k])
    assert image.SOPInstanceUID == ds.SOPInstanceUID


def test_highdicom_builds_a_volume_from_the_series(tmp_path: Path) -> None:
    p = tiny()
    datasets = [pydicom.dcmread(f) for f in write_series(p, tmp_path)]
    volume = hd.get_volume_from_series(datasets)
    assert volume.spatial_shape == p.shape
    assert volume.spacing == pytest.approx(p.spacing)


def test_shuffle_duplicates_and_missing_slices(tmp_path: Path) -> None:
    p = tiny()
    paths = write_series(p, tmp_path, WriterOptions(shuffle=True, duplicates=2,
                                                    missing_slices=3))
    names = [f.name for f in paths]
    assert not any(n.split(".")[0].isdigit() for n in names)
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in paths]
    assert len(paths) == p.shape[0] - 3 + 2
    assert len(set(uids)) == p.shape[0] - 3
    numbers = sorted({int(pydicom.dcmread(f).InstanceNumber) for f in paths})
    assert numbers != sorted(int(pydicom.dcmread(f).InstanceNumber) for f in paths[:len(numbers)])
    kept = {_slice_index(p, pydicom.dcmread(f)) for f in paths}
    assert len(kept) == p.shape[0] - 3 and 0 in kept and p.shape[0] - 1 in kept


def test_missing_ipp_keeps_slice_location(tmp_path: Path) -> None:
    p = tiny()
    datasets = [pydicom.dcmread(f) for f in write_series(p, tmp_path,
                                                          WriterOptions(missing_ipp=2))]
    without = [d for d in datasets if "ImagePositionPatient" not in d]
    assert len(without) == 2 and all("SliceLocation" in d for d in without)


def test_gantry_tilt_shears_the_stack(tmp_path: Path) -> None:
    p = tiny()
    tilt = 15.0
    datasets = [pydicom.dcmread(f) for f in write_series(p, tmp_path,
                                                          WriterOptions(gantry_tilt_deg=tilt))]
    ds = datasets[0]
    iop = [float(v) for v in ds.ImageOrientationPatient]
    assert iop[4] == pytest.approx(np.cos(np.radians(tilt)), abs=1e-4)
    assert iop[5] == pytest.approx(np.sin(np.radians(tilt)), abs=1e-4)
    assert float(ds.GantryDetectorTilt) == tilt
    # Row 0 of each image lies on the table position: unchanged from the phantom.
    for d in datasets:
        assert np.array_equal(_hu(d)[0], p.hu[_slice_index(p, d)][0])
    # Further rows sample higher z: image row r shows phantom z + r*dy*sin(t).
    k = 2
    img = next(_hu(d) for d in datasets if _slice_index(p, d) == k)
    r = int(round(2 * p.spacing[0] / (p.spacing[1] * np.sin(np.radians(tilt)))))
    expected = p.hu[k + 2, int(round(r * np.cos(np.radians(tilt))))]
    assert np.abs(img[r].astype(np.int32) - expected).mean() < 60


def test_description_variants(tmp_path: Path) -> None:
    p = tiny()
    seen = set()
    for i, variant in enumerate(DESCRIPTION_VARIANTS):
        path = write_series(p, tmp_path / str(i), WriterOptions(description_variant=i))[0]
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.StudyDescription == variant.study and ds.SeriesDescription == variant.series
        assert ds.ProtocolName == variant.protocol and ds.BodyPartExamined in BODY_PARTS
        seen.add(ds.StudyDescription)
    assert {"CT CERVICAL SPINE", "C-SPINE W/O", "NECK", "TRAUMA", "CSPINE"} <= seen


def test_study_with_every_extra_series(tmp_path: Path) -> None:
    p = tiny()
    written = write_study(p, tmp_path, WriterOptions(localizer=True, soft_kernel_series=True,
                                                     non_ct_series=True))
    roles = {s.role: s for s in written}
    assert set(roles) == {"ct", "soft", "localizer", "non_ct"}
    first = {role: pydicom.dcmread(s.paths[0]) for role, s in roles.items()}
    assert len({d.StudyInstanceUID for d in first.values()}) == 1
    assert len({d.SeriesInstanceUID for d in first.values()}) == 4
    assert first["localizer"].ImageType[2] == "LOCALIZER"
    assert first["non_ct"].Modality == "OT"
    assert first["non_ct"].SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert first["soft"].ConvolutionKernel == "SOFT"
    assert first["ct"].FrameOfReferenceUID == first["soft"].FrameOfReferenceUID
    # The soft kernel is smoother: its pixel-to-pixel differences are smaller.
    sharp = np.abs(np.diff(_hu(first["ct"]), axis=1)).mean()
    soft = np.abs(np.diff(_hu(first["soft"]), axis=1)).mean()
    assert soft < 0.6 * sharp
