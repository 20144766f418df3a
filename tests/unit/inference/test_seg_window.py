"""Segmentation helpers: the second pass around the spine (``seg_field_of_view_mm``) and the
level-order plausibility check."""

from __future__ import annotations

import numpy as np
import pytest

from models.config import default_preprocessing
from service.inference.pipeline import segmentation_labels, spine_window


class RecordingNet:
    """Labels every voxel at or above 0.5 in channel 0 as C3; records each input's shape."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.shapes.append(x.shape)
        probabilities = np.zeros((1, 9, *x.shape[2:]), np.float32)
        bone = x[0, 0] >= 0.5
        probabilities[0, 3][bone] = 1.0
        probabilities[0, 0][~bone] = 1.0
        return probabilities


def _image(shape: tuple[int, int, int], spine_yx: tuple[int, int]) -> np.ndarray:
    image = np.zeros((3, *shape), np.float32)
    y, x = spine_yx
    image[0, :, y - 3:y + 3, x - 3:x + 3] = 1.0
    return image


def test_spine_window_centres_on_the_spine_and_ignores_a_stray_blob() -> None:
    labels = np.zeros((20, 100, 100), np.uint8)
    labels[:, 60:66, 30:36] = 4
    labels[0, 2:6, 90:95] = 1  # a stray blob far from the spine (20 columns vs 36)
    window = spine_window(labels, 40)
    assert window is not None
    # The median column sits in the spine (y 61, x 34); the mean (y 41, x 54) would cut
    # the spine off the window.
    assert window == (slice(41, 81), slice(14, 54))


def test_spine_window_is_clipped_to_the_image_and_skipped_when_narrow() -> None:
    labels = np.zeros((20, 100, 100), np.uint8)
    labels[:, 95:99, 1:4] = 2
    assert spine_window(labels, 40) == (slice(60, 100), slice(0, 40))
    assert spine_window(labels[:, :40, :40], 40) is None
    assert spine_window(np.zeros((20, 100, 100), np.uint8), 40) is None  # nothing found


def test_second_pass_sees_the_square_around_the_spine_only() -> None:
    pre = default_preprocessing()
    assert pre.seg_field_of_view_mm == 180.0  # 72 voxels of 2.5 mm
    net = RecordingNet()
    image = _image((30, 120, 110), (80, 40))
    labels = segmentation_labels(image, net, pre)
    # First pass: the whole (padded) image; second: 72 x 72 voxels around the spine.
    assert net.shapes == [(1, 3, 32, 120, 112), (1, 3, 32, 72, 72)]
    assert labels.shape == (30, 120, 110)
    assert (labels[:, 77:83, 37:43] == 3).all()
    window = np.zeros(labels.shape, bool)
    window[:, 44:116, 4:76] = True  # centre (80, 40) -> rows 44..115, columns 4..75
    assert not labels[~window].any()


def test_one_pass_without_a_field_of_view() -> None:
    pre = default_preprocessing(seg_field_of_view_mm=None)
    net = RecordingNet()
    labels = segmentation_labels(_image((30, 120, 110), (80, 40)), net, pre)
    assert net.shapes == [(1, 3, 32, 120, 112)]
    assert (labels[:, 77:83, 37:43] == 3).all()


def test_field_of_view_must_be_positive() -> None:
    with pytest.raises(ValueError):
        default_preprocessing(seg_field_of_view_mm=0.0)
