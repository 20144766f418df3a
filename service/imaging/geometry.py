"""Slice-stack geometry in DICOM patient coordinates (LPS, millimetres).

Conventions shared with :class:`~service.imaging.volume.Volume`: a slice's Image Orientation
(Patient) gives ``row_dir`` (direction of increasing column index, x) and ``col_dir``
(direction of increasing row index, y); the slice normal is ``row_dir x col_dir``; arrays are
(z, y, x); an affine maps ``(z, y, x, 1)`` to LPS millimetres and its columns are the z, y
and x steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

AIR_HU = -1024
"""Value for voxels with no data: outside the scanned field or padding."""

STANDARD_AXIAL_IOP = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def orthonormal_directions(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(row_dir, col_dir, normal) from a 6-value IOP, made exactly orthonormal.

    Scanners round cosines to a few decimals; Gram-Schmidt removes that drift so that affines
    are invertible and projections consistent. Returns None for degenerate orientations
    (zero or parallel vectors).
    """
    row = np.asarray(iop[:3], dtype=np.float64)
    col = np.asarray(iop[3:6], dtype=np.float64)
    row_norm = np.linalg.norm(row)
    if row_norm < 1e-6:
        return None
    row = row / row_norm
    col = col - np.dot(col, row) * row
    col_norm = np.linalg.norm(col)
    if col_norm < 1e-3:
        return None
    col = col / col_norm
    return row, col, np.cross(row, col)


def slice_normal(iop: np.ndarray | tuple[float, ...] | list[float]) -> np.ndarray | None:
    """Unit normal ``row_dir x col_dir`` of a slice from its 6-value Image Orientation
    (Patient); None for a degenerate orientation. The one slice-normal function: the loader
    sorts along it and the ingest rules check orientation and obliquity with it."""
    directions = orthonormal_directions(np.asarray(iop, dtype=np.float64))
    return None if directions is None else directions[2]


def angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors in degrees (0..180)."""
    cosine = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def stack_affine(
    origin: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    spacing: tuple[float, float, float],
) -> np.ndarray:
    """4x4 affine of a regular (z, y, x) grid: voxel index -> LPS mm."""
    dz, dy, dx = spacing
    affine = np.eye(4)
    affine[:3, 0] = normal * dz
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = row_dir * dx
    affine[:3, 3] = origin
    return affine


@dataclass(frozen=True)
class StackShape:
    """How far a sorted stack is from a regular grid along its own normal."""

    tilt_deg: float
    """Angle between the slice normal and the line the slices advance along (gantry tilt)."""
    max_inplane_shift_px: float
    """Largest in-plane offset of a slice relative to the first one, in pixels."""
    max_spacing_deviation: float
    """Largest distance of a slice from a uniform grid along the normal, in fractions of the
    mean spacing."""


def describe_stack(
    positions: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
) -> StackShape:
    """Measure shear (gantry tilt) and spacing irregularity of sorted slice positions (N, 3)."""
    sigma = positions @ normal
    count = len(sigma)
    inplane = positions - np.outer(sigma, normal)
    offsets = inplane - inplane[0]
    dy, dx = pixel_spacing
    shift_px = np.hypot(offsets @ row_dir / dx, offsets @ col_dir / dy)
    if count < 2 or sigma[-1] == sigma[0]:
        return StackShape(0.0, float(shift_px.max(initial=0.0)), 0.0)
    # Least-squares line through the in-plane offsets: its slope (mm per mm along the normal)
    # is tan(tilt).
    centred = sigma - sigma.mean()
    slope = (centred @ (inplane - inplane.mean(axis=0))) / (centred @ centred)
    tilt = float(np.degrees(np.arctan(np.linalg.norm(slope))))
    mean_step = (sigma[-1] - sigma[0]) / (count - 1)
    uniform = sigma[0] + mean_step * np.arange(count)
    deviation = float(np.max(np.abs(sigma - uniform)) / abs(mean_step))
    return StackShape(tilt, float(shift_px.max()), deviation)


@dataclass(frozen=True)
class TargetGrid:
    """A regular output grid: origin of voxel (0, 0, 0), unit axes, spacing, shape."""

    origin: np.ndarray
    normal: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    @property
    def affine(self) -> np.ndarray:
        return stack_affine(self.origin, self.normal, self.row_dir, self.col_dir, self.spacing)


def regular_target_grid(
    positions: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
    matrix: tuple[int, int],
    *,
    to_axial: bool,
) -> TargetGrid:
    """The regular grid that a sheared or unevenly spaced stack is resampled onto.

    ``to_axial``: the output normal is the patient head-foot axis (gantry tilt corrected to a
    true axial stack, so the spine, which runs along that axis, keeps its in-plane place);
    otherwise the source normal is kept (spacing made uniform only). In-plane spacing and
    matrix are the source's; the grid's central line passes through the mean slice centre.
    Slice spacing is the median step of the slice centres along the output normal.
    """
    rows, cols = matrix
    dy, dx = pixel_spacing
    axial = np.array([0.0, 0.0, 1.0 if normal[2] >= 0 else -1.0])
    target_normal = axial if to_axial else normal
    new_row = row_dir - np.dot(row_dir, target_normal) * target_normal
    new_row /= np.linalg.norm(new_row)
    new_col = np.cross(target_normal, new_row)
    half = ((cols - 1) / 2.0) * dx * row_dir + ((rows - 1) / 2.0) * dy * col_dir
    centres = positions + half
    along = centres @ target_normal
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    step = float(np.median(steps)) if len(steps) else 1.0
    count = int(round((along[order][-1] - along[order][0]) / step)) + 1 if len(steps) else 1
    mean_centre = centres.mean(axis=0)
    first_centre = mean_centre + (along[order][0] - mean_centre @ target_normal) * target_normal
    origin = first_centre - ((cols - 1) / 2.0) * dx * new_row - ((rows - 1) / 2.0) * dy * new_col
    return TargetGrid(origin, target_normal, new_row, new_col, (step, dy, dx), (count, rows, cols))


def resample_stack(
    source: np.ndarray,
    positions: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
    grid: TargetGrid,
    *,
    fill: float = AIR_HU,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a sorted stack of parallel slices with arbitrary positions onto ``grid``.

    ``source`` is (N, rows, cols); ``positions`` (N, 3) the LPS position of each slice's first
    voxel (sorted ascending along ``normal``). Each output voxel is projected along the
    source normal onto the two neighbouring source planes, sampled bilinearly in each plane,
    and blended linearly by distance: exact for shear (gantry tilt) and uneven spacing, one
    output slice at a time so that only one extra slice of coordinates is held. Points more
    than half a spacing beyond the first/last slice, or outside a slice, get ``fill``.

    Returns the resampled array (source dtype; integers rounded) and, for each output slice,
    the index of the nearest source slice (for SOP Instance UID references).
    """
    count_src = source.shape[0]
    dy, dx = pixel_spacing
    sigma = positions @ normal
    if count_src < 2:
        raise ValueError("need at least two slices to resample")
    half_step = 0.5 * float(np.median(np.diff(sigma)))
    out_z, rows, cols = grid.shape
    out = np.empty(grid.shape, dtype=source.dtype)
    nearest = np.empty(out_z, dtype=np.int64)
    dz_out, dy_out, dx_out = grid.spacing
    yy, xx = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64),
                         indexing="ij")
    plane = (yy[..., None] * (dy_out * grid.col_dir) + xx[..., None] * (dx_out * grid.row_dir))
    plane = plane.reshape(-1, 3)
    indices = np.arange(count_src, dtype=np.float64)
    is_integer = np.issubdtype(source.dtype, np.integer)
    info = np.iinfo(source.dtype) if is_integer else None
    centre_offset = plane[(rows // 2) * cols + cols // 2]
    if _same_plane_grid(positions, normal, row_dir, col_dir, pixel_spacing, grid):
        # Uneven spacing only: every output slice is a blend of two whole source slices.
        return _blend_slices(source, sigma, grid, fill=fill)
    lattice = _lattice_step(positions, normal, row_dir, col_dir, pixel_spacing)
    if lattice is not None:
        # A plain gantry tilt: the source is a regular sheared lattice, an affine map away.
        return _resample_lattice(source, positions[0], lattice, row_dir, col_dir,
                                 pixel_spacing, grid, fill=fill)
    for j in range(out_z):
        points = grid.origin + j * dz_out * grid.normal + plane
        s = points @ normal
        frac = np.interp(s, sigma, indices)
        lower = np.clip(np.floor(frac).astype(np.int64), 0, count_src - 2)
        weight = (frac - lower).astype(np.float32)
        outside = (s < sigma[0] - half_step) | (s > sigma[-1] + half_step)
        value = np.zeros(len(points), dtype=np.float32)
        for k, w in ((lower, 1.0 - weight), (lower + 1, weight)):
            delta = points - positions[k]
            coords = np.stack([k.astype(np.float64), delta @ col_dir / dy, delta @ row_dir / dx])
            sample = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=fill,
                                             output=np.float32, prefilter=False)
            value += w * sample
        value[outside] = fill
        if info is not None:
            np.rint(value, out=value)
            np.clip(value, info.min, info.max, out=value)
        out[j] = value.reshape(rows, cols)
        centre = grid.origin + j * dz_out * grid.normal + centre_offset
        nearest[j] = int(np.clip(np.rint(np.interp(centre @ normal, sigma, indices)), 0,
                                 count_src - 1))
    return out, nearest


def _same_plane_grid(
    positions: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
    grid: TargetGrid,
) -> bool:
    """True when the grid keeps the source's planes and pixel lattice (no shear, same axes)."""
    if not (np.allclose(grid.normal, normal, atol=1e-9) and np.allclose(grid.row_dir, row_dir,
                                                                         atol=1e-9)):
        return False
    if not np.allclose(grid.spacing[1:], pixel_spacing, rtol=1e-9):
        return False
    offsets = positions - grid.origin
    dy, dx = pixel_spacing
    shift = np.stack([offsets @ col_dir / dy, offsets @ row_dir / dx])
    return bool(np.abs(shift).max() < 1e-3)


def _blend_slices(source: np.ndarray, sigma: np.ndarray, grid: TargetGrid, *,
                  fill: float) -> tuple[np.ndarray, np.ndarray]:
    count_src = source.shape[0]
    indices = np.arange(count_src, dtype=np.float64)
    half_step = 0.5 * float(np.median(np.diff(sigma)))
    out = np.empty(grid.shape, dtype=source.dtype)
    nearest = np.empty(grid.shape[0], dtype=np.int64)
    info = np.iinfo(source.dtype) if np.issubdtype(source.dtype, np.integer) else None
    start = float(grid.origin @ grid.normal)
    for j in range(grid.shape[0]):
        s = start + j * grid.spacing[0]
        frac = float(np.interp(s, sigma, indices))
        lower = min(int(np.floor(frac)), count_src - 2)
        weight = np.float32(frac - lower)
        nearest[j] = int(np.clip(round(frac), 0, count_src - 1))
        if s < sigma[0] - half_step or s > sigma[-1] + half_step:
            out[j] = fill
            continue
        value = source[lower].astype(np.float32) * (1 - weight)
        value += source[lower + 1].astype(np.float32) * weight
        if info is not None:
            np.rint(value, out=value)
            np.clip(value, info.min, info.max, out=value)
        out[j] = value
    return out, nearest


def _lattice_step(
    positions: np.ndarray,
    normal: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
) -> np.ndarray | None:
    """The constant step between slices if positions are ``p0 + k * step`` to within a
    twentieth of a pixel in plane and of a spacing along the normal, else None."""
    count = len(positions)
    step = (positions[-1] - positions[0]) / (count - 1)
    residual = positions - (positions[0] + np.outer(np.arange(count), step))
    dy, dx = pixel_spacing
    along = abs(float(step @ normal))
    worst = max(
        float(np.abs(residual @ row_dir).max()) / dx,
        float(np.abs(residual @ col_dir).max()) / dy,
        float(np.abs(residual @ normal).max()) / along if along > 0 else np.inf,
    )
    return step if worst < 0.05 else None


def _resample_lattice(
    source: np.ndarray,
    origin: np.ndarray,
    step: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
    grid: TargetGrid,
    *,
    fill: float,
    slab: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resampling of a sheared lattice (axes: slice step, rows, columns) onto
    ``grid`` with one affine map, ``slab`` output slices at a time (float32 scratch only
    for the slab). Interpolation between slices runs along the lattice's own step, i.e.
    the table direction, which is what the scanner sampled."""
    dy, dx = pixel_spacing
    source_axes = np.column_stack([step, dy * col_dir, dx * row_dir])
    dz_out, dy_out, dx_out = grid.spacing
    target_axes = np.column_stack([dz_out * grid.normal, dy_out * grid.col_dir,
                                   dx_out * grid.row_dir])
    inverse = np.linalg.inv(source_axes)
    matrix = inverse @ target_axes
    offset = inverse @ (grid.origin - origin)
    out = np.empty(grid.shape, dtype=source.dtype)
    info = np.iinfo(source.dtype) if np.issubdtype(source.dtype, np.integer) else None
    count_out, rows, cols = grid.shape
    for start in range(0, count_out, slab):
        stop = min(start + slab, count_out)
        values = ndimage.affine_transform(
            source, matrix, offset=offset + matrix[:, 0] * start,
            output_shape=(stop - start, rows, cols), order=1, mode="constant", cval=fill,
            prefilter=False, output=np.float32,
        )
        if info is not None:
            np.rint(values, out=values)
            np.clip(values, info.min, info.max, out=values)
        out[start:stop] = values
    centres = np.array([[j, (rows - 1) / 2.0, (cols - 1) / 2.0] for j in range(count_out)])
    nearest = np.clip(np.rint((centres @ matrix.T + offset)[:, 0]), 0, source.shape[0] - 1)
    return out, nearest.astype(np.int64)
