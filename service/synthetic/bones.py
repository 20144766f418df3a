"""Rendering one bone (a vertebra, the occiput, a rib ...) into the phantom volume.

A bone is a union of implicit shapes in its own local frame (u, v, w: towards the
patient's left, back and head; mm), minus carved regions (foramina, fracture gaps,
surgical defects), plus sclerotic regions (healed fractures, corticated margins). The
renderer evaluates the signed distance ``d`` (mm) only inside the bone's voxel bounding
box, and inside that only in each shape's own sub-box, then turns ``d`` into HU:

* bone fraction ``f = clip(0.5 - d / edge, 0, 1)`` (partial volume + reconstruction blur),
* cortex weight ``1`` within ``cortex_mm`` of the surface, fading to cancellous bone inside,
* cancellous HU with a trabecular texture (a few random plane waves in the local frame, so
  the texture moves with the bone),

and blends ``hu = f * bone + (1 - f) * hu_underneath``. Labels take the bone's label where
``f >= 0.5``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.synthetic.shapes import Coords, Shape, Vec

logger = logging.getLogger(__name__)

Box = tuple[slice, slice, slice]
BBox = tuple[int, int, int, int, int, int]


@dataclass(frozen=True)
class Grid:
    """The phantom's voxel grid: ``origin`` is the LPS position (mm) of voxel (0, 0, 0)'s
    centre given as (x, y, z); ``spacing`` is (dz, dy, dx) mm; ``shape`` is (nz, ny, nx).
    Axes are aligned with LPS (x = column, y = row, z = slice)."""

    origin: Vec
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def axis(self, which: int) -> np.ndarray:
        """LPS coordinate (mm) of every index along axis 0 = z, 1 = y, 2 = x."""
        lps_index = 2 - which
        return (self.origin[lps_index]
                + self.spacing[which] * np.arange(self.shape[which])).astype(np.float32)

    def box_of(self, lo: np.ndarray, hi: np.ndarray) -> Box | None:
        """Voxel slices covering the LPS box [lo, hi] (x, y, z order), clipped; None if empty."""
        out = []
        for axis in range(3):
            lps_index = 2 - axis
            o, s, n = self.origin[lps_index], self.spacing[axis], self.shape[axis]
            a = int(math.floor((lo[lps_index] - o) / s))
            b = int(math.ceil((hi[lps_index] - o) / s)) + 1
            a, b = max(a, 0), min(b, n)
            if a >= b:
                return None
            out.append(slice(a, b))
        return out[0], out[1], out[2]


@dataclass
class Carve:
    """Remove bone inside ``shape``. ``fill_hu`` (None: leave what is underneath) fills the
    removed region; ``margin_mm`` > 0 adds sclerosis of ``sclerosis_hu`` to the bone within
    that distance of the carve (corticated margins of mimics). ``truth`` names the ground
    truth entry whose bounding box the affected bone voxels define."""

    shape: Shape
    fill_hu: float | None = None
    margin_mm: float = 0.0
    sclerosis_hu: float = 0.0
    truth: str | None = None
    corticate: bool = True
    """True: the new bone surface gets a cortex (foramina, clefts, surgical defects: all
    remodelled, smooth edges). False: raw trabecular edges, as in an acute fracture."""


@dataclass
class Sclerosis:
    """Add ``hu`` to the bone inside ``shape`` (healed fracture band, subchondral sclerosis,
    impaction band)."""

    shape: Shape
    hu: float
    truth: str | None = None


Warp = Callable[[Coords], Coords]
"""Coordinate warp applied to local coordinates before shapes are evaluated (fragment
displacement, compression). Must move points by at most ``BoneObject.warp_margin_mm``."""


@dataclass
class BoneObject:
    name: str
    label: int
    """Label value where this bone is (0 for non-vertebral bones)."""
    center: np.ndarray
    """Local origin in LPS mm (x, y, z)."""
    rot: np.ndarray
    """3x3; columns are the local u, v, w axes expressed in LPS."""
    parts: list[Shape]
    cortex_hu: float = 1200.0
    cancellous_hu: float = 280.0
    cortex_mm: float = 1.0
    texture_hu: float = 60.0
    texture_seed: int = 0
    carves: list[Carve] = field(default_factory=list)
    scleroses: list[Sclerosis] = field(default_factory=list)
    warps: list[Warp] = field(default_factory=list)
    warp_margin_mm: float = 0.0
    additions: list[Shape] = field(default_factory=list)
    """Shapes united *after* carving (osteophytes, new bone across a defect)."""

    def local_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        los, his = zip(*(s.bounds() for s in self.parts + self.additions), strict=True)
        lo = np.min(np.asarray(los, dtype=np.float64), axis=0) - self.warp_margin_mm - 1.0
        hi = np.max(np.asarray(his, dtype=np.float64), axis=0) + self.warp_margin_mm + 1.0
        return lo, hi

    def world_box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LPS axis-aligned box around the local box [lo, hi]."""
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                            for z in (lo[2], hi[2])])
        world = corners @ self.rot.T + self.center
        return world.min(axis=0), world.max(axis=0)


@dataclass
class Rendered:
    """A bone's contribution: at the flat volume indices ``index`` blend ``bone_hu`` with
    weight ``fraction`` (sparse: only voxels near the bone are listed)."""

    name: str
    label: int
    index: np.ndarray
    fraction: np.ndarray
    bone_hu: np.ndarray
    fill: list[tuple[np.ndarray, np.ndarray, float]]
    truth: dict[str, Extent]
    in_label: np.ndarray | None = None
    """Where the bone's label applies (None: where ``fraction >= 0.5``)."""


class _Points:
    """The voxels of a box that are close enough to the bone to matter, as 1-D arrays
    sorted by flat index (so a z range is a contiguous slice)."""

    def __init__(self, box: Box, mask: np.ndarray, coords_of: object) -> None:
        flat = np.flatnonzero(mask)
        self.lin = flat
        self.box = box
        self.iz, self.iy, self.ix = np.unravel_index(flat, mask.shape)
        self.shape = mask.shape
        self.coords: Coords = coords_of(self.iz, self.iy, self.ix)  # type: ignore[operator]

    def __len__(self) -> int:
        return int(self.iz.size)

    def select(self, sub: tuple[slice, slice, slice]) -> np.ndarray | slice:
        """Indices of the points inside ``sub`` (slices relative to the box). Points are
        sorted by (z, y, x), so each z of the sub-box holds one contiguous run of rows:
        find the runs with searchsorted, then filter x only within them."""
        a = int(np.searchsorted(self.iz, sub[0].start, side="left"))
        b = int(np.searchsorted(self.iz, sub[0].stop, side="left"))
        ny, nx = self.shape[1], self.shape[2]
        full_y = sub[1].start <= 0 and sub[1].stop >= ny
        full_x = sub[2].start <= 0 and sub[2].stop >= nx
        if full_y and full_x:
            return slice(a, b)
        if full_y:
            ix = self.ix[a:b]
            return a + np.flatnonzero((ix >= sub[2].start) & (ix < sub[2].stop))
        zs = np.arange(sub[0].start, sub[0].stop, dtype=np.int64)
        starts = np.searchsorted(self.lin, (zs * ny + sub[1].start) * nx)
        stops = np.searchsorted(self.lin, (zs * ny + sub[1].stop) * nx)
        lengths = stops - starts
        total = int(lengths.sum())
        if total == 0:
            return np.empty(0, dtype=np.int64)
        offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths)
        idx = offsets + np.arange(total, dtype=np.int64)
        if full_x:
            return idx
        ix = self.ix[idx]
        return idx[(ix >= sub[2].start) & (ix < sub[2].stop)]

    def take(self, sel: np.ndarray | slice) -> Coords:
        return self.coords[0][sel], self.coords[1][sel], self.coords[2][sel]

    def flat_global(self, sel: np.ndarray | slice, grid: Grid) -> np.ndarray:
        _, ny, nx = grid.shape
        z = self.iz[sel].astype(np.int64) + self.box[0].start
        y = self.iy[sel].astype(np.int64) + self.box[1].start
        x = self.ix[sel].astype(np.int64) + self.box[2].start
        return (z * ny + y) * nx + x

    def extent(self, sel: np.ndarray | slice, hit: np.ndarray) -> Extent:
        """Per-slice boxes (whole-volume indices) of the selected points where ``hit``."""
        ext = Extent()
        if not hit.any():
            return ext
        z = self.iz[sel][hit] + self.box[0].start
        y = self.iy[sel][hit] + self.box[1].start
        x = self.ix[sel][hit] + self.box[2].start
        order = np.argsort(z, kind="stable")
        z, y, x = z[order], y[order], x[order]
        starts = np.flatnonzero(np.r_[True, z[1:] != z[:-1]])
        for zz, y0, x0, y1, x1 in zip(z[starts], np.minimum.reduceat(y, starts),
                                      np.minimum.reduceat(x, starts),
                                      np.maximum.reduceat(y, starts),
                                      np.maximum.reduceat(x, starts), strict=True):
            ext.add_box(int(zz), int(y0), int(x0), int(y1) + 1, int(x1) + 1)
        return ext


def _sub_box(obj: BoneObject, grid: Grid, box: Box, shape: Shape,
             pad: float) -> tuple[slice, slice, slice] | None:
    """Slices *relative to* ``box`` covering ``shape``'s bounds (plus ``pad`` mm)."""
    lo, hi = shape.bounds()
    wlo, whi = obj.world_box(np.asarray(lo) - pad, np.asarray(hi) + pad)
    sub = grid.box_of(wlo, whi)
    if sub is None:
        return None
    out = []
    for s, b in zip(sub, box, strict=True):
        a, e = max(s.start, b.start) - b.start, min(s.stop, b.stop) - b.start
        if a >= e:
            return None
        out.append(slice(a, e))
    return out[0], out[1], out[2]


@dataclass
class Extent:
    """Where a lesion changed bone: per-slice pixel boxes ``z -> [y0, x0, y1, x1]`` (end
    exclusive), in whole-volume indices."""

    slices: dict[int, list[int]] = field(default_factory=dict)

    def add_mask(self, mask: np.ndarray, box: Box, sub: tuple[slice, slice, slice]) -> None:
        if not mask.any():
            return
        oz = box[0].start + sub[0].start
        oy = box[1].start + sub[1].start
        ox = box[2].start + sub[2].start
        for kz in np.flatnonzero(mask.any(axis=(1, 2))):
            plane = mask[kz]
            rows = np.flatnonzero(plane.any(axis=1))
            cols = np.flatnonzero(plane.any(axis=0))
            self.add_box(int(oz + kz), int(oy + rows[0]), int(ox + cols[0]),
                         int(oy + rows[-1] + 1), int(ox + cols[-1] + 1))

    def add_box(self, z: int, y0: int, x0: int, y1: int, x1: int) -> None:
        cur = self.slices.get(z)
        if cur is None:
            self.slices[z] = [y0, x0, y1, x1]
        else:
            self.slices[z] = [min(cur[0], y0), min(cur[1], x0), max(cur[2], y1),
                              max(cur[3], x1)]

    def merge(self, other: Extent) -> None:
        for z, b in other.slices.items():
            self.add_box(z, *b)

    @property
    def bbox(self) -> BBox | None:
        if not self.slices:
            return None
        zs = sorted(self.slices)
        boxes = np.asarray(list(self.slices.values()))
        return (zs[0], int(boxes[:, 0].min()), int(boxes[:, 1].min()), zs[-1] + 1,
                int(boxes[:, 2].max()), int(boxes[:, 3].max()))

    def slice_boxes(self) -> tuple[tuple[int, int, int, int, int], ...]:
        return tuple((z, *self.slices[z]) for z in sorted(self.slices))  # type: ignore[misc]


def _texture(p: Coords, seed: int, amplitude: float) -> np.ndarray:
    """Trabecular texture (HU): plane waves with 1.2-3.5 mm wavelengths, mostly varying
    in-plane so the pattern is elongated along w like vertical trabeculae."""
    rng = np.random.default_rng([seed, 7919])
    out = np.zeros(p[0].shape, dtype=np.float32)
    n = 6
    for _ in range(n):
        wavelength = rng.uniform(1.2, 3.5)
        direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.45])
        direction /= np.linalg.norm(direction)
        k = (2 * math.pi / wavelength) * direction
        phase = np.float32(rng.uniform(0, 2 * math.pi))
        out += np.cos(np.float32(k[0]) * p[0] + np.float32(k[1]) * p[1]
                      + np.float32(k[2]) * p[2] + phase)
    out *= np.float32(amplitude / math.sqrt(n / 2))
    return out


BLOCK_MM = 3.0
"""Edge of the blocks used to skip empty space: a block is evaluated voxel by voxel only
when the shape's distance at its centre says bone may be inside."""


def _active_mask(obj: BoneObject, grid: Grid, box: Box, edge_mm: float) -> np.ndarray:
    """Boolean mask over ``box``: voxels in blocks that may hold bone (conservative)."""
    shape = tuple(b.stop - b.start for b in box)
    step = [max(1, int(round(BLOCK_MM / grid.spacing[a]))) for a in range(3)]
    nb = [-(-shape[a] // step[a]) for a in range(3)]
    centers = []
    for a in range(3):
        idx = box[a].start + np.minimum(np.arange(nb[a]) * step[a] + 0.5 * (step[a] - 1),
                                        shape[a] - 1)
        lps_index = 2 - a
        centers.append((grid.origin[lps_index] + idx * grid.spacing[a]).astype(np.float32))
    dz = centers[0][:, None, None] - np.float32(obj.center[2])
    dy = centers[1][None, :, None] - np.float32(obj.center[1])
    dx = centers[2][None, None, :] - np.float32(obj.center[0])
    r = obj.rot.astype(np.float32)
    coords: Coords = tuple(  # type: ignore[assignment]
        (r[0, k] * dx + r[1, k] * dy + r[2, k] * dz).astype(np.float32) for k in range(3))
    for warp in obj.warps:
        coords = warp(coords)
    d = np.full(coords[0].shape, np.float32(1e3), dtype=np.float32)
    for part in obj.parts:
        np.minimum(d, part.sdf(coords), out=d)
    for carve in obj.carves:
        if carve.fill_hu is None and carve.margin_mm == 0:
            np.maximum(d, -carve.shape.sdf(coords), out=d)
    for addition in obj.additions:
        np.minimum(d, addition.sdf(coords), out=d)
    half_diag = 0.5 * float(np.sqrt(sum((step[a] * grid.spacing[a]) ** 2 for a in range(3))))
    active = d < np.float32(1.5 * half_diag + edge_mm + obj.warp_margin_mm + 0.5)
    full = active.repeat(step[0], 0).repeat(step[1], 1).repeat(step[2], 2)
    return full[:shape[0], :shape[1], :shape[2]]


def render_bone(obj: BoneObject, grid: Grid, edge_mm: float) -> Rendered | None:
    """Evaluate one bone on ``grid``. Pure (reads nothing global): safe to run in threads."""
    lo, hi = obj.local_bounds()
    box = grid.box_of(*obj.world_box(lo, hi))
    if box is None:
        return None
    mask = _active_mask(obj, grid, box, edge_mm)
    if not mask.any():
        return None
    axes = [grid.axis(a)[box[a]] for a in range(3)]
    r = obj.rot.astype(np.float32)
    c = obj.center.astype(np.float32)

    def coords_of(iz: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> Coords:
        dx = axes[2][ix] - c[0]
        dy = axes[1][iy] - c[1]
        dz = axes[0][iz] - c[2]
        return tuple(r[0, k] * dx + r[1, k] * dy + r[2, k] * dz  # type: ignore[return-value]
                     for k in range(3))

    pts = _Points(box, mask, coords_of)
    for warp in obj.warps:
        pts.coords = warp(pts.coords)
    n = len(pts)
    d = np.full(n, np.float32(1e3), dtype=np.float32)
    pad = obj.warp_margin_mm + edge_mm + 0.5

    def evaluate(shape: Shape, extra: float = 0.0) -> tuple[np.ndarray | slice, np.ndarray] | None:
        sub = _sub_box(obj, grid, box, shape, pad + extra)
        if sub is None:
            return None
        sel = pts.select(sub)
        if isinstance(sel, np.ndarray) and sel.size == 0:
            return None
        return sel, shape.sdf(pts.take(sel))

    for part in obj.parts:
        found = evaluate(part)
        if found is not None:
            sel, ds = found
            d[sel] = np.minimum(d[sel], ds)

    truth: dict[str, Extent] = {}
    d_cortex: np.ndarray | None = None  # distance used for cortex where acute carves exist
    sclerosis = np.zeros(n, dtype=np.float32)
    fills: list[tuple[np.ndarray, np.ndarray, float]] = []
    for carve in obj.carves:
        found = evaluate(carve.shape, carve.margin_mm)
        if found is None:
            continue
        sel, dc = found
        dsub = d[sel]
        if carve.truth:
            changed = (dsub < 0) & (-dc > dsub)  # bone voxels the carve changed
            truth.setdefault(carve.truth, Extent()).merge(pts.extent(sel, changed))
        if carve.margin_mm > 0:
            rim = np.clip(1.0 - dc / np.float32(carve.margin_mm), 0, 1) * (dc > -edge_mm)
            sclerosis[sel] = np.maximum(sclerosis[sel], rim * np.float32(carve.sclerosis_hu))
        if not carve.corticate and d_cortex is None:
            d_cortex = d.copy()
        d[sel] = np.maximum(dsub, -dc)
        if carve.corticate and d_cortex is not None:
            d_cortex[sel] = np.maximum(d_cortex[sel], -dc)
        if carve.fill_hu is not None:
            weight = np.clip(0.5 - dc / np.float32(edge_mm), 0, 1)
            keep = weight > 0
            fills.append((pts.flat_global(sel, grid)[keep], weight[keep], carve.fill_hu))
    for addition in obj.additions:
        found = evaluate(addition)
        if found is not None:
            sel, ds = found
            d[sel] = np.minimum(d[sel], ds)
            if d_cortex is not None:
                d_cortex[sel] = np.minimum(d_cortex[sel], ds)
    for scl in obj.scleroses:
        found = evaluate(scl.shape)
        if found is None:
            continue
        sel, ds = found
        weight = np.clip(0.5 - ds / np.float32(edge_mm), 0, 1)
        if scl.truth:
            truth.setdefault(scl.truth, Extent()).merge(
                pts.extent(sel, (weight > 0.5) & (d[sel] < 0)))
        sclerosis[sel] = np.maximum(sclerosis[sel], weight * np.float32(scl.hu))

    # Acute fracture gaps are part of the vertebra for the labels (annotators outline the
    # whole vertebra), so labels and cortex use the distance without those gaps.
    d_label = d_cortex if d_cortex is not None else d
    near = np.flatnonzero(d_label < np.float32(0.5 * edge_mm))
    depth = -d_label[near]
    in_label = depth >= 0
    d = d[near]
    fraction = np.clip(np.float32(0.5) - d / np.float32(edge_mm), 0, 1)
    cortex_w = np.clip(np.float32(0.5) + (np.float32(obj.cortex_mm) - depth)
                       / np.float32(edge_mm), 0, 1)
    local = (pts.coords[0][near], pts.coords[1][near], pts.coords[2][near])
    cancellous = _texture(local, obj.texture_seed, obj.texture_hu)
    cancellous += np.float32(obj.cancellous_hu)
    bone = cancellous + cortex_w * (np.float32(obj.cortex_hu) - cancellous) + sclerosis[near]
    return Rendered(obj.name, obj.label, pts.flat_global(near, grid), fraction, bone, fills,
                    truth, in_label)


def composite(rendered: Rendered, hu: np.ndarray, labels: np.ndarray | None) -> None:
    """Blend a rendered bone into the volume in place (call in a fixed order). A negative
    label (metal) leaves the labels untouched."""
    flat = hu.reshape(-1)
    values = flat[rendered.index]
    values += rendered.fraction * (rendered.bone_hu - values)
    flat[rendered.index] = values
    if labels is not None and rendered.label >= 0:
        mask = rendered.in_label if rendered.in_label is not None else rendered.fraction >= 0.5
        labels.reshape(-1)[rendered.index[mask]] = rendered.label
    for index, weight, value in rendered.fill:
        v = flat[index]
        v += weight * (np.float32(value) - v)
        flat[index] = v
