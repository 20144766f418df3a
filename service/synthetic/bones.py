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
    """A bone's contribution inside ``box``: blend ``bone_hu`` with weight ``fraction``."""

    name: str
    label: int
    box: Box
    fraction: np.ndarray
    bone_hu: np.ndarray
    fill: list[tuple[Box, np.ndarray, float]]
    truth: dict[str, Extent]


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


def render_bone(obj: BoneObject, grid: Grid, edge_mm: float) -> Rendered | None:
    """Evaluate one bone on ``grid``. Pure (reads nothing global): safe to run in threads."""
    lo, hi = obj.local_bounds()
    box = grid.box_of(*obj.world_box(lo, hi))
    if box is None:
        return None
    zs, ys, xs = (grid.axis(a)[box[a]] for a in range(3))
    dx = xs[None, None, :] - np.float32(obj.center[0])
    dy = ys[None, :, None] - np.float32(obj.center[1])
    dz = zs[:, None, None] - np.float32(obj.center[2])
    r = obj.rot.astype(np.float32)
    coords: Coords = tuple(  # type: ignore[assignment]
        (r[0, k] * dx + r[1, k] * dy + r[2, k] * dz).astype(np.float32, copy=False)
        for k in range(3))
    for warp in obj.warps:
        coords = warp(coords)
    shape3 = coords[0].shape
    big = np.float32(1e3)
    d = np.full(shape3, big, dtype=np.float32)
    pad = obj.warp_margin_mm + edge_mm + 0.5

    def sub_coords(sub: tuple[slice, slice, slice]) -> Coords:
        return coords[0][sub], coords[1][sub], coords[2][sub]

    for part in obj.parts:
        sub = _sub_box(obj, grid, box, part, pad)
        if sub is not None:
            np.minimum(d[sub], part.sdf(sub_coords(sub)), out=d[sub])

    truth: dict[str, Extent] = {}
    sclerosis = np.zeros(shape3, dtype=np.float32)
    fills: list[tuple[Box, np.ndarray, float]] = []
    for carve in obj.carves:
        sub = _sub_box(obj, grid, box, carve.shape, pad + carve.margin_mm)
        if sub is None:
            continue
        dc = carve.shape.sdf(sub_coords(sub))
        dsub = d[sub]
        if carve.truth:
            truth.setdefault(carve.truth, Extent()).add_mask((dsub < 0) & (dc < 0), box, sub)
        if carve.margin_mm > 0:
            rim = np.clip(1.0 - dc / np.float32(carve.margin_mm), 0, 1) * (dc > -edge_mm)
            np.maximum(sclerosis[sub], rim * np.float32(carve.sclerosis_hu), out=sclerosis[sub])
        np.maximum(dsub, -dc, out=dsub)
        if carve.fill_hu is not None:
            weight = np.clip(0.5 - dc / np.float32(edge_mm), 0, 1)
            absolute = tuple(slice(b.start + s.start, b.start + s.stop)
                             for b, s in zip(box, sub, strict=True))
            fills.append((absolute, weight, carve.fill_hu))  # type: ignore[arg-type]
    for addition in obj.additions:
        sub = _sub_box(obj, grid, box, addition, pad)
        if sub is not None:
            np.minimum(d[sub], addition.sdf(sub_coords(sub)), out=d[sub])
    for scl in obj.scleroses:
        sub = _sub_box(obj, grid, box, scl.shape, pad)
        if sub is None:
            continue
        ds = scl.shape.sdf(sub_coords(sub))
        weight = np.clip(0.5 - ds / np.float32(edge_mm), 0, 1)
        if scl.truth:
            truth.setdefault(scl.truth, Extent()).add_mask((weight > 0.5) & (d[sub] < 0),
                                                           box, sub)
        np.maximum(sclerosis[sub], weight * np.float32(scl.hu), out=sclerosis[sub])

    fraction = np.clip(np.float32(0.5) - d / np.float32(edge_mm), 0, 1)
    depth = -d
    cortex_w = np.clip(np.float32(0.5) + (np.float32(obj.cortex_mm) - depth)
                       / np.float32(edge_mm), 0, 1)
    cancellous = _texture(coords, obj.texture_seed, obj.texture_hu)
    cancellous += np.float32(obj.cancellous_hu)
    bone = cancellous + cortex_w * (np.float32(obj.cortex_hu) - cancellous) + sclerosis
    return Rendered(obj.name, obj.label, box, fraction, bone, fills, truth)


def composite(rendered: Rendered, hu: np.ndarray, labels: np.ndarray) -> None:
    """Blend a rendered bone into the volume in place (call in a fixed order)."""
    view = hu[rendered.box]
    view += rendered.fraction * (rendered.bone_hu - view)
    mask = rendered.fraction >= 0.5
    labels[rendered.box][mask] = rendered.label
    for box, weight, value in rendered.fill:
        v = hu[box]
        v += weight * (np.float32(value) - v)
