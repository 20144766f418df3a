"""The phantom's voxels agree with its ground truth, and its HU with real CT."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from service.synthetic import (
    FRACTURE_LEVELS,
    LABEL_OF,
    VERTEBRA_NAMES,
    FractureSpec,
    FractureType,
    MimicSpec,
    MimicType,
    PhantomOptions,
    generate_phantom,
    random_options,
)
from service.synthetic.calibration import HU, NOISE
from tests.unit.synthetic.conftest import SMALL, small_phantom


def test_same_options_give_the_same_phantom() -> None:
    opts = PhantomOptions(seed=5, matrix=96, pixel_spacing=0.8, n_slices=24, fractures=1,
                          mimics=1)
    a, b = generate_phantom(opts), generate_phantom(opts)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.labels, b.labels)
    assert a.fractures == b.fractures and a.mimics == b.mimics
    c = generate_phantom(PhantomOptions(seed=6, matrix=96, pixel_spacing=0.8, n_slices=24))
    assert not np.array_equal(a.hu, c.hu)


def test_geometry_dtypes_and_labels() -> None:
    p = small_phantom()
    assert p.hu.dtype == np.int16 and p.labels.dtype == np.uint8
    assert p.shape == (SMALL.n_slices, SMALL.matrix, SMALL.matrix)
    assert p.spacing == (SMALL.slice_spacing, SMALL.pixel_spacing, SMALL.pixel_spacing)
    assert set(np.unique(p.labels).tolist()) <= set(range(0, 11))
    assert {"C3", "C4", "C5"} <= set(p.vertebrae_in_view())
    # The affine maps voxel (z, y, x) to LPS (x, y, z), z ascending towards the head.
    corner = p.affine @ np.array([2, 3, 4, 1.0])
    assert np.allclose(corner[:3], (p.origin[0] + 4 * p.spacing[2],
                                    p.origin[1] + 3 * p.spacing[1],
                                    p.origin[2] + 2 * p.spacing[0]))
    assert p.slice_position(5)[2] == pytest.approx(p.origin[2] + 5 * p.spacing[0])
    # Vertebrae are stacked head up: C3 above C4 above C5 (higher z index).
    mean_z = {v: np.nonzero(p.labels == LABEL_OF[v])[0].mean() for v in ("C3", "C4", "C5")}
    assert mean_z["C3"] > mean_z["C4"] > mean_z["C5"]


def test_tissue_hu_match_the_calibration() -> None:
    p = small_phantom(noise_scale=0.0)
    hu = p.hu.astype(np.float32)
    assert np.percentile(hu, 0.2) == pytest.approx(HU.air, abs=30)  # the airway
    wide = small_phantom(noise_scale=0.0, matrix=128, pixel_spacing=1.6)  # whole neck
    whu = wide.hu.astype(np.float32)
    soft = whu[(wide.labels == 0) & (whu > -300) & (whu < 200)]
    hist, edges = np.histogram(soft, bins=np.arange(-300, 205, 5))
    fat_peak = edges[:-1][(edges[:-1] > -200) & (edges[:-1] < -40)][
        np.argmax(hist[(edges[:-1] > -200) & (edges[:-1] < -40)])]
    soft_peak = edges[:-1][np.argmax(hist)]
    assert abs(fat_peak + 2.5 - HU.fat) < 20, fat_peak
    assert abs(soft_peak + 2.5 - HU.muscle) < 20, soft_peak
    assert (np.abs(soft - HU.fat) < 20).mean() > 0.05  # a real subcutaneous fat layer
    body = p.labels == LABEL_OF["C4"]
    core = body & ~binary_dilation(~body, iterations=4)
    assert 150 <= np.median(hu[core]) <= 400
    assert 700 <= np.percentile(hu[body], 95) <= 1800


def test_noise_matches_the_kernel_calibration() -> None:
    noisy, clean = small_phantom(), small_phantom(noise_scale=0.0)
    diff = noisy.hu.astype(np.float32) - clean.hu
    inside = (clean.hu > -200) & (clean.hu < 200)
    top = diff[-10:][inside[-10:]]  # upper slices: no shoulder noise gain
    expected = NOISE.sigma("BONE", SMALL.pixel_spacing, SMALL.slice_spacing)
    assert np.std(top) == pytest.approx(expected, rel=0.25)


def test_fracture_plane_lowers_hu_through_the_cortex() -> None:
    spec = FractureSpec(FractureType.BODY, "C4", displacement_mm=0.0)
    normal = small_phantom(noise_scale=0.0)
    fractured = small_phantom(noise_scale=0.0, fractures=[spec])
    assert [f.vertebra for f in fractured.fractures] == ["C4"]
    assert fractured.vertebra_fractured["C4"] and fractured.patient_fractured
    assert not normal.patient_fractured
    z0, y0, x0, z1, y1, x1 = fractured.fractures[0].bbox
    before = normal.hu[z0:z1, y0:y1, x0:x1].astype(np.float32)
    after = fractured.hu[z0:z1, y0:y1, x0:x1].astype(np.float32)
    broken_cortex = (before > 700) & (after < before - 400)
    assert broken_cortex.sum() >= 5
    # An acute fracture has raw edges: nothing becomes denser (no sclerosis, no cortex).
    assert (after - before).max() < 50
    # Outside the box (plus one voxel of partial volume) the two phantoms are identical.
    outside = np.ones(normal.shape, dtype=bool)
    outside[max(z0 - 1, 0):z1 + 1, max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = False
    assert np.array_equal(normal.hu[outside], fractured.hu[outside])
    # The gap stays inside the vertebra's label (annotators outline the whole bone).
    assert np.array_equal(normal.labels, fractured.labels)


def test_compression_fracture_lowers_anterior_body_height() -> None:
    normal = small_phantom(noise_scale=0.0)
    crushed = small_phantom(noise_scale=0.0,
                            fractures=[FractureSpec(FractureType.COMPRESSION, "C4")])
    assert crushed.fractures[0].type == FractureType.COMPRESSION

    def anterior_height(p: object) -> float:
        zz, yy, xx = np.nonzero(p.labels == LABEL_OF["C4"])  # type: ignore[attr-defined]
        strip = (yy <= yy.min() + round(3.0 / SMALL.pixel_spacing)) & \
            (np.abs(xx - np.median(xx)) <= round(3.0 / SMALL.pixel_spacing))
        return float(zz[strip].max() - zz[strip].min() + 1) * SMALL.slice_spacing

    assert anterior_height(crushed) < 0.9 * anterior_height(normal)


@pytest.mark.parametrize("mimic, level, z_offset", [
    (MimicType.BASIVERTEBRAL_CHANNEL, "C4", 0.0),
    (MimicType.NUTRIENT_FORAMEN, "C5", 0.0),
    (MimicType.C1_ARCH_CLEFT, "C1", 40.0),
    (MimicType.OS_ODONTOIDEUM, "C2", 40.0),
])
def test_mimic_is_lucent_with_a_sclerotic_margin(mimic: MimicType, level: str,
                                                  z_offset: float) -> None:
    normal = small_phantom(noise_scale=0.0, z_offset_mm=z_offset)
    mimicked = small_phantom(noise_scale=0.0, z_offset_mm=z_offset,
                             mimics=[MimicSpec(mimic, level)])
    assert not mimicked.patient_fractured and mimicked.fractures == []
    (truth,) = mimicked.mimics
    assert truth.type == mimic and truth.vertebra == level
    z0, y0, x0, z1, y1, x1 = truth.bbox
    diff = (mimicked.hu.astype(np.float32) - normal.hu)[z0:z1, y0:y1, x0:x1]
    lucent = diff < -250
    sclerotic = diff > 150
    assert lucent.sum() >= 3 and sclerotic.sum() >= 3
    # The dense rim borders the lucency: a corticated margin, unlike a fracture line.
    near = binary_dilation(lucent, iterations=3)
    assert (sclerotic & near).sum() >= 3


def test_streak_mimic_is_a_straight_line_beyond_the_bone() -> None:
    normal = small_phantom(noise_scale=0.0, z_offset_mm=-25.0)
    streaked = small_phantom(noise_scale=0.0, z_offset_mm=-25.0,
                             mimics=[MimicSpec(MimicType.SHOULDER_STREAK, "C6")])
    (truth,) = streaked.mimics
    z0, z1 = truth.bbox[0], truth.bbox[3]
    diff = streaked.hu[z0:z1].astype(np.float32) - normal.hu[z0:z1]
    in_bone = diff[normal.labels[z0:z1] == LABEL_OF["C6"]]
    in_soft = diff[(normal.labels[z0:z1] == 0) & (normal.hu[z0:z1] > -300)]
    assert in_bone.min() < -150 and in_soft.min() < -150
    assert not streaked.patient_fractured


def test_fractures_sit_where_requested_and_truth_is_consistent() -> None:
    p = generate_phantom(PhantomOptions(seed=21, matrix=128, pixel_spacing=0.9, n_slices=None,
                                        slice_spacing=1.25, fractures=4, mimics=3))
    assert p.fractures
    for f in p.fractures:
        assert f.vertebra in FRACTURE_LEVELS[f.type]
        z0, y0, x0, z1, y1, x1 = f.bbox
        assert 0 <= z0 < z1 <= p.shape[0] and 0 <= y0 < y1 <= p.shape[1]
        assert 0 <= x0 < x1 <= p.shape[2]
        assert (p.labels[z0:z1, y0:y1, x0:x1] == LABEL_OF[f.vertebra]).any()
        for z, sy0, sx0, sy1, sx1 in f.slice_boxes:
            assert z0 <= z < z1 and y0 <= sy0 < sy1 <= y1 and x0 <= sx0 < sx1 <= x1
    assert p.vertebra_fractured == {v: any(f.vertebra == v for f in p.fractures)
                                    for v in VERTEBRA_NAMES}
    assert set(p.vertebrae_in_view()) == set(VERTEBRA_NAMES)


def test_fracture_outside_the_volume_is_not_in_the_truth() -> None:
    p = small_phantom(fractures=[FractureSpec(FractureType.C1_RING, "C1")])
    assert "C1" not in p.vertebrae_in_view()
    assert p.fractures == [] and not p.patient_fractured


def test_impossible_placement_is_refused() -> None:
    with pytest.raises(ValueError):
        generate_phantom(PhantomOptions(seed=1, matrix=64, pixel_spacing=1.5, n_slices=8,
                                        fractures=[FractureSpec(FractureType.DENS_TYPE_II,
                                                                "C5")]))


def test_random_options_follow_the_fracture_rate() -> None:
    cases = [random_options(s, fracture_rate=0.5) for s in range(400)]
    rate = np.mean([c.fractures != 0 for c in cases])
    assert 0.4 < rate < 0.6
    assert all(0.25 <= c.pixel_spacing <= 0.8 and 0.5 <= c.slice_spacing <= 3.0 for c in cases)
    small = random_options(3, matrix=256)
    assert small.matrix == 256
    assert small.pixel_spacing == pytest.approx(2 * random_options(3).pixel_spacing)
    assert random_options(7, fracture_rate=0.0).fractures == 0


def test_metal_hardware_is_bright_and_streaky() -> None:
    p = small_phantom(metal=True, noise_scale=0.0, z_offset_mm=-15.0)
    assert p.metal
    assert (p.hu >= 3000).sum() > 50
    # Streaks: slices with metal deviate from the metal-free phantom far from the plate.
    normal = small_phantom(noise_scale=0.0, z_offset_mm=-15.0)
    k = int(np.argmax((p.hu >= 3000).sum(axis=(1, 2))))
    diff = np.abs(p.hu[k].astype(np.float32) - normal.hu[k])
    assert (diff > 100).sum() > 200


def test_real_ct_calibration_figures(real_ct_dir) -> None:  # type: ignore[no-untyped-def]
    from service.synthetic.calibration import measure

    real = measure(real_ct_dir)
    assert real["fat_mode"] == pytest.approx(HU.fat, abs=25)
    assert -20 < real["soft_mode"] < HU.muscle + 10
    assert 150 < real["cancellous_p50"] < 400
    assert 700 < real["cortex_p90"] < 1800


@pytest.mark.slow
def test_full_size_phantom() -> None:
    p = generate_phantom(PhantomOptions(seed=2024, fractures=2, mimics=2))
    assert p.shape == (300, 512, 512)
    assert set(p.vertebrae_in_view()) == set(VERTEBRA_NAMES)
    assert len(p.fractures) == 2 and p.patient_fractured
    assert p.timings["total"] > 0


@pytest.mark.parametrize("level", ["C2", "C5"])
def test_facet_degeneration_places_at_every_allowed_level(level: str) -> None:
    """C2 has its own facet-joint landmark (C2-C3 joint); without it this mimic crashed
    the generator on C2 ("high <= 0") and stopped long training-data runs."""
    mimicked = small_phantom(noise_scale=0.0, z_offset_mm=20.0 if level == "C2" else 0.0,
                             mimics=[MimicSpec(MimicType.FACET_DEGENERATION, level)])
    (truth,) = mimicked.mimics
    assert truth.type == MimicType.FACET_DEGENERATION and truth.vertebra == level
    assert not mimicked.patient_fractured
