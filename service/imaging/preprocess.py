"""The one implementation of windowing, resampling and cropping, shared by training and inference.

Training code (``models/``, with torch) and the inference pipeline (ONNX Runtime) both call
these functions, so what the network sees at serving time is computed by the very code it
was trained with; nothing else may reimplement them. numpy and scipy only: no torch import.

Conventions, everywhere in this module:

* Volumes are numpy arrays indexed ``(z, y, x)`` (slice, row, column), as
  :class:`service.imaging.volume.Volume` gives them; channel-first stacks are ``(C, z, y, x)``.
* Intensities going in are Hounsfield units (HU); windowed images coming out are float32
  in [0, 1].
* ``spacing`` is ``(dz, dy, dx)`` in millimetres, the distance between voxel centres.
* Resampling is *origin-aligned*: voxel ``(0, 0, 0)`` keeps its centre and the grid steps by
  the new spacing, so the new affine is the old one with its columns scaled by
  ``target_spacing / spacing`` (:func:`resampled_affine`) and resampling back with
  :func:`resample_to_original` lands exactly on the original voxel centres.
* Voxel boxes are ``(z0, y0, x0, z1, y1, x1)`` with the end exclusive, as in
  ``service.findings``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

Spacing = tuple[float, float, float]
Box = tuple[int, int, int, int, int, int]


# --------------------------------------------------------------------------- windowing


@dataclass(frozen=True)
class Window:
    """A display window in HU: ``level`` (centre) and ``width``."""

    name: str
    width: float
    level: float

    @property
    def lower(self) -> float:
        return self.level - self.width / 2.0

    @property
    def upper(self) -> float:
        return self.level + self.width / 2.0


SOFT_TISSUE_WINDOW = Window("soft_tissue", width=300.0, level=80.0)
"""W300/L80: prevertebral soft tissue, haematoma."""
STANDARD_BONE_WINDOW = Window("standard_bone", width=1800.0, level=500.0)
"""W1800/L500: cortical detail, subtle lucent fracture lines."""
GROSS_BONE_WINDOW = Window("gross_bone", width=650.0, level=400.0)
"""W650/L400: overall bone alignment and cancellous bone."""
DEFAULT_WINDOWS: tuple[Window, ...] = (SOFT_TISSUE_WINDOW, STANDARD_BONE_WINDOW, GROSS_BONE_WINDOW)
"""The three channels, in this order, that the models take."""


def apply_window(hu: np.ndarray, window: Window, *, out: np.ndarray | None = None) -> np.ndarray:
    """Map HU linearly so that ``window.lower`` -> 0 and ``window.upper`` -> 1, clipped.

    Returns float32 of the input's shape (written into ``out`` when given). This is the
    continuous form of the DICOM linear VOI function, without its half-unit offsets.
    """
    if window.width <= 0:
        raise ValueError(f"window {window.name} has width {window.width}")
    if out is None:
        out = np.empty(np.shape(hu), dtype=np.float32)
    np.subtract(hu, np.float32(window.lower), out=out, casting="unsafe")
    out *= np.float32(1.0 / window.width)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def multi_window(hu: np.ndarray, windows: Sequence[Window] = DEFAULT_WINDOWS) -> np.ndarray:
    """Stack of windowed images, ``(C, *hu.shape)`` float32 in [0, 1], channel c = windows[c]."""
    out = np.empty((len(windows), *np.shape(hu)), dtype=np.float32)
    for channel, window in enumerate(windows):
        apply_window(hu, window, out=out[channel])
    return out


# --------------------------------------------------------------------------- resampling


def resampled_shape(
    shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]
) -> tuple[int, ...]:
    """Voxels of an origin-aligned grid with ``target_spacing`` inside the original extent.

    Along an axis of n voxels at spacing s, the new grid keeps every centre within the
    original first..last centres: ``floor((n - 1) * s / t) + 1`` voxels.
    """
    _check_lengths(shape, spacing, target_spacing)
    result = []
    for n, s, t in zip(shape, spacing, target_spacing, strict=True):
        if s <= 0 or t <= 0:
            raise ValueError(f"spacings must be positive, got {s} and {t}")
        result.append(int(math.floor((n - 1) * s / t + 1e-6)) + 1)
    return tuple(result)


def resampled_affine(
    affine: np.ndarray, spacing: Sequence[float], target_spacing: Sequence[float]
) -> np.ndarray:
    """The 4x4 voxel->LPS affine of a volume after :func:`resample_to_spacing`."""
    _check_lengths(spacing, target_spacing)
    new = np.array(affine, dtype=np.float64, copy=True)
    for axis, (s, t) in enumerate(zip(spacing, target_spacing, strict=True)):
        new[:3, axis] *= t / s
    return new


def resample_to_spacing(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    order: int = 1,
    output_shape: Sequence[int] | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Resample an image (any number of axes, usually (z, y, x)) to ``target_spacing``.

    ``order`` is the spline order (0 nearest, 1 linear, 3 cubic). Output float32 for
    ``order > 0``; for ``order == 0`` the input dtype is kept (use
    :func:`resample_labels` for label maps). ``output_shape`` defaults to
    :func:`resampled_shape`; voxels past the input's last centre repeat the edge value.
    Cubic resampling prefilters in float32 (not scipy's float64) to keep memory at about
    the size of the input.

    ``antialias``: along every axis that shrinks, each output voxel is the mean of the input
    over the output voxel's own width (:func:`area_downsample`) instead of a point sample.
    Point sampling a 0.3 mm reconstruction onto a 2.5 mm grid keeps one voxel in eight along
    each in-plane axis: its noise and thin cortex reach the network unaveraged, so the same
    neck looks different at matrix 512 than at 256 (see the manifest's ``seg_antialias``).
    """
    _check_lengths(array.shape, spacing, target_spacing)
    if not 0 <= order <= 5:
        raise ValueError("order must be 0..5")
    shape = tuple(output_shape) if output_shape is not None else resampled_shape(
        array.shape, spacing, target_spacing)
    scale = np.array([t / s for s, t in zip(spacing, target_spacing, strict=True)])
    if antialias and order > 0 and (scale > 1.0 + 1e-6).any():
        array = array.astype(np.float32, copy=False)
        # Largest reduction first, the contiguous last axis first among equals: every later
        # pass runs on a smaller array.
        for axis in sorted(np.flatnonzero(scale > 1.0 + 1e-6), key=lambda a: (-scale[a], -a)):
            array = area_downsample(array, int(axis), float(scale[axis]), shape[axis])
            scale[axis] = 1.0
    if np.allclose(scale, 1.0) and shape == array.shape:
        return array.astype(np.float32) if order > 0 else array.copy()
    source = array
    if order > 1:
        source = ndimage.spline_filter(array, order=order, output=np.float32, mode="nearest")
    output_dtype = array.dtype if order == 0 else np.float32
    return ndimage.affine_transform(
        source, scale, offset=0.0, output_shape=shape, order=order, mode="nearest",
        prefilter=False, output=output_dtype,
    )


def area_weights(n: int, scale: float, size: int) -> np.ndarray:
    """(n, size) float32 matrix: column ``j`` averages the input over output voxel ``j``.

    Output voxel ``j`` is centred on input coordinate ``j * scale`` (the grid of
    :func:`resample_to_spacing`) and covers ``[j * scale - scale / 2, j * scale + scale / 2]``
    clipped to the image; input voxel ``i`` (constant over ``[i - 0.5, i + 0.5]``) weighs the
    length of its overlap with that window, normalised to sum to one.
    """
    centres = np.arange(size, dtype=np.float64) * scale
    low = np.clip(centres - scale / 2.0, -0.5, n - 0.5)
    high = np.maximum(np.clip(centres + scale / 2.0, -0.5, n - 0.5), low + 1e-9)
    edges = np.arange(n + 1, dtype=np.float64) - 0.5
    overlap = (np.minimum(high[None, :], edges[1:, None])
               - np.maximum(low[None, :], edges[:-1, None]))
    return (np.clip(overlap, 0.0, None) / (high - low)[None, :]).astype(np.float32)


def area_downsample(array: np.ndarray, axis: int, scale: float, size: int) -> np.ndarray:
    """Mean of ``array`` over each output voxel's width along ``axis`` (float32).

    One matrix product with :func:`area_weights` per axis: BLAS does the averaging, about a
    fifth of the time of a running sum over a 300 x 512 x 512 volume and a tenth of a Gaussian
    prefilter of the same width.
    """
    source = np.asarray(array, dtype=np.float32)
    weights = area_weights(source.shape[axis], scale, size)
    if axis in (-1, source.ndim - 1):
        flat = source.reshape(-1, source.shape[-1]) @ weights
        return flat.reshape(*source.shape[:-1], size)
    out = np.tensordot(source, weights, axes=([axis], [0]))
    return np.ascontiguousarray(np.moveaxis(out, -1, axis))


def resample_labels(
    labels: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    output_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map; values and dtype are preserved."""
    return resample_to_spacing(labels, spacing, target_spacing, order=0,
                               output_shape=output_shape)


def resample_to_original(
    array: np.ndarray,
    array_spacing: Sequence[float],
    original_spacing: Sequence[float],
    original_shape: Sequence[int],
    *,
    order: int = 1,
) -> np.ndarray:
    """Bring an array made by :func:`resample_to_spacing` back onto the original voxel grid.

    Use ``order=0`` for label maps (model output) so that labels are not blended.
    """
    return resample_to_spacing(array, array_spacing, original_spacing, order=order,
                               output_shape=original_shape)


# --------------------------------------------------------------------------- cropping


def bounding_box(mask: np.ndarray) -> Box | None:
    """Smallest end-exclusive box holding every nonzero voxel of a 3-D mask, or None."""
    if mask.ndim != 3:
        raise ValueError("bounding_box needs a (z, y, x) mask")
    nonzero = [np.flatnonzero(np.any(mask, axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if any(len(n) == 0 for n in nonzero):
        return None
    z, y, x = nonzero
    return (int(z[0]), int(y[0]), int(x[0]), int(z[-1]) + 1, int(y[-1]) + 1, int(x[-1]) + 1)


def padding_in_voxels(padding_mm: Sequence[float], spacing: Sequence[float]) -> tuple[int, ...]:
    """Padding given in mm per axis, rounded up to whole voxels."""
    _check_lengths(padding_mm, spacing)
    return tuple(int(math.ceil(p / s - 1e-9)) for p, s in zip(padding_mm, spacing, strict=True))


@dataclass(frozen=True)
class Crop:
    """Where a crop came from: output voxel ``i`` samples source index ``offset + i * scale``
    (per axis, fractional). ``box`` is the padded source box (may extend past the volume)."""

    box: Box
    offset: tuple[float, float, float]
    scale: tuple[float, float, float]
    output_shape: tuple[int, int, int]

    def to_source(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) crop voxel indices -> (..., 3) fractional source voxel indices."""
        return np.asarray(index, dtype=np.float64) * np.array(self.scale) + np.array(self.offset)


def crop_box(
    array: np.ndarray,
    box: Box,
    *,
    padding: Sequence[int] = (0, 0, 0),
    output_shape: Sequence[int] | None = None,
    resize: bool = True,
    order: int = 1,
    fill: float = 0.0,
) -> tuple[np.ndarray, Crop]:
    """Cut the voxel ``box`` enlarged by ``padding`` voxels per side out of a (z, y, x) array.

    * ``output_shape=None``: the padded box as is (exact copy; parts outside the array get
      ``fill``).
    * ``output_shape`` and ``resize=True``: the padded box scaled to exactly that shape (the
      box's outer voxel faces map onto the output's; aspect ratio not kept).
    * ``output_shape`` and ``resize=False``: a window of that shape centred on the padded
      box, no scaling (a box larger than the window is cut).

    Returns the crop (float32 for ``order > 0``, input dtype for ``order == 0``, use that for
    labels) and the :class:`Crop` that maps its voxels back to the source.
    """
    if array.ndim != 3:
        raise ValueError("crop_box needs a (z, y, x) array")
    z0, y0, x0, z1, y1, x1 = box
    if z1 <= z0 or y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty box {box}")
    pad = tuple(int(p) for p in padding)
    if len(pad) != 3 or min(pad) < 0:
        raise ValueError("padding must be three non-negative voxel counts")
    start = np.array([z0 - pad[0], y0 - pad[1], x0 - pad[2]], dtype=np.int64)
    stop = np.array([z1 + pad[0], y1 + pad[1], x1 + pad[2]], dtype=np.int64)
    size = stop - start
    if output_shape is None:
        shape = tuple(int(s) for s in size)
        scale = np.ones(3)
        offset = start.astype(np.float64)
    else:
        shape = tuple(int(s) for s in output_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError("output_shape must be three positive sizes")
        if resize:
            scale = size / np.array(shape, dtype=np.float64)
            offset = start - 0.5 + 0.5 * scale
        else:
            scale = np.ones(3)
            centre = (start + stop) // 2
            offset = (centre - np.array(shape) // 2).astype(np.float64)
    crop = Crop(
        box=(int(start[0]), int(start[1]), int(start[2]), int(stop[0]), int(stop[1]), int(stop[2])),
        offset=(float(offset[0]), float(offset[1]), float(offset[2])),
        scale=(float(scale[0]), float(scale[1]), float(scale[2])),
        output_shape=(shape[0], shape[1], shape[2]),
    )
    return _sample(array, crop, order=order, fill=fill), crop


def _sample(array: np.ndarray, crop: Crop, *, order: int, fill: float) -> np.ndarray:
    """Sample ``array`` at the crop's grid, working on a slab around it only."""
    output_dtype = array.dtype if order == 0 else np.float32
    scale = np.array(crop.scale)
    offset = np.array(crop.offset)
    last = offset + (np.array(crop.output_shape) - 1) * scale
    margin = order + 1
    low = np.clip(np.floor(offset).astype(np.int64) - margin, 0, np.array(array.shape))
    high = np.clip(np.ceil(last).astype(np.int64) + margin + 1, 0, np.array(array.shape))
    if np.any(high <= low):
        return np.full(crop.output_shape, fill, dtype=output_dtype)
    region = array[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    integral = (np.allclose(scale, 1.0) and np.allclose(offset, np.round(offset)))
    if integral:
        # Pure integer shift: copy exactly, whatever the order.
        out = np.full(crop.output_shape, fill, dtype=output_dtype)
        begin = np.round(offset).astype(np.int64)
        src_lo = np.maximum(begin, 0)
        src_hi = np.minimum(begin + np.array(crop.output_shape), np.array(array.shape))
        if np.all(src_hi > src_lo):
            dst_lo = src_lo - begin
            dst_hi = dst_lo + (src_hi - src_lo)
            out[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = array[
                src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
        return out
    source = region
    if order > 1:
        source = ndimage.spline_filter(region, order=order, output=np.float32, mode="nearest")
    return ndimage.affine_transform(
        source, scale, offset=offset - low, output_shape=crop.output_shape, order=order,
        mode="constant", cval=fill, prefilter=False, output=output_dtype,
    )


def _check_lengths(*sequences: Sequence[float] | Sequence[int] | tuple[int, ...]) -> None:
    lengths = {len(s) for s in sequences}
    if len(lengths) != 1:
        raise ValueError(f"axis counts differ: {[len(s) for s in sequences]}")
