"""load_volume: every quirk the builder can write, and every reason code it must give."""

from __future__ import annotations

import pickle
import shutil
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from harness.dcmtk import dcmtk
from service.imaging.geometry import AIR_HU
from service.imaging.qc import QcWarning, VolumeError
from service.imaging.source import DEFER_SIZE
from service.imaging.volume import Volume, load_series, load_volume
from service.outcomes import SeriesReason

from .conftest import (
    SeriesSpec,
    expected_hu,
    make_slice,
    save,
    smooth_phantom_hu,
    write_enhanced_ct,
    write_localizer,
    write_series,
)

MIN = 5  # min_slices for the small test series


def load(paths: list[Path], **kwargs: object) -> Volume:
    kwargs.setdefault("min_slices", MIN)
    return load_volume(paths, **kwargs)  # type: ignore[arg-type]


def reason_of(paths: list[Path], **kwargs: object) -> VolumeError:
    with pytest.raises(VolumeError) as info:
        load(paths, **kwargs)
    return info.value


def assert_matches_phantom(volume: Volume, spec: SeriesSpec) -> None:
    expected = np.rint(expected_hu(volume.affine, volume.shape, spec.phantom))
    np.testing.assert_array_equal(volume.hu, expected)


# --------------------------------------------------------------------------- the plain case


def test_plain_series_geometry_and_provenance(series_dir: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(series_dir, spec)
    volume = load(paths)

    assert volume.shape == (24, 32, 40)
    assert volume.hu.dtype == np.int16
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.7))
    np.testing.assert_allclose(volume.affine[:3, 3], spec.origin)
    np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 2.0])
    np.testing.assert_allclose(volume.affine[:3, 1], [0, 0.8, 0])
    np.testing.assert_allclose(volume.affine[:3, 2], [0.7, 0, 0])
    assert_matches_phantom(volume, spec)
    written = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
    assert volume.sop_instance_uids == written
    assert volume.frame_numbers == [None] * 24
    assert [h.SOPInstanceUID for h in volume.headers] == written
    assert all("PixelData" not in h for h in volume.headers)
    assert volume.headers[0].PatientID == "PHANTOM-1"
    assert volume.study_instance_uid == spec.study_uid
    assert volume.series_instance_uid == spec.series_uid
    assert volume.frame_of_reference_uid == spec.frame_of_reference_uid
    assert volume.acquired_at == datetime(2024, 3, 15, 10, 15, tzinfo=UTC)
    assert volume.warnings == []
    assert volume.gantry_tilt_deg == pytest.approx(0.0, abs=1e-6)
    assert not volume.resampled


def test_index_lps_round_trip(series_dir: Path) -> None:
    volume = load(write_series(series_dir, SeriesSpec()))
    index = np.array([[3.0, 5.5, 7.25], [0, 0, 0]])
    np.testing.assert_allclose(volume.lps_to_index(volume.index_to_lps(index)), index)
    np.testing.assert_allclose(volume.index_to_lps(np.array([1, 0, 0])), [-14.0, -12.8, -28.0])
    np.testing.assert_allclose(volume.normal, [0, 0, 1])


@pytest.mark.parametrize("arrival", ["reversed", "shuffled"])
def test_arrival_order_and_instance_numbers_do_not_matter(tmp_path: Path, arrival: str) -> None:
    spec = SeriesSpec()
    reference = load(write_series(tmp_path / "ref", spec))
    order = list(range(spec.n_slices))[::-1]
    if arrival == "shuffled":
        order = [int(i) for i in np.random.default_rng(7).permutation(spec.n_slices)]

    def scramble_numbers(k: int, ds: Dataset) -> None:
        ds.InstanceNumber = spec.n_slices - k  # reversed numbering too

    volume = load(write_series(tmp_path / "other", spec, order=order, mutate=scramble_numbers))
    np.testing.assert_array_equal(volume.hu, reference.hu)
    np.testing.assert_allclose(volume.affine, reference.affine)


def test_normal_pointing_down_sorts_along_the_normal(series_dir: Path) -> None:
    # Row direction flipped: the normal is -z, so z index 0 is the most superior slice.
    spec = SeriesSpec(iop=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), origin=(14.0, -12.8, 20.0))
    volume = load(write_series(series_dir, spec))
    np.testing.assert_allclose(volume.normal, [0, 0, -1])
    positions = volume.index_to_lps(np.array([[z, 0, 0] for z in range(volume.shape[0])]))
    assert np.all(np.diff(positions[:, 2]) < 0)
    assert_matches_phantom(volume, spec)


def test_oblique_untilted_stack_is_kept_without_resampling(series_dir: Path) -> None:
    # A stack rotated 20 degrees about x, slices advancing along their own normal: a regular
    # grid, described exactly by the affine.
    t = np.radians(20)
    spec = SeriesSpec(iop=(1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))))
    volume = load(write_series(series_dir, spec))
    assert not volume.resampled
    np.testing.assert_allclose(volume.normal, [0, np.sin(t), np.cos(t)], atol=1e-6)
    assert_matches_phantom(volume, spec)


# --------------------------------------------------------------------------- pixel encodings


def _dcmcjpeg_lossless(directory: Path, spec: SeriesSpec) -> list[Path]:
    plain = write_series(directory / "plain", spec)
    out = []
    for path in plain:
        target = directory / f"jpeg_{path.name}"
        subprocess.run(["dcmcjpeg", "+e1", str(path), str(target)], check=True,
                       capture_output=True, timeout=30)
        out.append(target)
    return out


@pytest.mark.parametrize(
    "transfer_syntax",
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
     DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless],
    ids=lambda ts: UID(ts).keyword or str(ts),
)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_transfer_syntaxes_and_signedness(series_dir: Path, transfer_syntax: UID,
                                          signed: bool) -> None:
    spec = SeriesSpec(n_slices=8, transfer_syntax=transfer_syntax, signed=signed,
                      intercept=0.0 if signed else -1024.0)
    volume = load(write_series(series_dir, spec))
    assert_matches_phantom(volume, spec)


def test_jpeg_lossless_process14_through_gdcm(tmp_path: Path) -> None:
    if dcmtk("dcmcjpeg") is None:
        pytest.skip("dcmcjpeg (DCMTK) not installed: cannot write JPEG Lossless test files")
    spec = SeriesSpec(n_slices=6)
    paths = _dcmcjpeg_lossless(tmp_path, spec)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert_matches_phantom(load(paths), spec)


def test_unused_high_bits_are_ignored(series_dir: Path) -> None:
    # Bits Stored 12 with garbage in the top nibble (old overlay-in-pixel practice).
    spec = SeriesSpec(n_slices=6, bits_stored=12)

    def dirty(k: int, ds: Dataset) -> None:
        ds.PixelData = (spec.stored(k) | np.uint16(0xF000)).tobytes()

    assert_matches_phantom(load(write_series(series_dir, spec, mutate=dirty)), spec)


def test_rescale_applied_per_slice_integer_stays_int16(series_dir: Path) -> None:
    n = 8
    spec = SeriesSpec(n_slices=n, slope=[1.0, 2.0] * (n // 2),
                      intercept=[-1024.0, -1000.0, -2048.0, -1024.0] * (n // 4))
    volume = load(write_series(series_dir, spec))
    assert volume.hu.dtype == np.int16
    # Slope 2 quantises to even HU steps: compare against the re-quantised phantom.
    expected = expected_hu(volume.affine, volume.shape)
    for k in range(n):
        slope, intercept = spec.slopes()[k], spec.intercepts()[k]
        requantised = np.rint((expected[k] - intercept) / slope) * slope + intercept
        np.testing.assert_array_equal(volume.hu[k], requantised)


def test_fractional_rescale_gives_float32(series_dir: Path) -> None:
    spec = SeriesSpec(n_slices=6, slope=0.5, intercept=-1024.25)
    volume = load(write_series(series_dir, spec))
    assert volume.hu.dtype == np.float32
    expected = expected_hu(volume.affine, volume.shape)
    requantised = np.rint((expected + 1024.25) / 0.5) * 0.5 - 1024.25
    np.testing.assert_allclose(volume.hu, requantised, atol=1e-3)


@pytest.mark.parametrize("signed,padding", [(False, 0), (True, -2000)], ids=["unsigned", "signed"])
def test_pixel_padding_value_becomes_air(series_dir: Path, signed: bool, padding: int) -> None:
    spec = SeriesSpec(n_slices=6, signed=signed, intercept=0.0 if signed else -1024.0,
                      padding_value=padding)
    volume = load(write_series(series_dir, spec))
    points = volume.index_to_lps(np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape),
                                                      indexing="ij"), axis=-1))
    outside = np.hypot(points[..., 0], points[..., 1]) > 15.0
    assert outside.any()
    assert np.all(volume.hu[outside] == AIR_HU)
    expected = expected_hu(volume.affine, volume.shape)
    np.testing.assert_array_equal(volume.hu[~outside], expected[~outside])


def test_pixel_padding_range_limit(series_dir: Path) -> None:
    spec = SeriesSpec(n_slices=6, signed=True, intercept=0.0)

    def pad_range(k: int, ds: Dataset) -> None:
        stored = spec.stored(k)
        stored[:4, :] = -3000  # a band of stored values inside the padding range
        stored[4:6, :] = -2500
        ds.PixelData = stored.tobytes()
        ds.PixelPaddingValue = -3000
        ds.PixelPaddingRangeLimit = -2400

    volume = load(write_series(series_dir, spec, mutate=pad_range))
    assert np.all(volume.hu[:, :6, :] == AIR_HU)
    np.testing.assert_array_equal(volume.hu[:, 6:], expected_hu(volume.affine, volume.shape)[:, 6:])


# --------------------------------------------------------------------------- duplicates


def test_exact_copies_are_dropped(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    copies = []
    for path in paths[3:6]:
        copy = tmp_path / "s" / f"copy_{path.name}"
        shutil.copy(path, copy)
        copies.append(copy)
    volume = load(paths + copies)
    assert volume.shape[0] == spec.n_slices
    assert QcWarning.DUPLICATE_SLICES_DROPPED in volume.warnings
    assert len(volume.headers) == spec.n_slices
    assert_matches_phantom(volume, spec)


def test_same_position_identical_pixels_new_uid_is_dropped(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    resent = make_slice(spec, 10, sop_uid=generate_uid())
    extra = save(resent, tmp_path / "s" / "resent.dcm", ExplicitVRLittleEndian)
    volume = load([*paths, extra])
    assert volume.shape[0] == spec.n_slices
    assert QcWarning.DUPLICATE_SLICES_DROPPED in volume.warnings
    kept = min(resent.SOPInstanceUID, pydicom.dcmread(paths[10]).SOPInstanceUID)
    assert volume.sop_instance_uids[10] == kept
    assert_matches_phantom(volume, spec)


def test_same_position_different_pixels_is_a_conflict(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    other = make_slice(spec, 10)
    other.PixelData = (spec.stored(10) + np.uint16(5)).tobytes()
    extra = save(other, tmp_path / "s" / "other.dcm", ExplicitVRLittleEndian)
    error = reason_of([*paths, extra])
    assert error.reason is SeriesReason.CONFLICTING_DUPLICATES
    assert "slice 10" in error.detail


def test_same_uid_at_two_positions_is_a_conflict(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    clash = make_slice(spec, 30 if spec.n_slices > 30 else 3,
                       sop_uid=pydicom.dcmread(paths[10]).SOPInstanceUID)
    extra = save(clash, tmp_path / "s" / "clash.dcm", ExplicitVRLittleEndian)
    assert reason_of([*paths, extra]).reason is SeriesReason.CONFLICTING_DUPLICATES


# --------------------------------------------------------------------------- counts and gaps


def test_missing_slice_in_the_middle(series_dir: Path) -> None:
    paths = write_series(series_dir, SeriesSpec())
    error = reason_of(paths[:12] + paths[13:])
    assert error.reason is SeriesReason.MISSING_SLICES
    assert "between slices 11 and 12" in error.detail


def test_missing_end_slices_are_not_a_gap(series_dir: Path) -> None:
    paths = write_series(series_dir, SeriesSpec())
    assert load(paths[1:-1]).shape[0] == 22


def test_too_few_slices(series_dir: Path) -> None:
    paths = write_series(series_dir, SeriesSpec(n_slices=6))
    error = reason_of(paths, min_slices=10)
    assert error.reason is SeriesReason.TOO_FEW_SLICES
    assert "6 distinct" in error.detail


def test_gap_ratio_is_configurable(series_dir: Path) -> None:
    paths = write_series(series_dir, SeriesSpec())
    volume = load(paths[:12] + paths[13:], max_gap_ratio=2.5)
    # Accepted with a 2x step: uneven spacing, resampled onto a uniform grid.
    assert QcWarning.IRREGULAR_SPACING_RESAMPLED in volume.warnings


def test_uneven_spacing_is_resampled(series_dir: Path) -> None:
    spec = SeriesSpec(phantom=smooth_phantom_hu)

    def jitter(k: int, ds: Dataset) -> None:
        if k == 11:  # 0.6 mm off the 2 mm grid
            position = spec.position(k) + np.array([0.0, 0.0, 0.6])
            ds.ImagePositionPatient = [float(v) for v in position]
            ds.PixelData = _stored_at(spec, position).tobytes()

    volume = load(write_series(series_dir, spec, mutate=jitter))
    assert QcWarning.IRREGULAR_SPACING_RESAMPLED in volume.warnings
    assert volume.resampled
    assert volume.spacing[0] == pytest.approx(2.0)
    expected = expected_hu(volume.affine, volume.shape, smooth_phantom_hu)
    # Linear interpolation of a smooth field: within a few HU everywhere.
    assert np.abs(volume.hu - expected).max() <= 6


def _stored_at(spec: SeriesSpec, position: np.ndarray) -> np.ndarray:
    row, col = spec.directions()
    dy, dx = spec.pixel_spacing
    yy, xx = np.meshgrid(np.arange(spec.rows), np.arange(spec.cols), indexing="ij")
    points = position + yy[..., None] * dy * col + xx[..., None] * dx * row
    values = np.rint(spec.phantom(points) - spec.intercepts()[0])
    return values.astype(np.uint16)


# --------------------------------------------------------------------------- consistency


def test_inconsistent_orientation(series_dir: Path) -> None:
    spec = SeriesSpec()

    def rotate(k: int, ds: Dataset) -> None:
        if k == 7:
            t = np.radians(5)
            ds.ImageOrientationPatient = [float(np.cos(t)), float(np.sin(t)), 0.0,
                                          float(-np.sin(t)), float(np.cos(t)), 0.0]

    error = reason_of(write_series(series_dir, spec, mutate=rotate))
    assert error.reason is SeriesReason.MIXED_ORIENTATION
    assert "5.0 deg" in error.detail


def test_rounded_orientation_is_not_inconsistent(series_dir: Path) -> None:
    def round_iop(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.99999, 0.00001 * (k % 3)]

    assert load(write_series(series_dir, SeriesSpec(), mutate=round_iop)).warnings == []


def test_inconsistent_pixel_spacing(series_dir: Path) -> None:
    def respace(k: int, ds: Dataset) -> None:
        if k == 4:
            ds.PixelSpacing = [0.9, 0.7]

    assert reason_of(write_series(series_dir, SeriesSpec(), mutate=respace)).reason is \
        SeriesReason.INCONSISTENT_PIXEL_SPACING


def test_inconsistent_matrix(tmp_path: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(tmp_path / "s", spec)
    bigger = make_slice(replace(spec, rows=36), 12)
    odd = save(bigger, tmp_path / "s" / "odd.dcm", ExplicitVRLittleEndian)
    paths[12].unlink()
    error = reason_of([*paths[:12], odd, *paths[13:]])
    assert error.reason is SeriesReason.INCONSISTENT_MATRIX
    assert "32x40" in error.detail and "36x40" in error.detail


@pytest.mark.parametrize("iop,plane", [((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "sagittal"),
                                       ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "coronal")])
def test_non_axial(series_dir: Path, iop: tuple[float, ...], plane: str) -> None:
    error = reason_of(write_series(series_dir, SeriesSpec(iop=iop)))
    assert error.reason is SeriesReason.NOT_AXIAL
    assert plane in error.detail


def test_mixed_series(tmp_path: Path) -> None:
    a = write_series(tmp_path / "a", SeriesSpec(n_slices=6))
    b = write_series(tmp_path / "b", SeriesSpec(n_slices=6))
    assert reason_of(a + b).reason is SeriesReason.MIXED_SERIES


def test_inconsistent_frame_of_reference(series_dir: Path) -> None:
    def other_frame(k: int, ds: Dataset) -> None:
        if k > 10:
            ds.FrameOfReferenceUID = "1.2.3.4.5"

    assert reason_of(write_series(series_dir, SeriesSpec(), mutate=other_frame)).reason is \
        SeriesReason.INCONSISTENT_FRAME_OF_REFERENCE


# --------------------------------------------------------------------------- gantry tilt


def _tilt_spec(tilt: float, mode: str) -> SeriesSpec:
    return SeriesSpec(tilt_deg=tilt, tilt_mode=mode, phantom=smooth_phantom_hu, n_slices=30,
                      rows=48, cols=48, pixel_spacing=(0.7, 0.7), origin=(-16.0, -16.0, -30.0))


def _covered(volume: Volume, spec: SeriesSpec) -> np.ndarray:
    """Voxels of the volume that lie inside the written (sheared) stack, with a margin."""
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), axis=-1)
    points = volume.index_to_lps(grid.astype(float))
    row, col = spec.directions()
    normal = np.cross(row, col)
    first, last = spec.position(0), spec.position(spec.n_slices - 1)
    s = points @ normal
    k = (s - first @ normal) / ((last - first) @ normal) * (spec.n_slices - 1)
    step = (last - first) / (spec.n_slices - 1)
    origin = spec.position(0)[None, None, None] + k[..., None] * step
    delta = points - origin
    i = delta @ col / spec.pixel_spacing[0]
    j = delta @ row / spec.pixel_spacing[1]
    return ((k >= 0.5) & (k <= spec.n_slices - 1.5) & (i >= 1) & (i <= spec.rows - 2)
            & (j >= 1) & (j <= spec.cols - 2))


@pytest.mark.parametrize("mode", ["iop", "ipp"])
def test_gantry_tilt_is_resampled_to_axial(series_dir: Path, mode: str) -> None:
    spec = _tilt_spec(15.0, mode)
    volume = load(write_series(series_dir, spec))
    assert QcWarning.GANTRY_TILT_RESAMPLED in volume.warnings
    assert volume.resampled
    assert volume.gantry_tilt_deg == pytest.approx(15.0, abs=0.05)
    np.testing.assert_allclose(volume.normal, [0, 0, 1], atol=1e-9)  # axial output
    np.testing.assert_allclose(volume.affine[:3, 2], [0.7, 0, 0], atol=1e-9)
    covered = _covered(volume, spec)
    assert covered.mean() > 0.5
    expected = expected_hu(volume.affine, volume.shape, smooth_phantom_hu)
    error = np.abs(volume.hu.astype(float) - expected)[covered]
    assert error.max() <= 8, error.max()  # bilinear + linear of a smooth field
    assert len(volume.sop_instance_uids) == volume.shape[0]


def test_gantry_tilt_with_uneven_spacing_takes_the_general_path(series_dir: Path) -> None:
    # Not a lattice any more (one slice 0.5 mm off): each voxel is projected onto its two
    # neighbouring planes along the normal instead of one affine map.
    spec = _tilt_spec(15.0, "ipp")
    moved = 13
    shift = np.array([0.0, 0.0, 0.5])

    def jitter(k: int, ds: Dataset) -> None:
        if k == moved:
            position = spec.position(k) + shift
            ds.ImagePositionPatient = [float(v) for v in position]
            points = spec.pixel_points(k) + shift
            ds.PixelData = np.rint(spec.phantom(points) + 1024).astype(np.uint16).tobytes()

    volume = load(write_series(series_dir, spec, mutate=jitter))
    assert volume.warnings == [QcWarning.GANTRY_TILT_RESAMPLED,
                               QcWarning.IRREGULAR_SPACING_RESAMPLED]
    covered = _covered(volume, spec)
    expected = expected_hu(volume.affine, volume.shape, smooth_phantom_hu)
    assert np.abs(volume.hu.astype(float) - expected)[covered].max() <= 8


@pytest.mark.parametrize("mode", ["iop", "ipp"])
def test_excessive_gantry_tilt_is_refused(series_dir: Path, mode: str) -> None:
    paths = write_series(series_dir, _tilt_spec(35.0, mode))
    error = reason_of(paths)
    assert error.reason is SeriesReason.GANTRY_TILT
    assert "35.0 deg" in error.detail
    assert load(paths, max_gantry_tilt_deg=40.0).gantry_tilt_deg == pytest.approx(35.0, abs=0.05)


# --------------------------------------------------------------------------- recoveries


def test_positions_from_slice_location_for_some_slices(tmp_path: Path) -> None:
    spec = SeriesSpec()
    reference = load(write_series(tmp_path / "ref", spec))

    def drop_ipp(k: int, ds: Dataset) -> None:
        if k % 3 == 1:
            del ds.ImagePositionPatient

    volume = load(write_series(tmp_path / "s", spec, mutate=drop_ipp))
    assert volume.warnings == [QcWarning.POSITIONS_FROM_SLICE_LOCATION]
    np.testing.assert_array_equal(volume.hu, reference.hu)
    np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-6)


def test_positions_from_slice_location_for_all_slices(tmp_path: Path) -> None:
    spec = SeriesSpec()
    reference = load(write_series(tmp_path / "ref", spec))
    order = [int(i) for i in np.random.default_rng(3).permutation(spec.n_slices)]

    def drop_ipp(k: int, ds: Dataset) -> None:
        del ds.ImagePositionPatient

    volume = load(write_series(tmp_path / "s", spec, order=order, mutate=drop_ipp))
    assert QcWarning.POSITIONS_FROM_SLICE_LOCATION in volume.warnings
    np.testing.assert_array_equal(volume.hu, reference.hu)
    assert volume.spacing == pytest.approx(reference.spacing)
    # Only the in-plane origin is invented (centred field of view); z is the real one.
    assert volume.affine[2, 3] == pytest.approx(reference.affine[2, 3])


def test_positions_from_instance_number(tmp_path: Path) -> None:
    spec = SeriesSpec()
    reference = load(write_series(tmp_path / "ref", spec))

    def strip(k: int, ds: Dataset) -> None:
        if k in (5, 6, 17):
            del ds.ImagePositionPatient
            del ds.SliceLocation

    volume = load(write_series(tmp_path / "s", spec, mutate=strip))
    assert QcWarning.POSITIONS_FROM_INSTANCE_NUMBER in volume.warnings
    np.testing.assert_array_equal(volume.hu, reference.hu)


def test_no_positions_at_all(series_dir: Path) -> None:
    def strip(k: int, ds: Dataset) -> None:
        del ds.ImagePositionPatient
        del ds.SliceLocation

    error = reason_of(write_series(series_dir, SeriesSpec(), mutate=strip))
    assert error.reason is SeriesReason.MISSING_POSITIONS


def test_orientation_from_other_slices_and_assumed_axial(tmp_path: Path) -> None:
    spec = SeriesSpec()
    reference = load(write_series(tmp_path / "ref", spec))

    def some(k: int, ds: Dataset) -> None:
        if k in (2, 9):
            del ds.ImageOrientationPatient

    volume = load(write_series(tmp_path / "some", spec, mutate=some))
    assert volume.warnings == [QcWarning.ORIENTATION_FROM_OTHER_SLICES]
    np.testing.assert_array_equal(volume.hu, reference.hu)

    def every(k: int, ds: Dataset) -> None:
        del ds.ImageOrientationPatient

    volume = load(write_series(tmp_path / "all", spec, mutate=every))
    assert volume.warnings == [QcWarning.ORIENTATION_ASSUMED_AXIAL]
    np.testing.assert_array_equal(volume.hu, reference.hu)


def test_pixel_spacing_recovered_or_missing(tmp_path: Path) -> None:
    spec = SeriesSpec(rows=40, cols=40, pixel_spacing=(0.7, 0.7))

    def from_diameter(k: int, ds: Dataset) -> None:
        del ds.PixelSpacing
        ds.ReconstructionDiameter = 28.0

    volume = load(write_series(tmp_path / "a", spec, mutate=from_diameter))
    assert volume.warnings == [QcWarning.PIXEL_SPACING_RECOVERED]
    assert volume.spacing[1:] == pytest.approx((0.7, 0.7))

    def nothing(k: int, ds: Dataset) -> None:
        del ds.PixelSpacing

    assert reason_of(write_series(tmp_path / "b", spec, mutate=nothing)).reason is \
        SeriesReason.MISSING_PIXEL_SPACING


def test_localizer_is_dropped(series_dir: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(series_dir, spec)
    scout = write_localizer(series_dir, spec)
    volume = load([scout, *paths])
    assert volume.warnings == [QcWarning.LOCALIZER_DROPPED]
    assert volume.shape[0] == spec.n_slices
    assert_matches_phantom(volume, spec)


def test_only_a_localizer(series_dir: Path) -> None:
    scout = write_localizer(series_dir, SeriesSpec())
    assert reason_of([scout]).reason is SeriesReason.TOO_FEW_SLICES


def test_unreadable_and_non_ct_files_are_skipped(series_dir: Path) -> None:
    spec = SeriesSpec()
    paths = write_series(series_dir, spec)
    junk = series_dir / "junk.dcm"
    junk.write_bytes(b"this is not DICOM at all" * 10)
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-Ray Radiation Dose SR
    sr.SOPInstanceUID = generate_uid()
    sr.SeriesInstanceUID = spec.series_uid
    sr.StudyInstanceUID = spec.study_uid
    sr.Modality = "SR"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr_path = series_dir / "dose.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    volume = load([junk, sr_path, *paths])
    assert volume.warnings == [QcWarning.UNREADABLE_FILES_SKIPPED,
                               QcWarning.UNSUPPORTED_INSTANCES_SKIPPED]
    assert_matches_phantom(volume, spec)
    assert reason_of([junk]).reason is SeriesReason.NO_READABLE_IMAGES
    assert reason_of([sr_path]).reason is SeriesReason.NOT_CT
    assert reason_of([]).reason is SeriesReason.NO_READABLE_IMAGES


# --------------------------------------------------------------------------- bad pixels


def test_corrupt_compressed_pixels(series_dir: Path) -> None:
    spec = SeriesSpec(transfer_syntax=JPEG2000Lossless)
    paths = write_series(series_dir, spec)
    ds = pydicom.dcmread(paths[5])
    from pydicom.encaps import encapsulate, generate_fragmented_frames

    frame = b"".join(next(generate_fragmented_frames(ds.PixelData)))
    ds.PixelData = encapsulate([frame[:40] + b"\x00" * (len(frame) - 40)])
    ds.save_as(paths[5], enforce_file_format=True)
    error = reason_of(paths)
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA
    assert ds.SOPInstanceUID in error.detail


def test_truncated_native_pixels(series_dir: Path) -> None:
    spec = SeriesSpec()

    def truncate(k: int, ds: Dataset) -> None:
        if k == 8:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    error = reason_of(write_series(series_dir, spec, mutate=truncate))
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA


def test_colour_pixels_are_unsupported(series_dir: Path) -> None:
    spec = SeriesSpec(n_slices=6)

    def colour(k: int, ds: Dataset) -> None:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = np.zeros((spec.rows, spec.cols, 3), np.uint8).tobytes()

    assert reason_of(write_series(series_dir, spec, mutate=colour)).reason is \
        SeriesReason.UNSUPPORTED_PIXEL_FORMAT


# --------------------------------------------------------------------------- Enhanced CT


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless],
                         ids=["native", "j2k", "rle"])
def test_enhanced_ct_multiframe(series_dir: Path, transfer_syntax: UID) -> None:
    spec = SeriesSpec(transfer_syntax=transfer_syntax, intercept=[-1024.0, -1000.0] * 12)
    order = [int(i) for i in np.random.default_rng(1).permutation(spec.n_slices)]
    path = write_enhanced_ct(series_dir, spec, frame_order=order, per_frame_rescale=True)
    volume = load([path])
    assert_matches_phantom(volume, spec)
    sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    assert volume.sop_instance_uids == [sop] * spec.n_slices
    # Frame f (1-based) of the file holds stack slice order[f - 1].
    assert volume.frame_numbers == [order.index(k) + 1 for k in range(spec.n_slices)]
    assert len(volume.headers) == 1
    assert "PerFrameFunctionalGroupsSequence" in volume.headers[0]
    assert "PixelData" not in volume.headers[0]
    assert volume.acquired_at == datetime(2024, 3, 15, 10, 15, tzinfo=UTC)


# --------------------------------------------------------------------------- acquisition time


@pytest.mark.parametrize(
    "edit,expected",
    [
        (lambda ds: None, datetime(2024, 3, 15, 10, 15, tzinfo=UTC)),
        (lambda ds: setattr(ds, "TimezoneOffsetFromUTC", "+0100"),
         datetime(2024, 3, 15, 9, 15, tzinfo=UTC)),
        (lambda ds: setattr(ds, "AcquisitionDateTime", "20240315101530.5-0500"),
         datetime(2024, 3, 15, 15, 15, 30, 500000, tzinfo=UTC)),
        (lambda ds: (delattr(ds, "AcquisitionDate"), delattr(ds, "AcquisitionTime"),
                     setattr(ds, "ContentDate", "20240315"), setattr(ds, "ContentTime", "1017")),
         datetime(2024, 3, 15, 10, 17, tzinfo=UTC)),
        (lambda ds: (delattr(ds, "AcquisitionDate"), delattr(ds, "AcquisitionTime")),
         datetime(2024, 3, 15, 10, 10, tzinfo=UTC)),  # Series Date/Time
        (lambda ds: [delattr(ds, k) for k in ("AcquisitionDate", "AcquisitionTime", "SeriesDate",
                                              "SeriesTime", "StudyDate", "StudyTime")], None),
    ],
    ids=["acquisition", "tz-offset", "datetime-with-offset", "content", "series", "none"],
)
def test_acquired_at(series_dir: Path, edit, expected: datetime | None) -> None:  # type: ignore[no-untyped-def]
    def mutate(k: int, ds: Dataset) -> None:
        edit(ds)

    volume = load(write_series(series_dir, SeriesSpec(n_slices=6), mutate=mutate))
    assert volume.acquired_at == expected
    if expected is not None:
        assert volume.acquired_at is not None and volume.acquired_at.tzinfo is not None


def test_acquired_at_takes_earliest_slice_and_site_timezone(series_dir: Path) -> None:
    def stagger(k: int, ds: Dataset) -> None:
        ds.AcquisitionTime = f"1015{10 + k:02d}"

    paths = write_series(series_dir, SeriesSpec(n_slices=6), mutate=stagger)
    site = timezone(timedelta(hours=2))
    volume = load(paths, default_timezone=site)
    assert volume.acquired_at == datetime(2024, 3, 15, 8, 15, 10, tzinfo=UTC)


def test_load_series_uses_settings(series_dir: Path, settings_factory) -> None:  # type: ignore[no-untyped-def]
    paths = write_series(series_dir, SeriesSpec(n_slices=25))
    settings = settings_factory(dicom_timezone="Europe/Paris", min_slices=20)
    volume = load_series(paths, settings)
    assert volume.acquired_at == datetime(2024, 3, 15, 9, 15, tzinfo=UTC)  # CET = UTC+1
    with pytest.raises(VolumeError) as info:
        load_series(paths[:19], settings_factory(min_slices=20))
    assert info.value.reason is SeriesReason.TOO_FEW_SLICES


# --------------------------------------------------------------------------- headers kept


def test_large_private_elements_are_not_kept(series_dir: Path) -> None:
    def blob(k: int, ds: Dataset) -> None:
        block = ds.private_block(0x0029, "TEST BLOB", create=True)
        block.add_new(0x10, "OB", b"\x01" * (DEFER_SIZE + 2))
        block.add_new(0x11, "LO", "small private value")

    volume = load(write_series(series_dir, SeriesSpec(n_slices=6), mutate=blob))
    header = volume.headers[0]
    assert (0x0029, 0x1010) not in header
    assert header[0x0029, 0x1011].value == "small private value"


def test_volume_error_pickles() -> None:
    error = VolumeError(SeriesReason.MISSING_SLICES, "gap")
    again = pickle.loads(pickle.dumps(error))
    assert again.reason is SeriesReason.MISSING_SLICES and again.detail == "gap"
    assert str(again) == "MISSING_SLICES: gap"


def test_site_timezone_setting_is_validated(settings_factory) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    from service.imaging.volume import site_timezone

    assert site_timezone("UTC") is UTC
    assert site_timezone("Europe/Paris").utcoffset(datetime(2024, 7, 1)) == timedelta(hours=2)
    with pytest.raises(ValidationError):
        settings_factory(dicom_timezone="Mars/Olympus_Mons")


# --------------------------------------------------------------------------- hostile sizes


def test_huge_declared_matrix_refused_before_allocating(series_dir: Path) -> None:
    """Fuzzing (tests/fuzz): Rows = Columns = 65535 on tiny files made the loader allocate
    slices x 65535 x 65535 (MemoryError or gigabytes) before the first decode failed."""
    import tracemalloc

    def huge(k: int, ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535

    paths = write_series(series_dir, SeriesSpec(), mutate=huge)
    tracemalloc.start()
    try:
        error = reason_of(paths)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error.reason is SeriesReason.VOLUME_TOO_LARGE
    assert "65535x65535" in error.detail and peak < 32 << 20


def test_voxel_limit_comes_from_the_settings(series_dir: Path, tmp_path: Path) -> None:
    from service.config import Settings

    spec = SeriesSpec()
    paths = write_series(series_dir, spec)
    limit = spec.n_slices * spec.rows * spec.cols
    assert load_series(paths, Settings(data_dir=tmp_path, min_slices=2,
                                       max_volume_voxels=limit)).shape[0] == spec.n_slices
    with pytest.raises(VolumeError) as info:
        load_series(paths, Settings(data_dir=tmp_path, min_slices=2,
                                    max_volume_voxels=limit - 1))
    assert info.value.reason is SeriesReason.VOLUME_TOO_LARGE


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless])
def test_frame_declaring_a_huge_image_refused_before_decoding(series_dir: Path,
                                                               syntax: UID) -> None:
    """Fuzzing (tests/fuzz): a 500-byte JPEG 2000 frame whose SIZ declares 60000 x 60000 made
    OpenJPEG allocate 7 GB and spend 24 s before failing; JPEG-LS likewise through its SOF.
    The frame's own header is now checked against Rows x Columns first."""
    import resource
    import struct
    import time

    from pydicom.encaps import encapsulate, generate_frames

    paths = write_series(series_dir, SeriesSpec(transfer_syntax=syntax))
    ds = pydicom.dcmread(paths[5])
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    if syntax == JPEG2000Lossless:
        at = bytes(frame).find(b"\xff\x4f\xff\x51")
        struct.pack_into(">LLLLLL", frame, at + 8, 60000, 60000, 0, 0, 60000, 60000)
    else:
        at = bytes(frame).find(b"\xff\xf7")
        struct.pack_into(">HH", frame, at + 5, 60000, 60000)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(paths[5], enforce_file_format=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    error = reason_of(paths)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA
    assert "declares 60000x60000" in error.detail
    assert grown_mb < 200 and time.perf_counter() - started < 5


def test_multiframe_frame_declaring_a_huge_image_refused(series_dir: Path) -> None:
    """The frame-header check covers every frame of an Enhanced CT, with an offset table."""
    import struct

    from pydicom.encaps import encapsulate, generate_frames

    spec = SeriesSpec(transfer_syntax=JPEG2000Lossless)
    path = write_enhanced_ct(series_dir, spec)
    ds = pydicom.dcmread(path)
    frames = [bytearray(f) for f in generate_frames(ds.PixelData,
                                                    number_of_frames=spec.n_slices)]
    at = bytes(frames[7]).find(b"\xff\x4f\xff\x51")
    struct.pack_into(">LL", frames[7], at + 8, 40000, 40000)
    ds.PixelData = encapsulate([bytes(f) for f in frames], has_bot=True)
    ds.save_as(path, enforce_file_format=True)
    error = reason_of([path])
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA
    assert "frame 8 declares 40000x40000" in error.detail


def test_rle_decoder_panic_is_undecodable(series_dir: Path) -> None:
    """Fuzzing (tests/fuzz): one flipped bit in an RLE segment made pylibjpeg-rle panic with
    pyo3's PanicException, a BaseException, which escaped the loader and the worker's
    ``except Exception``. The case is the fuzz harness's, as it found it."""
    from harness.fuzz import SeriesCase, write_series_case

    case = SeriesCase("frame_corrupt", RLELossless, (0,), (("flips", ((0.945, 1),)),))
    error = reason_of(write_series_case(case, series_dir), min_slices=2)
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA
    assert "PanicException" in error.detail


def test_negative_rows_from_a_wrong_vr_is_unsupported(series_dir: Path) -> None:
    """Fuzzing (bench.fuzz): Rows written as LO "-1" reached np.empty (ValueError)."""
    def negative(k: int, ds: Dataset) -> None:
        del ds.Rows
        ds.add_new(0x00280010, "LO", "-1")

    error = reason_of(write_series(series_dir, SeriesSpec(), mutate=negative))
    assert error.reason is SeriesReason.UNSUPPORTED_PIXEL_FORMAT
    assert "-1x40" in error.detail


def test_truncated_jpeg_ls_frame_refused_before_decoding(series_dir: Path) -> None:
    """Fuzzing (bench.fuzz): CharLS spent seconds (6 s for a 32 x 40 frame cut short, 7 s for
    a 512 x 512 one) on a JPEG-LS frame without its end marker before failing."""
    import time

    from pydicom.encaps import encapsulate, generate_frames

    paths = write_series(series_dir, SeriesSpec(transfer_syntax=JPEGLSLossless))
    ds = pydicom.dcmread(paths[4])
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:len(frame) * 4 // 5]])
    ds.save_as(paths[4], enforce_file_format=True)
    started = time.perf_counter()
    error = reason_of(paths)
    assert error.reason is SeriesReason.UNDECODABLE_PIXEL_DATA
    assert "without its end marker" in error.detail
    assert time.perf_counter() - started < 2
