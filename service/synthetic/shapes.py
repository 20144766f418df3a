"""Implicit shapes (approximate signed distances, mm) used to build bones.

Every shape is defined in the *local frame of the bone it belongs to* (u towards the
patient's left, v towards the back, w towards the head; mm; origin at the bone's centre)
and returns an approximate signed distance in mm: negative inside, positive outside. The
distances are exact for capsules and boxes and a radial approximation for ellipsoids;
errors of a few tenths of a mm near elongated ends do not matter at CT resolution.

Each shape also reports its local axis-aligned bounds so the renderer only evaluates it
inside a small voxel sub-box: that is what keeps a 512x512x300 phantom fast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Vec = tuple[float, float, float]
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: roll about u (sagittal tilt of the w axis towards -v when positive),
    then pitch about v, then yaw about w. Columns are the rotated axes."""
    a, b, c = (math.radians(x) for x in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[1, 0, 0], [0, math.cos(c), -math.sin(c)], [0, math.sin(c), math.cos(c)]])
    return (rz @ ry @ rx).astype(np.float64)


def _to_frame(p: Coords, center: Vec, rot: np.ndarray | None) -> Coords:
    """Coordinates relative to ``center``, expressed in the shape's own axes (``rot``
    columns, given in the parent frame)."""
    u = p[0] - np.float32(center[0])
    v = p[1] - np.float32(center[1])
    w = p[2] - np.float32(center[2])
    if rot is None:
        return u, v, w
    r = rot.astype(np.float32)
    return (r[0, 0] * u + r[1, 0] * v + r[2, 0] * w,
            r[0, 1] * u + r[1, 1] * v + r[2, 1] * w,
            r[0, 2] * u + r[1, 2] * v + r[2, 2] * w)


def _box_bounds(center: Vec, half: Vec, rot: np.ndarray | None, pad: float) -> tuple[Vec, Vec]:
    h = np.asarray(half, dtype=np.float64) + pad
    if rot is not None:
        h = np.abs(rot) @ h
    c = np.asarray(center, dtype=np.float64)
    lo, hi = c - h, c + h
    return (float(lo[0]), float(lo[1]), float(lo[2])), (float(hi[0]), float(hi[1]), float(hi[2]))


class Shape:
    """Base class: ``sdf(p)`` on local coordinate arrays, ``bounds()`` in the same frame."""

    def sdf(self, p: Coords) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def bounds(self) -> tuple[Vec, Vec]:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Ellipsoid(Shape):
    """Superellipsoid: in-plane exponent ``p_xy``, through-plane exponent ``p_z`` (2 and 2 is
    an ellipsoid; larger exponents square it off, e.g. flat vertebral endplates)."""

    center: Vec
    axes: Vec
    rot: np.ndarray | None = None
    p_xy: float = 2.0
    p_z: float = 2.0

    def sdf(self, p: Coords) -> np.ndarray:
        u, v, w = _to_frame(p, self.center, self.rot)
        a, b, c = (np.float32(x) for x in self.axes)
        if self.p_xy == 2.0 and self.p_z == 2.0:
            n = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)
        else:
            pxy, pz = np.float32(self.p_xy), np.float32(self.p_z)
            n_xy = np.abs(u / a) ** pxy + np.abs(v / b) ** pxy
            n = (n_xy ** (pz / pxy) + np.abs(w / c) ** pz) ** (1.0 / pz)
        r = np.sqrt(u * u + v * v + w * w)
        return r - r / np.maximum(n, np.float32(1e-6))

    def bounds(self) -> tuple[Vec, Vec]:
        return _box_bounds(self.center, self.axes, self.rot, 0.5)


@dataclass
class Capsule(Shape):
    """Rounded cone from ``a`` (radius ``ra``) to ``b`` (radius ``rb``); ``flatten`` < 1
    squashes the cross-section along ``flat_axis`` (a unit vector), making a plate-like rod
    (laminae, arches)."""

    a: Vec
    b: Vec
    ra: float
    rb: float
    flatten: float = 1.0
    flat_axis: Vec = (0.0, 0.0, 1.0)

    def sdf(self, p: Coords) -> np.ndarray:
        ax, ay, az = (np.float32(x) for x in self.a)
        d = np.array(self.b, dtype=np.float64) - np.array(self.a, dtype=np.float64)
        length2 = float(d @ d) or 1e-9
        du, dv, dw = (np.float32(x) for x in d)
        pu, pv, pw = p[0] - ax, p[1] - ay, p[2] - az
        t = np.clip((pu * du + pv * dv + pw * dw) / np.float32(length2), 0.0, 1.0)
        qu, qv, qw = pu - t * du, pv - t * dv, pw - t * dw
        r = np.float32(self.ra) + t * np.float32(self.rb - self.ra)
        if self.flatten != 1.0:
            # Elliptical cross-section: half-size r, and r * flatten along the flat axis.
            # The distance is scaled back along the ray so cortex depth stays in mm.
            fa = np.asarray(self.flat_axis, dtype=np.float64)
            fa = fa - d * (fa @ d) / length2
            fa /= max(float(np.linalg.norm(fa)), 1e-9)
            fu, fv, fw = (np.float32(x) for x in fa)
            along = qu * fu + qv * fv + qw * fw
            q2 = qu * qu + qv * qv + qw * qw
            a2 = along * along
            inv_f2 = np.float32(1.0 / self.flatten ** 2)
            stretched = q2 + a2 * (inv_f2 - 1)
            eps = np.float32(0.01)  # mm^2: on the axis the direction is undefined
            gain = np.sqrt((q2 + eps) / (stretched + eps))
            return (np.sqrt(stretched) - r) * gain
        return np.sqrt(qu * qu + qv * qv + qw * qw) - r

    def bounds(self) -> tuple[Vec, Vec]:
        r = max(self.ra, self.rb) + 0.5
        lo = tuple(min(x, y) - r for x, y in zip(self.a, self.b, strict=True))
        hi = tuple(max(x, y) + r for x, y in zip(self.a, self.b, strict=True))
        return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


@dataclass
class RoundBox(Shape):
    """Box of half-sizes ``half`` with edges rounded by ``radius`` (inside the half-sizes)."""

    center: Vec
    half: Vec
    rot: np.ndarray | None = None
    radius: float = 1.0

    def sdf(self, p: Coords) -> np.ndarray:
        u, v, w = _to_frame(p, self.center, self.rot)
        r = np.float32(self.radius)
        qu = np.abs(u) - np.float32(self.half[0]) + r
        qv = np.abs(v) - np.float32(self.half[1]) + r
        qw = np.abs(w) - np.float32(self.half[2]) + r
        outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2
                          + np.maximum(qw, 0) ** 2)
        inside = np.minimum(np.maximum(np.maximum(qu, qv), qw), 0)
        return outside + inside - r

    def bounds(self) -> tuple[Vec, Vec]:
        return _box_bounds(self.center, self.half, self.rot, 0.5)


@dataclass
class Cylinder(Shape):
    """Finite cylinder of ``radius`` along the shape's local w axis, half length ``half_len``."""

    center: Vec
    radius: float
    half_len: float
    rot: np.ndarray | None = None

    def sdf(self, p: Coords) -> np.ndarray:
        u, v, w = _to_frame(p, self.center, self.rot)
        dr = np.sqrt(u * u + v * v) - np.float32(self.radius)
        dz = np.abs(w) - np.float32(self.half_len)
        outside = np.sqrt(np.maximum(dr, 0) ** 2 + np.maximum(dz, 0) ** 2)
        return outside + np.minimum(np.maximum(dr, dz), 0)

    def bounds(self) -> tuple[Vec, Vec]:
        return _box_bounds(self.center, (self.radius, self.radius, self.half_len), self.rot, 0.5)


@dataclass
class Ring(Shape):
    """A ring whose centreline is an ellipse (semi-axes ``ru``, ``rv``) in the local u-v
    plane, with an elliptical tube cross-section (``thick`` radially, ``height`` along w,
    both half-sizes), restricted to the angles ``theta`` (radians from +u towards +v) in
    ``[theta0, theta1]``. Used for the C1 arches."""

    center: Vec
    ru: float
    rv: float
    thick: float
    height: float
    theta0: float = -math.pi
    theta1: float = math.pi
    rot: np.ndarray | None = None

    def sdf(self, p: Coords) -> np.ndarray:
        u, v, w = _to_frame(p, self.center, self.rot)
        rho = np.sqrt((u / np.float32(self.ru)) ** 2 + (v / np.float32(self.rv)) ** 2)
        r = np.sqrt(u * u + v * v)
        radial = r - r / np.maximum(rho, np.float32(1e-6))
        n = np.sqrt((radial / np.float32(self.thick)) ** 2 + (w / np.float32(self.height)) ** 2)
        d = (n - 1) * np.float32(min(self.thick, self.height))
        if self.theta1 - self.theta0 < 2 * math.pi - 1e-6:
            theta = np.arctan2(v / np.float32(self.rv), u / np.float32(self.ru))
            mid = 0.5 * (self.theta0 + self.theta1)
            half = 0.5 * (self.theta1 - self.theta0)
            wrapped = np.mod(theta - np.float32(mid) + np.float32(math.pi),
                             np.float32(2 * math.pi)) - np.float32(math.pi)
            dev = np.abs(wrapped) - np.float32(half)
            d = np.maximum(d, dev * np.float32(0.5 * (self.ru + self.rv)))
        return d

    def bounds(self) -> tuple[Vec, Vec]:
        half = (self.ru + self.thick, self.rv + self.thick, self.height)
        return _box_bounds(self.center, half, self.rot, 0.5)


@dataclass
class Slab(Shape):
    """The slab ``|n.(p - point)| <= half_width``, limited to a disc of ``radius`` around
    ``point`` in the plane (a crack or a cut). ``n`` need not be normalised."""

    point: Vec
    normal: Vec
    half_width: float
    radius: float

    def sdf(self, p: Coords) -> np.ndarray:
        n = np.asarray(self.normal, dtype=np.float64)
        n = n / np.linalg.norm(n)
        nu, nv, nw = (np.float32(x) for x in n)
        pu = p[0] - np.float32(self.point[0])
        pv = p[1] - np.float32(self.point[1])
        pw = p[2] - np.float32(self.point[2])
        s = pu * nu + pv * nv + pw * nw
        inplane = np.sqrt(np.maximum(pu * pu + pv * pv + pw * pw - s * s, 0))
        return np.maximum(np.abs(s) - np.float32(self.half_width),
                          inplane - np.float32(self.radius))

    def bounds(self) -> tuple[Vec, Vec]:
        r = self.radius + self.half_width + 0.5
        c = self.point
        return (c[0] - r, c[1] - r, c[2] - r), (c[0] + r, c[1] + r, c[2] + r)
