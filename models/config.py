"""Default preprocessing of the cspine model family (written into every manifest it ships with).

The values live in a :class:`service.inference.manifest.Preprocessing` object from the start,
so training, export and the runtime pipeline read the very same numbers.
"""

from __future__ import annotations

from service.findings import VERTEBRAE
from service.imaging.preprocess import DEFAULT_WINDOWS, STANDARD_BONE_WINDOW
from service.inference.manifest import Preprocessing, Window

SEG_CLASSES: list[str] = ["background", *VERTEBRAE, "thoracic"]
"""Segmentation output channels; RSNA labels 8..19 (T1..T12) all become "thoracic"."""


def default_preprocessing(*, crop_size: int = 64, crop_slices: int = 16,
                          seg_spacing_mm: float = 2.5,
                          seg_field_of_view_mm: float | None = 180.0,
                          crop_flip_average: bool = True,
                          seg_antialias: bool = True) -> Preprocessing:
    windows = [Window(name=w.name, width=w.width, level=w.level) for w in DEFAULT_WINDOWS]
    return Preprocessing(
        windows=windows,
        seg_spacing_mm=seg_spacing_mm,
        seg_divisor=8,
        seg_field_of_view_mm=seg_field_of_view_mm,
        seg_antialias=seg_antialias,
        seg_classes=SEG_CLASSES,
        min_vertebra_volume_mm3=400.0,
        crop_slices=crop_slices,
        crop_size=crop_size,
        crop_margin=0.15,
        crop_min_extent_mm=40.0,
        crop_z_margin_slices=0,
        crop_subsamples=3,
        crop_neighbour_window=[w.name for w in DEFAULT_WINDOWS].index(STANDARD_BONE_WINDOW.name),
        mask_channel=True,
        crop_flip_average=crop_flip_average,
    )
