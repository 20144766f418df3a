"""Classifier input: a stack of axial slices through one vertebra (shared by training and serving).

Geometry, in the volume's voxel index space (z, y, x) with spacing (dz, dy, dx) mm:

* The vertebra's voxel box (from the label map) gives its z range and in-plane centre
  (:func:`vertebra_box`). In-plane the box is made square in millimetres: its side is the
  vertebra's larger in-plane extent times ``1 + margin``, at least ``min_extent_mm``. The
  classifier's pixel size is therefore ``side / size`` mm whatever the scanner's pixel
  spacing, which is what lets one model serve 0.3 mm and 0.8 mm reconstructions.
* The box is sampled by :func:`service.imaging.preprocess.crop_box` (the one shared
  resampling implementation) onto ``slices * subsamples`` evenly spaced z positions: the
  box's z range is split into ``slices`` equal bins, each bin into ``subsamples`` sub-bins.
* Channels of slice ``k``: every window of the model at the centre sub-bin of bin ``k``; the
  neighbour window (the fine bone window) at every other sub-bin of that bin, so a thin
  lucent plane parallel to the slices shows on some channel however the bins fall; last the
  vertebra's own mask (nearest neighbour), which tells the net which bone to judge.

``models`` builds training crops with :func:`vertebra_stack` on jittered boxes; the
pipeline calls it on the canonical box. There is no second copy of this code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.imaging.preprocess import Box, Window, crop_box, multi_window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StackSpec:
    """How to sample one vertebra; mirrors the manifest's preprocessing section."""

    windows: tuple[Window, ...]
    slices: int
    size: int
    subsamples: int = 3
    neighbour_window: int = 1
    mask_channel: bool = True
    margin: float = 0.15
    min_extent_mm: float = 40.0
    z_margin_slices: int = 0

    def __post_init__(self) -> None:
        if self.subsamples < 1 or self.subsamples % 2 == 0:
            raise ValueError("subsamples must be odd (the centre sub-bin is the slice itself)")
        if not 0 <= self.neighbour_window < len(self.windows):
            raise ValueError("neighbour_window must index one of the windows")

    @property
    def channels(self) -> int:
        return len(self.windows) + self.subsamples - 1 + int(self.mask_channel)


def vertebra_box(bbox: Box, spacing: Sequence[float], spec: StackSpec) -> Box:
    """The canonical sampling box of a vertebra whose voxels fill ``bbox`` (end-exclusive).

    z: the vertebra's slices plus ``z_margin_slices`` either side. y/x: a square in mm
    centred on the bbox centre (may extend past the volume; outside reads as ``fill``).
    """
    z0, y0, x0, z1, y1, x1 = bbox
    _, dy, dx = spacing
    side = max((y1 - y0) * dy, (x1 - x0) * dx) * (1.0 + spec.margin)
    side = max(side, spec.min_extent_mm)
    ya, yb = _centred(y0, y1, side / dy)
    xa, xb = _centred(x0, x1, side / dx)
    return (z0 - spec.z_margin_slices, ya, xa, z1 + spec.z_margin_slices, yb, xb)


def _centred(lo: int, hi: int, extent: float) -> tuple[int, int]:
    """Integer [start, stop) of about ``extent`` voxels centred on the box [lo, hi)."""
    centre = (lo + hi) / 2.0
    n = max(1, int(round(extent)))
    start = int(math.floor(centre - n / 2.0 + 0.5))
    return start, start + n


def vertebra_stack(hu: np.ndarray, label_map: np.ndarray | None, label: int, box: Box,
                   spec: StackSpec) -> tuple[np.ndarray, np.ndarray]:
    """Sample the classifier input for one vertebra.

    ``hu`` (z, y, x) in HU; ``label_map`` (z, y, x) on the same grid (needed when the spec
    has a mask channel). Returns the stack, float32 (slices, channels, size, size) in [0, 1],
    and the fractional z index of each slice's centre (to map per-slice scores back onto the
    series). Points outside the volume in-plane read as air; z is clamped to the first/last
    slice by the resampler.
    """
    n_z = spec.slices * spec.subsamples
    shape = (n_z, spec.size, spec.size)
    image, crop = crop_box(hu, box, output_shape=shape, resize=True, order=1, fill=-1024.0)
    centre = np.arange(spec.slices) * spec.subsamples + spec.subsamples // 2
    windows = multi_window(image[centre], spec.windows)  # (W, S, H, W)
    channels = [windows]
    if spec.subsamples > 1:
        others = [i for i in range(spec.subsamples) if i != spec.subsamples // 2]
        neighbour = spec.windows[spec.neighbour_window]
        for i in others:
            rows = np.arange(spec.slices) * spec.subsamples + i
            channels.append(multi_window(image[rows], (neighbour,)))
    if spec.mask_channel:
        if label_map is None:
            raise ValueError("this stack spec needs the label map for its mask channel")
        labels, _ = crop_box(label_map, box, output_shape=shape, resize=True, order=0, fill=0)
        channels.append((labels[centre] == label).astype(np.float32)[None])
    stack = np.concatenate(channels, axis=0).transpose(1, 0, 2, 3)
    z_positions = crop.to_source(np.stack([centre, np.zeros_like(centre),
                                           np.zeros_like(centre)], axis=1))[:, 0]
    return np.ascontiguousarray(stack, dtype=np.float32), z_positions
