"""The real scanner series (Picker PQ2000 head-and-neck, 90 slices): loads with sane HU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.imaging.preprocess import DEFAULT_WINDOWS, multi_window
from service.imaging.volume import Volume, load_volume


@pytest.fixture(scope="module")
def real_volume(real_ct_dir: Path) -> Volume:
    return load_volume(sorted(real_ct_dir.glob("*.dcm")))


def test_geometry(real_volume: Volume) -> None:
    assert real_volume.shape == (90, 511, 511)
    assert real_volume.spacing == pytest.approx((3.0, 1.0, 1.0))
    assert real_volume.hu.dtype == np.int16
    assert real_volume.warnings == []
    assert not real_volume.resampled
    np.testing.assert_allclose(real_volume.normal, [0, 0, 1])
    assert len(real_volume.headers) == 90
    assert len(set(real_volume.sop_instance_uids)) == 90
    assert all("PixelData" not in h for h in real_volume.headers)
    # Only Study Date/Time in these headers: the last fallback.
    assert real_volume.acquired_at is not None and real_volume.acquired_at.tzinfo is not None


def test_hounsfield_ranges(real_volume: Volume) -> None:
    hu = real_volume.hu
    assert hu.min() >= -1024
    # Air: the corners of every slice, outside the patient.
    assert np.median(hu[:, :30, :30]) < -950
    # Soft tissue: the middle of the neck in a lower slice lies in the -100..100 HU band
    # (muscle, fat-free tissue ~40); the mode of that band is near 40.
    neck = hu[15, 200:330, 180:330]
    soft = neck[(neck > -100) & (neck < 100)]
    assert soft.size > 0.3 * neck.size
    assert 0 < np.median(soft) < 80
    # Bone: vertebrae and skull, well above 300 HU.
    assert np.percentile(hu, 99.5) > 300
    assert hu.max() > 1000


def test_shuffled_arrival_gives_the_same_volume(real_ct_dir: Path, real_volume: Volume) -> None:
    paths = sorted(real_ct_dir.glob("*.dcm"))
    shuffled = [paths[i] for i in np.random.default_rng(5).permutation(len(paths))]
    again = load_volume(shuffled[::-1])
    np.testing.assert_array_equal(again.hu, real_volume.hu)
    assert again.sop_instance_uids == real_volume.sop_instance_uids


def test_windows_on_real_data(real_volume: Volume) -> None:
    channels = multi_window(real_volume.hu[40:42])
    assert channels.shape == (len(DEFAULT_WINDOWS), 2, 511, 511)
    assert channels.min() >= 0.0 and channels.max() <= 1.0
