"""load_volume on the synthetic phantom writer's series: every WriterOptions quirk.

The phantom knows its own HU volume and geometry, so a correct load is checked voxel for
voxel (exactly, except after gantry-tilt resampling, where two interpolations meet).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from service.imaging.qc import QcWarning, VolumeError
from service.imaging.volume import Volume, load_volume
from service.outcomes import SeriesReason

synthetic = pytest.importorskip("service.synthetic", reason="service.synthetic not available")

MIN_SLICES = 20


@pytest.fixture(scope="module")
def phantom():  # type: ignore[no-untyped-def]
    options = synthetic.PhantomOptions(seed=11, n_slices=48, matrix=96, pixel_spacing=1.6,
                                       slice_spacing=2.5, noise_scale=0.0, shoulders=False)
    return synthetic.generate_phantom(options)


def _write(phantom, directory: Path, **options: object) -> list[Path]:  # type: ignore[no-untyped-def]
    paths: list[Path] = synthetic.write_series(phantom, directory,
                                               synthetic.WriterOptions(**options))
    return paths


def _assert_is_phantom(volume: Volume, phantom) -> None:  # type: ignore[no-untyped-def]
    assert volume.shape == phantom.hu.shape
    np.testing.assert_allclose(volume.affine, phantom.affine, atol=1e-4)
    np.testing.assert_array_equal(volume.hu, phantom.hu)


@pytest.mark.parametrize("syntax", list(synthetic.TransferSyntax), ids=lambda s: s.value)
def test_every_transfer_syntax(phantom, tmp_path: Path, syntax) -> None:  # type: ignore[no-untyped-def]
    volume = load_volume(_write(phantom, tmp_path, transfer_syntax=syntax),
                         min_slices=MIN_SLICES)
    assert volume.warnings == []
    _assert_is_phantom(volume, phantom)


@pytest.mark.parametrize("order", ["head_first", "feet_first"])
def test_shuffled_signed_and_instance_order(phantom, tmp_path: Path, order: str) -> None:  # type: ignore[no-untyped-def]
    paths = _write(phantom, tmp_path, shuffle=True, signed_pixels=True, instance_order=order)
    _assert_is_phantom(load_volume(paths, min_slices=MIN_SLICES), phantom)


def test_duplicates(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths = _write(phantom, tmp_path, shuffle=True, duplicates=4)
    assert len(paths) == phantom.shape[0] + 4
    volume = load_volume(paths, min_slices=MIN_SLICES)
    assert volume.warnings == [QcWarning.DUPLICATE_SLICES_DROPPED]
    assert len(volume.headers) == phantom.shape[0]
    _assert_is_phantom(volume, phantom)


def test_missing_slices(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VolumeError) as info:
        load_volume(_write(phantom, tmp_path, missing_slices=[20]), min_slices=MIN_SLICES)
    assert info.value.reason is SeriesReason.MISSING_SLICES


def test_missing_ipp(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    volume = load_volume(_write(phantom, tmp_path, missing_ipp=6, shuffle=True),
                         min_slices=MIN_SLICES)
    assert volume.warnings == [QcWarning.POSITIONS_FROM_SLICE_LOCATION]
    _assert_is_phantom(volume, phantom)


@pytest.mark.parametrize("kind", ["ENHANCED", "LEGACY_CONVERTED"])
@pytest.mark.parametrize("syntax", ["EXPLICIT_VR_LE", "JPEG_2000_LOSSLESS"])
def test_multiframe(phantom, tmp_path: Path, kind: str, syntax: str) -> None:  # type: ignore[no-untyped-def]
    paths = _write(phantom, tmp_path, multiframe=synthetic.MultiFrame[kind],
                   transfer_syntax=synthetic.TransferSyntax[syntax])
    assert len(paths) == 1
    volume = load_volume(paths, min_slices=MIN_SLICES)
    _assert_is_phantom(volume, phantom)
    assert len(volume.headers) == 1
    assert sorted(n for n in volume.frame_numbers if n is not None) == \
        list(range(1, phantom.shape[0] + 1))


@pytest.mark.parametrize("tilt", [12.0, 25.0])
def test_gantry_tilt_resampled(phantom, tmp_path: Path, tilt: float) -> None:  # type: ignore[no-untyped-def]
    volume = load_volume(_write(phantom, tmp_path, gantry_tilt_deg=tilt), min_slices=MIN_SLICES)
    assert volume.warnings == [QcWarning.GANTRY_TILT_RESAMPLED]
    assert volume.gantry_tilt_deg == pytest.approx(tilt, abs=0.05)
    np.testing.assert_allclose(volume.normal, [0, 0, 1], atol=1e-9)
    # Compare with the untilted phantom at the same LPS points, where the tilted stack
    # covered them (the writer resampled the phantom onto tilted planes: two interpolations).
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij"), -1)
    points = volume.index_to_lps(grid.astype(float))
    index = np.linalg.solve(phantom.affine[:3, :3],
                            (points - phantom.affine[:3, 3]).reshape(-1, 3).T).T
    reference = ndimage.map_coordinates(phantom.hu.astype(np.float32), index.T, order=1,
                                        cval=np.nan).reshape(volume.shape)
    t = np.radians(tilt)
    dz, dy, _ = phantom.spacing
    row = (points[..., 1] - phantom.origin[1]) / (dy * np.cos(t))
    plane = (points[..., 2] - phantom.origin[2] - row * dy * np.sin(t)) / dz
    covered = (np.isfinite(reference) & (plane >= 1) & (plane <= volume.shape[0] - 2)
               & (row >= 1) & (row <= volume.shape[1] - 2))
    assert covered.mean() > 0.4
    got, want = volume.hu[covered].astype(float), reference[covered]
    assert np.median(np.abs(got - want)) < 5
    assert np.corrcoef(got, want)[0, 1] > 0.98  # ignoring the tilt gives ~0.54


def test_gantry_tilt_beyond_limit(phantom, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    paths = _write(phantom, tmp_path, gantry_tilt_deg=25.0)
    with pytest.raises(VolumeError) as info:
        load_volume(paths, min_slices=MIN_SLICES, max_gantry_tilt_deg=20.0)
    assert info.value.reason is SeriesReason.GANTRY_TILT


def test_study_extra_series(phantom, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.ERROR)
    written = synthetic.write_study(phantom, tmp_path, synthetic.WriterOptions(
        localizer=True, non_ct_series=True))
    by_role = {series.role: series for series in written}
    _assert_is_phantom(load_volume(by_role["ct"].paths, min_slices=MIN_SLICES), phantom)
    with pytest.raises(VolumeError) as info:
        load_volume(by_role["localizer"].paths, min_slices=MIN_SLICES)
    assert info.value.reason is SeriesReason.TOO_FEW_SLICES
    with pytest.raises(VolumeError) as info:
        load_volume(by_role["non_ct"].paths, min_slices=MIN_SLICES)
    assert info.value.reason is SeriesReason.NOT_CT
    # The writer's scout is its own series: handing both over together is a caller error.
    with pytest.raises(VolumeError) as info:
        load_volume(by_role["ct"].paths + by_role["localizer"].paths, min_slices=MIN_SLICES)
    assert info.value.reason is SeriesReason.MIXED_SERIES
