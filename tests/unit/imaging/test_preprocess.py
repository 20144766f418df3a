"""preprocess: windows, origin-aligned resampling (and back), cropping."""

from __future__ import annotations

import numpy as np
import pytest

from service.imaging.preprocess import (
    DEFAULT_WINDOWS,
    GROSS_BONE_WINDOW,
    SOFT_TISSUE_WINDOW,
    STANDARD_BONE_WINDOW,
    Window,
    apply_window,
    area_downsample,
    bounding_box,
    crop_box,
    multi_window,
    padding_in_voxels,
    resample_labels,
    resample_to_original,
    resample_to_spacing,
    resampled_affine,
    resampled_shape,
)


def test_window_constants_are_the_published_ones() -> None:
    assert (SOFT_TISSUE_WINDOW.width, SOFT_TISSUE_WINDOW.level) == (300, 80)
    assert (STANDARD_BONE_WINDOW.width, STANDARD_BONE_WINDOW.level) == (1800, 500)
    assert (GROSS_BONE_WINDOW.width, GROSS_BONE_WINDOW.level) == (650, 400)
    assert DEFAULT_WINDOWS == (SOFT_TISSUE_WINDOW, STANDARD_BONE_WINDOW, GROSS_BONE_WINDOW)
    assert SOFT_TISSUE_WINDOW.lower == -70 and SOFT_TISSUE_WINDOW.upper == 230


def test_apply_window_maps_and_clips() -> None:
    hu = np.array([-1024, -70, 80, 230, 3000], dtype=np.int16)
    out = apply_window(hu, SOFT_TISSUE_WINDOW)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    bone = apply_window(np.array([-400.0, 500.0, 1400.0]), STANDARD_BONE_WINDOW)
    np.testing.assert_allclose(bone, [0.0, 0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError):
        apply_window(hu, Window("bad", 0, 0))


def test_multi_window_is_channel_first() -> None:
    hu = np.random.default_rng(0).integers(-1024, 2000, size=(4, 5, 6)).astype(np.int16)
    out = multi_window(hu)
    assert out.shape == (3, 4, 5, 6) and out.dtype == np.float32
    for channel, window in enumerate(DEFAULT_WINDOWS):
        np.testing.assert_array_equal(out[channel], apply_window(hu, window))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_resampled_shape_keeps_centres_inside() -> None:
    assert resampled_shape((10, 20, 30), (2.0, 1.0, 1.0), (1.0, 1.0, 1.0)) == (19, 20, 30)
    assert resampled_shape((10, 20, 30), (1.0, 0.5, 0.5), (2.0, 1.0, 1.0)) == (5, 10, 15)
    assert resampled_shape((90, 511, 511), (3.0, 1.0, 1.0), (1.5, 1.5, 1.5)) == (179, 341, 341)
    with pytest.raises(ValueError):
        resampled_shape((10, 10), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))


def _linear_field(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    zz, yy, xx = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)),
                             indexing="ij")
    return (3.0 * zz - 2.0 * yy + 0.5 * xx).astype(np.float32)


def test_resample_is_origin_aligned_and_exact_for_linear_fields() -> None:
    spacing, target = (2.0, 0.8, 0.7), (1.0, 1.1, 0.5)
    field = _linear_field((12, 20, 16), spacing)
    out = resample_to_spacing(field, spacing, target, order=1)
    assert out.shape == resampled_shape(field.shape, spacing, target)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _linear_field(out.shape, target), atol=1e-3)


def test_resampled_affine_matches_the_grid() -> None:
    affine = np.array([[0, 0, 0.7, -10], [0, 0.8, 0, -20], [2.0, 0, 0, -30], [0, 0, 0, 1.0]])
    new = resampled_affine(affine, (2.0, 0.8, 0.7), (1.0, 1.6, 0.35))
    # Voxel (0,0,0) keeps its place; voxel (2, 1, 2) of the new grid is (1, 2, 1) of the old.
    np.testing.assert_allclose(new[:3, 3], affine[:3, 3])
    np.testing.assert_allclose(new @ [2, 1, 2, 1], affine @ [1, 2, 1, 1])


@pytest.mark.parametrize("order", [1, 3])
def test_resample_back_to_original_grid(order: int) -> None:
    spacing, target = (3.0, 1.0, 1.0), (1.0, 1.5, 1.5)
    zz, yy, xx = np.meshgrid(np.arange(10) * 3.0, np.arange(30), np.arange(30), indexing="ij")
    smooth = (100 * np.sin(zz / 8) + 80 * np.cos(yy / 6) + 40 * np.sin(xx / 7)).astype(np.float32)
    down = resample_to_spacing(smooth, spacing, target, order=order)
    back = resample_to_original(down, target, spacing, smooth.shape, order=order)
    assert back.shape == smooth.shape
    interior = (slice(1, -1), slice(2, -3), slice(2, -3))
    tolerance = 6.0 if order == 1 else 1.5
    assert np.abs(back - smooth)[interior].max() < tolerance


def test_labels_keep_values_and_dtype_and_round_trip() -> None:
    labels = np.zeros((8, 12, 12), dtype=np.uint8)
    labels[2:6, 3:9, 4:10] = 3
    labels[2:6, 3:9, 7:10] = 7
    up = resample_labels(labels, (2.0, 1.0, 1.0), (1.0, 0.5, 0.5))
    assert up.dtype == np.uint8
    assert set(np.unique(up)) == {0, 3, 7}
    back = resample_to_original(up, (1.0, 0.5, 0.5), (2.0, 1.0, 1.0), labels.shape, order=0)
    np.testing.assert_array_equal(back, labels)


def test_identity_resample_copies() -> None:
    array = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    out = resample_to_spacing(array, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.float32


def test_area_downsample_is_the_mean_over_each_output_voxel() -> None:
    rng = np.random.default_rng(3)
    array = rng.normal(size=(3, 64)).astype(np.float32)
    out = area_downsample(array, 1, 4.0, 16)
    # Output 5 is centred on input 20 and spans 18..22: halves of 18 and 22, all of 19..21.
    expected = (0.5 * array[:, 18] + array[:, 19:22].sum(axis=1) + 0.5 * array[:, 22]) / 4
    np.testing.assert_allclose(out[:, 5], expected, rtol=1e-5, atol=1e-5)
    # At the edge the window is clipped to the image, not padded with zeros.
    # Output 0 spans -2..2, clipped to the image edge at -0.5: voxels 0 and 1, half of 2.
    np.testing.assert_allclose(out[:, 0], (array[:, 0] + array[:, 1] + 0.5 * array[:, 2]) / 2.5,
                               atol=1e-5)
    constant = area_downsample(np.full((2, 101), 7.0), 1, 3.3, 31)
    np.testing.assert_allclose(constant, 7.0, atol=1e-4)


def test_antialias_averages_noise_where_point_sampling_keeps_it() -> None:
    """The reason for ``seg_antialias``: a fine grid's noise reaches a coarse one unaveraged."""
    rng = np.random.default_rng(4)
    noise = rng.normal(0.0, 100.0, size=(8, 160, 160)).astype(np.float32)
    spacing, target = (2.5, 0.3125, 0.3125), (2.5, 2.5, 2.5)
    point = resample_to_spacing(noise, spacing, target)
    area = resample_to_spacing(noise, spacing, target, antialias=True)
    assert point.shape == area.shape == resampled_shape(noise.shape, spacing, target)
    assert point.std() > 80.0
    assert area.std() < 20.0  # an 8 x 8 in-plane mean: 100 / 8 plus edge effects
    # A linear ramp survives averaging unchanged away from the edges (no shift of the grid).
    ramp = np.broadcast_to(np.arange(160, dtype=np.float32), (8, 160, 160))
    smooth = resample_to_spacing(ramp, spacing, target, antialias=True)
    np.testing.assert_allclose(smooth[:, 2:-2, 2:-2],
                               np.broadcast_to(np.arange(0, 160, 8.0)[2:-2], (8, 16, 16)),
                               atol=0.05)
    # Labels are never averaged (order 0 ignores it).
    labels = resample_to_spacing(np.ones((8, 160, 160), np.uint8), spacing, target,
                                 order=0, antialias=True)
    assert labels.dtype == np.uint8


def test_bounding_box() -> None:
    mask = np.zeros((6, 7, 8), dtype=bool)
    assert bounding_box(mask) is None
    mask[1:3, 2:5, 4] = True
    assert bounding_box(mask) == (1, 2, 4, 3, 5, 5)


def test_padding_in_voxels_rounds_up() -> None:
    assert padding_in_voxels((5.0, 5.0, 5.0), (2.0, 0.8, 0.5)) == (3, 7, 10)


def test_crop_without_output_shape_is_an_exact_copy_with_fill() -> None:
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    out, crop = crop_box(array, (1, 1, 1, 3, 4, 5), padding=(1, 1, 1), order=0)
    np.testing.assert_array_equal(out, array[0:4, 0:5, 0:6])
    assert out.dtype == np.int16
    out, crop = crop_box(array, (0, 0, 0, 2, 2, 2), padding=(1, 2, 0), fill=-5)
    assert out.shape == (4, 6, 2)
    assert np.all(out[0] == -5) and np.all(out[:, :2] == -5)
    np.testing.assert_array_equal(out[1:3, 2:4, :], array[0:2, 0:2, 0:2])
    assert crop.box == (-1, -2, 0, 3, 4, 2)
    np.testing.assert_allclose(crop.to_source(np.array([1, 2, 0])), [0, 0, 0])


def test_crop_resized_covers_the_padded_box() -> None:
    spacing = (1.0, 1.0, 1.0)
    field = _linear_field((20, 30, 40), spacing)
    out, crop = crop_box(field, (5, 10, 10, 15, 20, 30), padding=(2, 2, 2), output_shape=(7, 7, 12))
    assert out.shape == (7, 7, 12)
    # Every output voxel holds the field at the source index the Crop says it came from.
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in out.shape), indexing="ij"), axis=-1)
    source = crop.to_source(grid.astype(float))
    expected = 3.0 * source[..., 0] - 2.0 * source[..., 1] + 0.5 * source[..., 2]
    np.testing.assert_allclose(out, expected, atol=1e-3)
    # The outer faces of the padded box map to the outer faces of the output.
    assert crop.to_source(np.array([-0.5, -0.5, -0.5])) == pytest.approx([2.5, 7.5, 7.5])
    assert crop.to_source(np.array([6.5, 6.5, 11.5])) == pytest.approx([16.5, 21.5, 31.5])


def test_crop_centred_window_without_scaling() -> None:
    array = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    out, crop = crop_box(array, (4, 4, 4, 6, 6, 6), output_shape=(4, 4, 4), resize=False)
    np.testing.assert_array_equal(out, array[3:7, 3:7, 3:7])
    assert crop.scale == (1.0, 1.0, 1.0)


def test_crop_labels_nearest() -> None:
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[3:7, 3:7, 3:7] = 5
    out, _ = crop_box(labels, (3, 3, 3, 7, 7, 7), padding=(1, 1, 1), output_shape=(12, 12, 12),
                      order=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 5}


def test_crop_rejects_bad_input() -> None:
    array = np.zeros((4, 4, 4))
    with pytest.raises(ValueError):
        crop_box(array, (2, 2, 2, 2, 3, 3))
    with pytest.raises(ValueError):
        crop_box(array[0], (0, 0, 0, 1, 1, 1))
    with pytest.raises(ValueError):
        crop_box(array, (0, 0, 0, 1, 1, 1), padding=(-1, 0, 0))
