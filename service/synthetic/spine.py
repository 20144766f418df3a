"""Geometry of the cervical spine, skull base and upper thorax of one synthetic patient.

Every vertebra gets a local frame (origin at the centre of its body, or for C1 at the dens
axis; u towards the patient's left, v towards the back, w towards the head, in mm) placed
along a sagittal curve with a random lordosis, then rotated with the whole patient. The
shapes inside a frame follow adult dimensions from the anatomical literature (body
width 16-22 mm, depth 15-17 mm, height 13-15 mm; canal 22-25 mm wide and 14-17 mm deep;
facets inclined about 45 degrees), scaled per patient and jittered per level.

Dimensions are half-sizes unless the name says otherwise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from service.synthetic.bones import BoneObject, Carve
from service.synthetic.options import LABEL_OF
from service.synthetic.shapes import (
    Capsule,
    Coords,
    Cylinder,
    Ellipsoid,
    RoundBox,
    Shape,
    Vec,
    rotation,
)

logger = logging.getLogger(__name__)

SUBAXIAL = ("C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3")
BODY_LEVELS = ("C2",) + SUBAXIAL

# Half width (u), half depth (v), half height (w) of the body, mm, average adult.
BODY_DIMS: dict[str, tuple[float, float, float]] = {
    "C2": (8.6, 7.8, 8.0), "C3": (8.1, 7.4, 6.7), "C4": (8.4, 7.6, 6.7),
    "C5": (8.9, 7.8, 6.7), "C6": (9.8, 8.0, 6.9), "C7": (11.0, 8.3, 7.3),
    "T1": (12.5, 8.6, 8.0), "T2": (13.4, 9.3, 8.5), "T3": (14.0, 10.2, 9.0),
}
# Disc height below each level, mm (full height).
DISC_BELOW: dict[str, float] = {
    "C2": 4.2, "C3": 4.8, "C4": 5.2, "C5": 5.3, "C6": 5.1, "C7": 4.6, "T1": 3.8, "T2": 3.9,
}
# Canal half width / half depth, mm.
CANAL: dict[str, tuple[float, float]] = {
    "C2": (11.5, 8.5), "C3": (12.2, 7.3), "C4": (12.5, 7.2), "C5": (12.7, 7.2),
    "C6": (12.6, 7.2), "C7": (11.8, 7.4), "T1": (9.5, 7.6), "T2": (8.5, 7.6), "T3": (8.2, 7.6),
}
# Spinous process: length from the lamina junction (mm) and drop along -w (mm).
SPINOUS: dict[str, tuple[float, float]] = {
    "C2": (17.0, 7.0), "C3": (12.0, 5.0), "C4": (12.5, 5.5), "C5": (14.0, 6.5),
    "C6": (18.0, 8.0), "C7": (27.0, 11.0), "T1": (30.0, 16.0), "T2": (32.0, 20.0),
    "T3": (33.0, 23.0),
}


@dataclass
class Level:
    """One vertebra's frame and size, shared by the bone builders and the soft tissue."""

    name: str
    center: np.ndarray
    rot: np.ndarray
    body: tuple[float, float, float]
    canal: tuple[float, float]

    def to_world(self, local: Vec) -> np.ndarray:
        return self.center + self.rot @ np.asarray(local, dtype=np.float64)


@dataclass
class BoneHU:
    """Per-patient bone density (HU) after osteopenia."""

    cortex: float
    cancellous: float
    cortex_mm: float


@dataclass
class SpineGeometry:
    levels: dict[str, Level]
    c1: Level
    skull: Level
    scale: float
    lordosis_deg: float
    bone: BoneHU
    discs: list[tuple[str, str]] = field(default_factory=list)

    def body_axis_samples(self) -> np.ndarray:
        """(n, 3) LPS points along the anterior column from T3 up to the dens, ascending z:
        the soft tissue is laid out around this curve."""
        pts = [self.levels[n].center for n in reversed(BODY_LEVELS) if n in self.levels]
        pts.append(self.c1.center)
        pts.append(self.skull.center)
        arr = np.asarray(pts)
        return arr[np.argsort(arr[:, 2])]


def _sagittal(theta_deg: float) -> np.ndarray:
    """Frame whose w axis leans anteriorly (towards -y) by theta degrees."""
    t = math.radians(theta_deg)
    return np.array([[1.0, 0.0, 0.0],
                     [0.0, math.cos(t), -math.sin(t)],
                     [0.0, math.sin(t), math.cos(t)]])


def build_geometry(rng: np.random.Generator, scale: float, lordosis_deg: float,
                   patient_rot_deg: tuple[float, float, float], osteopenia: float,
                   c4_center: Vec) -> SpineGeometry:
    """Lay the levels out along the sagittal curve, C4's body centre at ``c4_center``."""
    inclination = float(np.clip(rng.normal(12.0, 6.0), -2.0, 26.0))
    thetas: dict[str, float] = {}
    cervical = ("C2", "C3", "C4", "C5", "C6", "C7")
    for i, name in enumerate(cervical):
        thetas[name] = inclination + lordosis_deg * (i / (len(cervical) - 1) - 0.5)
    thetas["T1"] = thetas["C7"] + 2.0
    thetas["T2"] = thetas["C7"] - 1.0
    thetas["T3"] = thetas["C7"] - 4.0

    def up(theta: float) -> np.ndarray:
        t = math.radians(theta)
        return np.array([0.0, -math.sin(t), math.cos(t)])

    dims = {n: tuple(scale * x * rng.uniform(0.96, 1.04) for x in BODY_DIMS[n])
            for n in BODY_LEVELS}
    centers: dict[str, np.ndarray] = {"C2": np.zeros(3)}
    for upper, lower in zip(BODY_LEVELS[:-1], BODY_LEVELS[1:], strict=True):
        disc = DISC_BELOW[upper] * scale * rng.uniform(0.85, 1.1)
        mid = 0.5 * (thetas[upper] + thetas[lower])
        centers[lower] = (centers[upper] - up(thetas[upper]) * dims[upper][2]
                          - up(mid) * disc - up(thetas[lower]) * dims[lower][2])
        centers[lower][0] += rng.normal(0.0, 0.5)
    shift = np.asarray(c4_center, dtype=np.float64) - centers["C4"]
    g = rotation(*patient_rot_deg)
    pivot = np.asarray(c4_center, dtype=np.float64)
    levels: dict[str, Level] = {}
    for name in BODY_LEVELS:
        jitter = rotation(rng.normal(0, 1.5), rng.normal(0, 1.0), rng.normal(0, 1.0))
        rot = g @ _sagittal(thetas[name]) @ jitter
        center = pivot + g @ (centers[name] + shift - pivot)
        canal = tuple(scale * x * rng.uniform(0.95, 1.05) for x in CANAL[name])
        levels[name] = Level(name, center, rot, dims[name], canal)  # type: ignore[arg-type]
    c2 = levels["C2"]
    c1_rot = c2.rot @ rotation(rng.normal(0, 2.0), 0.0, rng.normal(-4.0, 3.0))
    c1_center = c2.to_world((0.0, 1.3 * scale, c2.body[2] + 11.0 * scale))
    c1 = Level("C1", c1_center, c1_rot, (0.0, 0.0, 0.0), (14.0 * scale, 14.0 * scale))
    skull_rot = c1_rot @ rotation(rng.normal(0, 1.5), 0.0, rng.normal(-6.0, 4.0))
    skull = Level("skull", c1.center + c1_rot @ np.array([0.0, 2.0, 13.0 * scale]),
                  skull_rot, (0.0, 0.0, 0.0), (0.0, 0.0))
    # Bone density: osteopenia lowers cancellous HU and thins the cortex.
    bone = BoneHU(cortex=float(rng.uniform(1150, 1450) - 380 * osteopenia),
                  cancellous=float(rng.uniform(250, 330) - 150 * osteopenia),
                  cortex_mm=float((1.0 - 0.35 * osteopenia) * rng.uniform(0.9, 1.15)))
    discs = list(zip(BODY_LEVELS[:-1], BODY_LEVELS[1:], strict=True))
    return SpineGeometry(levels, c1, skull, scale, lordosis_deg, bone, discs)


# --------------------------------------------------------------------------- shapes


@dataclass
class VertebralBody(Shape):
    """Vertebral body: a squarish cylinder with flat endplates, uncinate processes rising at
    the posterolateral rim of the superior endplate, and an anterior-inferior lip."""

    a: float
    b: float
    c: float
    uncinate: float = 0.0
    lip: float = 0.0
    center: Vec = (0.0, 0.0, 0.0)
    height_scale: float = 1.0

    def sdf(self, p: Coords) -> np.ndarray:
        u = p[0] - np.float32(self.center[0])
        v = p[1] - np.float32(self.center[1])
        w = p[2] - np.float32(self.center[2])
        a, b = np.float32(self.a), np.float32(self.b)
        au, bv = np.abs(u / a), np.abs(v / b)
        nxy = (au ** 2.6 + bv ** 2.6) ** np.float32(1 / 2.6)
        c = np.float32(self.c * self.height_scale)
        if self.uncinate or self.lip:
            lateral = np.clip((au - 0.62) / 0.38, 0, 1) ** 2
            posterior = np.clip(0.5 + v / b, 0, 1)
            top = c + np.float32(self.uncinate) * lateral * posterior
            anterior = np.clip(-v / b - 0.3, 0, 1)
            bottom = c + np.float32(self.lip) * anterior * np.clip(1 - au, 0, 1)
            cw = np.where(w > 0, top, bottom)
        else:
            cw = c
        n = (nxy ** 4 + np.abs(w / cw) ** 4) ** np.float32(0.25)
        r = np.sqrt(u * u + v * v + w * w)
        return r - r / np.maximum(n, np.float32(1e-6))

    def bounds(self) -> tuple[Vec, Vec]:
        top = self.c * self.height_scale + self.uncinate + 0.5
        bottom = self.c * self.height_scale + self.lip + 0.5
        c = self.center
        return ((c[0] - self.a - 0.5, c[1] - self.b - 0.5, c[2] - bottom),
                (c[0] + self.a + 0.5, c[1] + self.b + 0.5, c[2] + top))


@dataclass
class ShearedBox(Shape):
    """Articular pillar: a rounded box whose top and bottom faces slope down posteriorly
    (``w' = w + shear * v``), so stacked pillars meet at oblique facet joints."""

    center: Vec
    half: Vec
    shear: float
    radius: float = 1.5

    def sdf(self, p: Coords) -> np.ndarray:
        u = p[0] - np.float32(self.center[0])
        v = p[1] - np.float32(self.center[1])
        w = (p[2] - np.float32(self.center[2]) + np.float32(self.shear) * v) \
            * np.float32(1.0 / math.sqrt(1.0 + self.shear ** 2) * 1.25)
        r = np.float32(self.radius)
        qu = np.abs(u) - np.float32(self.half[0]) + r
        qv = np.abs(v) - np.float32(self.half[1]) + r
        qw = np.abs(w) - np.float32(self.half[2] / math.sqrt(1.0 + self.shear ** 2) * 1.25) + r
        outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2
                          + np.maximum(qw, 0) ** 2)
        return outside + np.minimum(np.maximum(np.maximum(qu, qv), qw), 0) - r

    def bounds(self) -> tuple[Vec, Vec]:
        c, h = self.center, self.half
        dw = h[2] + abs(self.shear) * h[1] + 0.5
        return ((c[0] - h[0] - 0.5, c[1] - h[1] - 0.5, c[2] - dw),
                (c[0] + h[0] + 0.5, c[1] + h[1] + 0.5, c[2] + dw))


# --------------------------------------------------------------------------- builders


@dataclass
class VertebraParts:
    """Named shapes of one vertebra, so lesions can target a structure by name."""

    body: list[Shape] = field(default_factory=list)
    dens: list[Shape] = field(default_factory=list)
    pedicles: list[Shape] = field(default_factory=list)
    pillars: list[Shape] = field(default_factory=list)
    laminae: list[Shape] = field(default_factory=list)
    spinous: list[Shape] = field(default_factory=list)
    transverse: list[Shape] = field(default_factory=list)
    arches: list[Shape] = field(default_factory=list)
    foramina: list[Shape] = field(default_factory=list)
    landmarks: dict[str, Vec] = field(default_factory=dict)
    """Local points lesions aim at: 'pedicle_l', 'lamina_r', 'spinous_mid', ..."""

    def all(self) -> list[Shape]:
        return (self.body + self.dens + self.pedicles + self.pillars + self.laminae
                + self.spinous + self.transverse + self.arches)


def _level_spacing(geo: SpineGeometry, name: str, above: bool) -> float:
    order = ("C2",) + SUBAXIAL
    i = order.index(name)
    j = i - 1 if above else i + 1
    if j < 0 or j >= len(order):
        return 2 * geo.levels[name].body[2] + 4.5 * geo.scale
    other = order[j]
    return (geo.levels[name].body[2] + geo.levels[other].body[2]
            + DISC_BELOW[order[min(i, j)]] * geo.scale)


def subaxial_parts(geo: SpineGeometry, name: str, rng: np.random.Generator) -> VertebraParts:
    lv = geo.levels[name]
    s = geo.scale
    a, b, c = lv.body
    ca, cb = lv.canal
    thoracic = name.startswith("T")
    parts = VertebraParts()
    parts.body.append(VertebralBody(a, b, c, uncinate=0.0 if thoracic else 3.2 * s,
                                    lip=1.4 * s))
    canal_back = b + 2 * cb
    pillar_u = ca + (3.5 if thoracic else 4.6) * s
    pillar_v = b + cb + (2.5 if thoracic else 0.8) * s
    spacing_up = _level_spacing(geo, name, above=True)
    spacing_down = _level_spacing(geo, name, above=False)
    pillar_h = 0.5 * (0.5 * (spacing_up + spacing_down)) - 0.9 * s
    shear = 1.6 if thoracic else 1.0
    for side in (-1.0, 1.0):
        ped_a = (side * (a - 2.6 * s), b - 2.0 * s, 0.4 * s)
        ped_b = (side * (ca + 2.0 * s), b + (6.0 if thoracic else 4.0) * s, 0.4 * s)
        parts.pedicles.append(Capsule(ped_a, ped_b, 3.1 * s, 3.0 * s, flatten=0.72,
                                      flat_axis=(1.0, 0.0, 0.0)))
        parts.landmarks["pedicle_" + ("l" if side > 0 else "r")] = tuple(  # type: ignore
            0.5 * (x + y) for x, y in zip(ped_a, ped_b, strict=True))
        parts.pillars.append(ShearedBox((side * pillar_u, pillar_v, -1.0 * s),
                                        (4.4 * s, 5.4 * s, pillar_h), shear, radius=2.8 * s))
        parts.landmarks["facet_joint_" + ("l" if side > 0 else "r")] = (
            side * pillar_u, pillar_v, -1.0 * s - pillar_h - 0.9 * s)
        lam_a = (side * (ca + 0.8 * s), canal_back - 1.5 * s, -0.5 * s)
        lam_b = (0.0, canal_back + 2.2 * s, -1.5 * s)
        du, dv = lam_b[0] - lam_a[0], lam_b[1] - lam_a[1]
        parts.laminae.append(Capsule(lam_a, lam_b, 5.0 * s, 4.6 * s, flatten=0.32,
                                     flat_axis=(-dv, du, 0.0)))
        parts.landmarks["lamina_" + ("l" if side > 0 else "r")] = tuple(  # type: ignore
            0.5 * (x + y) for x, y in zip(lam_a, lam_b, strict=True))
        if thoracic:
            tp_a = (side * (ca + 2.0 * s), b + cb + 2.0 * s, 0.5 * s)
            tp_b = (side * (ca + 17.0 * s), b + cb + 8.0 * s, 2.0 * s)
            parts.transverse.append(Capsule(tp_a, tp_b, 4.0 * s, 3.4 * s))
        elif name == "C7":
            parts.transverse.append(Capsule((side * (a - 1.5 * s), -1.5 * s, 0.0),
                                            (side * (a + 6.0 * s), -1.0 * s, -0.5 * s),
                                            1.4 * s, 1.4 * s))
            tp_a = (side * (ca + 2.0 * s), b + 2.5 * s, 0.0)
            tp_b = (side * (a + 17.0 * s), 3.5 * s, -2.0 * s)
            parts.transverse.append(Capsule(tp_a, tp_b, 3.0 * s, 2.6 * s, flatten=0.8,
                                            flat_axis=(0.0, 0.0, 1.0)))
            parts.foramina.append(Cylinder((side * (a + 4.2 * s), 1.5 * s, 0.0),
                                           1.7 * s, 6.0 * s))
        else:
            ant_a = (side * (a - 1.5 * s), -1.5 * s, 0.5 * s)
            ant_b = (side * (a + 8.0 * s), -2.2 * s, -0.5 * s)
            post_a = (side * (ca + 2.5 * s), b + 2.5 * s, 0.0)
            post_b = (side * (a + 9.5 * s), 3.8 * s, -0.8 * s)
            parts.transverse += [
                Capsule(ant_a, ant_b, 2.0 * s, 2.0 * s, flatten=0.8, flat_axis=(0, 0, 1.0)),
                Capsule(post_a, post_b, 2.1 * s, 2.0 * s, flatten=0.8, flat_axis=(0, 0, 1.0)),
                Capsule((side * (a + 8.5 * s), -3.2 * s, -0.6 * s),
                        (side * (a + 10.0 * s), 4.6 * s, -1.2 * s), 2.3 * s, 2.2 * s),
            ]
            tp_a, tp_b = ant_b, post_b
            parts.foramina.append(Cylinder((side * (a + 4.4 * s), 1.2 * s, 0.0),
                                           2.6 * s, 7.0 * s))
        parts.landmarks["transverse_" + ("l" if side > 0 else "r")] = tuple(  # type: ignore
            0.5 * (x + y) for x, y in zip(tp_a, tp_b, strict=True))
    length, drop = (x * s for x in SPINOUS[name])
    sp_a = (0.0, canal_back + 2.2 * s, -1.5 * s)
    sp_b = (0.0, canal_back + 2.2 * s + length, -1.5 * s - drop)
    parts.spinous.append(Capsule(sp_a, sp_b, 5.0 * s, 3.2 * s, flatten=0.5,
                                 flat_axis=(1.0, 0.0, 0.0)))
    if name in ("C3", "C4", "C5", "C6") and rng.random() < 0.85:
        for side in (-1.0, 1.0):
            parts.spinous.append(Capsule(
                (0.0, sp_b[1] - 4.0 * s, sp_b[2] + 1.5 * s),
                (side * 3.6 * s, sp_b[1] + 1.2 * s, sp_b[2] - 0.5 * s), 2.1 * s, 2.0 * s))
    parts.landmarks["spinous_mid"] = tuple(  # type: ignore[assignment]
        0.5 * (x + y) for x, y in zip(sp_a, sp_b, strict=True))
    parts.landmarks["spinous_b"] = sp_b
    return parts


def c2_parts(geo: SpineGeometry, rng: np.random.Generator) -> VertebraParts:
    lv = geo.levels["C2"]
    s = geo.scale
    a, b, c = lv.body
    ca, cb = lv.canal
    parts = VertebraParts()
    parts.body.append(VertebralBody(a, b, c, lip=2.2 * s))
    parts.dens.append(Capsule((0.0, 0.4 * s, c - 3.0 * s), (0.0, 1.5 * s, c + 13.0 * s),
                              5.0 * s, 4.3 * s, flatten=0.9, flat_axis=(1.0, 0.0, 0.0)))
    parts.landmarks["dens_base"] = (0.0, 0.7 * s, c + 1.5 * s)
    canal_back = b + 2 * cb
    spacing_down = _level_spacing(geo, "C2", above=False)
    for side in (-1.0, 1.0):
        lab = "l" if side > 0 else "r"
        # Superior articular processes: broad shoulders that carry C1's lateral masses.
        parts.pillars.append(RoundBox((side * 11.8 * s, 1.8 * s, c - 0.5 * s),
                                      (5.6 * s, 7.0 * s, 3.6 * s),
                                      rotation(0.0, side * 18.0, 0.0), radius=1.8 * s))
        # Pedicle / pars interarticularis down to the inferior articular process.
        ped_a, ped_b = (side * 6.5 * s, b - 2.0 * s, 0.3 * c), \
            (side * (ca + 3.0 * s), b + cb + 0.5 * s, -0.5 * c)
        parts.pedicles.append(Capsule(ped_a, ped_b, 4.2 * s, 3.8 * s, flatten=0.8,
                                      flat_axis=(1.0, 0.0, 0.0)))
        parts.pedicles.append(Capsule((side * 6.0 * s, b - 2.5 * s, -0.35 * c),
                                      (side * (ca + 2.0 * s), b + cb, -0.75 * c),
                                      3.2 * s, 3.2 * s, flatten=0.8, flat_axis=(1.0, 0.0, 0.0)))
        parts.landmarks["pedicle_" + lab] = tuple(  # type: ignore[assignment]
            0.5 * (x + y) for x, y in zip(ped_a, ped_b, strict=True))
        pillar_h = 0.5 * spacing_down - 1.5 * s
        parts.pillars.append(ShearedBox((side * (ca + 4.2 * s), b + cb + 1.5 * s,
                                         -c + 2.0 * s),
                                        (4.4 * s, 5.4 * s, pillar_h),
                                        1.0, radius=1.6 * s))
        # The C2-C3 facet joint under the inferior articular process (facet mimics at C2).
        parts.landmarks["facet_joint_" + lab] = (side * (ca + 4.2 * s), b + cb + 1.5 * s,
                                                 -c + 2.0 * s - pillar_h - 0.9 * s)
        lam_a = (side * (ca + 1.0 * s), canal_back - 1.0 * s, -2.0 * s)
        lam_b = (0.0, canal_back + 3.0 * s, -3.5 * s)
        du, dv = lam_b[0] - lam_a[0], lam_b[1] - lam_a[1]
        parts.laminae.append(Capsule(lam_a, lam_b, 6.0 * s, 5.5 * s, flatten=0.38,
                                     flat_axis=(-dv, du, 0.0)))
        parts.landmarks["lamina_" + lab] = tuple(  # type: ignore[assignment]
            0.5 * (x + y) for x, y in zip(lam_a, lam_b, strict=True))
        tp_a, tp_b = (side * 10.5 * s, 3.5 * s, c - 4.5 * s), (side * 19.0 * s, 5.5 * s,
                                                               c - 7.5 * s)
        parts.transverse.append(Capsule(tp_a, tp_b, 2.6 * s, 2.2 * s))
        parts.landmarks["transverse_" + lab] = tuple(  # type: ignore[assignment]
            0.5 * (x + y) for x, y in zip(tp_a, tp_b, strict=True))
        parts.foramina.append(Cylinder((side * 13.0 * s, 3.0 * s, c - 4.5 * s), 2.4 * s,
                                       3.5 * s, rotation(0.0, side * 25.0, 0.0)))
    length, drop = (x * s for x in SPINOUS["C2"])
    sp_a = (0.0, canal_back + 3.0 * s, -3.5 * s)
    sp_b = (0.0, canal_back + 3.0 * s + length, -3.5 * s - drop)
    parts.spinous.append(Capsule(sp_a, sp_b, 6.0 * s, 3.6 * s, flatten=0.6,
                                 flat_axis=(1.0, 0.0, 0.0)))
    for side in (-1.0, 1.0):
        parts.spinous.append(Capsule((0.0, sp_b[1] - 5.0 * s, sp_b[2] + 2.0 * s),
                                     (side * 4.5 * s, sp_b[1] + 1.0 * s, sp_b[2] - 1.0 * s),
                                     3.0 * s, 2.6 * s))
    parts.landmarks["spinous_mid"] = tuple(  # type: ignore[assignment]
        0.5 * (x + y) for x, y in zip(sp_a, sp_b, strict=True))
    parts.landmarks["spinous_b"] = sp_b
    return parts


def c1_parts(geo: SpineGeometry, rng: np.random.Generator) -> VertebraParts:
    """Atlas, in a frame centred on the dens axis at the height of the anterior arch."""
    from service.synthetic.shapes import Ring

    s = geo.scale
    parts = VertebraParts()
    ring_c = (0.0, 13.0 * s, 0.0)
    ru, rv = 18.5 * s, 21.5 * s
    parts.arches.append(Ring(ring_c, ru, rv, 2.7 * s, 5.2 * s,
                             math.radians(-142), math.radians(-38)))
    parts.arches.append(Ellipsoid((0.0, 13.0 * s - rv - 1.2 * s, 0.0),
                                  (4.0 * s, 2.6 * s, 5.6 * s)))
    parts.arches.append(Ring(ring_c, ru, rv, 3.0 * s, 4.2 * s,
                             math.radians(-12), math.radians(192)))
    parts.arches.append(Ellipsoid((0.0, 13.0 * s + rv + 1.0 * s, -0.8 * s),
                                  (5.0 * s, 3.4 * s, 5.2 * s)))
    parts.landmarks["anterior_arch"] = (0.0, 13.0 * s - rv, 0.0)
    parts.landmarks["posterior_arch"] = (0.0, 13.0 * s + rv, 0.0)
    for side in (-1.0, 1.0):
        lab = "l" if side > 0 else "r"
        parts.pillars.append(Ellipsoid((side * 13.6 * s, 2.8 * s, -0.5 * s),
                                       (6.4 * s, 9.2 * s, 7.4 * s), p_xy=2.2, p_z=3.0))
        parts.transverse += [
            Capsule((side * 15.0 * s, -2.0 * s, 0.0), (side * 28.0 * s, 0.8 * s, -0.5 * s),
                    2.3 * s, 2.1 * s),
            Capsule((side * 16.5 * s, 7.5 * s, 0.0), (side * 28.0 * s, 5.5 * s, -0.5 * s),
                    2.3 * s, 2.1 * s),
            Ellipsoid((side * 29.5 * s, 3.2 * s, -0.5 * s), (3.4 * s, 4.6 * s, 3.6 * s)),
        ]
        parts.landmarks["transverse_" + lab] = (side * 26.0 * s, 1.0 * s, -0.3 * s)
        parts.landmarks["arch_" + lab] = (side * 15.0 * s, 26.0 * s, 0.0)
        parts.foramina.append(Cylinder((side * 22.0 * s, 3.0 * s, 0.0), 2.6 * s, 6.0 * s))
    return parts


def vertebra_object(name: str, level_center: np.ndarray, rot: np.ndarray,
                    parts: VertebraParts, bone: BoneHU, texture_seed: int,
                    rng: np.random.Generator) -> BoneObject:
    obj = BoneObject(
        name=name, label=LABEL_OF[name], center=level_center, rot=rot, parts=parts.all(),
        cortex_hu=bone.cortex * rng.uniform(0.95, 1.05),
        cancellous_hu=bone.cancellous * rng.uniform(0.93, 1.07),
        cortex_mm=bone.cortex_mm, texture_hu=55.0, texture_seed=texture_seed)
    obj.carves += [Carve(f) for f in parts.foramina]
    return obj


def disc_object(geo: SpineGeometry, upper: str, lower: str, hu: float) -> BoneObject:
    """Intervertebral disc as a 'bone' with constant HU and label 0, composited before the
    bones so endplates win where they overlap."""
    lu, ll = geo.levels[upper], geo.levels[lower]
    top = lu.to_world((0.0, 0.0, -lu.body[2]))
    bottom = ll.to_world((0.0, 0.0, ll.body[2]))
    center = 0.5 * (top + bottom)
    rot = 0.5 * (lu.rot + ll.rot)
    uq, _ = np.linalg.qr(rot)
    rot = uq * np.sign(np.diag(uq))
    half_h = 0.5 * float(np.linalg.norm(top - bottom)) + 1.5
    a = 0.5 * (lu.body[0] + ll.body[0]) * 0.98
    b = 0.5 * (lu.body[1] + ll.body[1]) * 0.98
    shape = Ellipsoid((0.0, 0.0, 0.0), (a, b, half_h), p_xy=2.6, p_z=6.0)
    return BoneObject(name=f"disc_{upper}_{lower}", label=0, center=center, rot=rot,
                      parts=[shape], cortex_hu=hu + 12, cancellous_hu=hu, cortex_mm=1.5,
                      texture_hu=4.0)


def skull_base_objects(geo: SpineGeometry, rng: np.random.Generator) -> list[BoneObject]:
    """Occipital bone around the foramen magnum, condyles, clivus and mastoids (label 0).
    Only the lower 5-6 cm are modelled: a cervical-spine FOV stops there."""
    s = geo.scale
    sk = geo.skull
    cortex = geo.bone.cortex * 1.05
    parts: list[Shape] = [
        Ellipsoid((0.0, 30.0 * s, 40.0 * s), (52.0 * s, 48.0 * s, 36.0 * s))]
    for side in (-1.0, 1.0):
        parts.append(Ellipsoid((side * 12.0 * s, 4.0 * s, 1.8 * s), (5.5 * s, 9.5 * s, 5.5 * s)))
    # Clivus: a thick plate rising anteriorly from the basion.
    clivus_rot = rotation(0.0, 0.0, 62.0)
    parts.append(RoundBox((0.0, -12.0 * s, 20.0 * s), (11.0 * s, 5.0 * s, 20.0 * s),
                          clivus_rot, radius=3.0 * s))
    carves = [
        # Inside of the posterior fossa (brain), then the foramen magnum.
        Carve(Ellipsoid((0.0, 30.0 * s, 42.0 * s), (45.0 * s, 41.5 * s, 30.5 * s))),
        Carve(Ellipsoid((0.0, 12.0 * s, 8.0 * s), (15.5 * s, 19.0 * s, 20.0 * s)),
              fill_hu=None),
    ]
    occiput = BoneObject("occiput", 0, sk.center, sk.rot, parts, cortex_hu=cortex,
                         cancellous_hu=geo.bone.cancellous + 120, cortex_mm=2.0,
                         texture_seed=int(rng.integers(1 << 30)), carves=carves)
    mastoids = []
    for side in (-1.0, 1.0):
        mastoids.append(BoneObject(
            f"mastoid_{side:+.0f}", 0, sk.to_world((side * 46.0 * s, 14.0 * s, 22.0 * s)),
            sk.rot, [Ellipsoid((0.0, 0.0, 0.0), (10.0 * s, 14.0 * s, 16.0 * s)),
                     Capsule((0.0, 2.0 * s, -4.0 * s), (side * -3.0 * s, 3.0 * s, -16.0 * s),
                             5.0 * s, 3.0 * s)],
            cortex_hu=cortex, cancellous_hu=-420.0, cortex_mm=1.3, texture_hu=260.0,
            texture_seed=int(rng.integers(1 << 30))))
    return [occiput, *mastoids]


def mandible_hyoid_objects(geo: SpineGeometry, rng: np.random.Generator) -> list[BoneObject]:
    from service.synthetic.shapes import Ring

    s = geo.scale
    c2 = geo.levels["C2"]
    cortex = geo.bone.cortex * 1.1
    # Mandible: horseshoe opening backwards at the level of C2, rami rising to the skull.
    center = c2.to_world((0.0, -22.0 * s, -2.0 * s))
    rot = c2.rot @ rotation(0.0, 0.0, -8.0)
    body = Ring((0.0, 0.0, 0.0), 44.0 * s, 56.0 * s, 5.0 * s, 13.0 * s,
                math.radians(172), math.radians(368), rot=None)
    rami = [RoundBox((side * 45.0 * s, 5.0 * s, 22.0 * s), (3.2 * s, 14.0 * s, 27.0 * s),
                     rotation(0.0, 0.0, -12.0), radius=2.5 * s) for side in (-1.0, 1.0)]
    mandible = BoneObject("mandible", 0, center, rot, [body, *rami], cortex_hu=cortex,
                          cancellous_hu=geo.bone.cancellous + 150, cortex_mm=2.2,
                          texture_seed=int(rng.integers(1 << 30)))
    c3 = geo.levels["C3"]
    hyoid = BoneObject("hyoid", 0, c3.to_world((0.0, -30.0 * s, -1.0 * s)), c3.rot,
                       [Ring((0.0, 0.0, 0.0), 17.0 * s, 14.0 * s, 1.8 * s, 4.0 * s,
                             math.radians(200), math.radians(340))],
                       cortex_hu=geo.bone.cortex * 0.9, cancellous_hu=geo.bone.cancellous,
                       cortex_mm=0.8, texture_seed=int(rng.integers(1 << 30)))
    return [mandible, hyoid]


def thorax_objects(geo: SpineGeometry, rng: np.random.Generator) -> list[BoneObject]:
    """First and second ribs, clavicles and the manubrium (label 0)."""
    s = geo.scale
    objs: list[BoneObject] = []
    cortex = geo.bone.cortex * 0.95
    for level, reach, drop in (("T1", 1.0, 1.0), ("T2", 1.35, 1.2), ("T3", 1.6, 1.35)):
        lv = geo.levels[level]
        a = lv.body[0]
        for side in (-1.0, 1.0):
            pts = [(side * (a + 3.0 * s), 4.0 * s, 1.0 * s),
                   (side * (a + 22.0 * s * reach), 14.0 * s, -2.0 * s * drop),
                   (side * (a + 42.0 * s * reach), 2.0 * s, -10.0 * s * drop),
                   (side * (a + 46.0 * s * reach), -28.0 * s, -22.0 * s * drop),
                   (side * (a + 22.0 * s * reach), -56.0 * s, -36.0 * s * drop)]
            shapes: list[Shape] = [Capsule(p, q, 4.2 * s, 4.0 * s, flatten=0.55,
                                           flat_axis=(0.0, 0.0, 1.0))
                                   for p, q in zip(pts[:-1], pts[1:], strict=True)]
            objs.append(BoneObject(f"rib_{level}_{side:+.0f}", 0, lv.center, lv.rot, shapes,
                                   cortex_hu=cortex, cancellous_hu=geo.bone.cancellous,
                                   cortex_mm=1.0, texture_seed=int(rng.integers(1 << 30))))
    t1 = geo.levels["T1"]
    for side in (-1.0, 1.0):
        pts = [(side * 18.0 * s, -62.0 * s, -22.0 * s), (side * 55.0 * s, -70.0 * s, -14.0 * s),
               (side * 100.0 * s, -48.0 * s, -6.0 * s), (side * 140.0 * s, -22.0 * s, -2.0 * s)]
        shapes = [Capsule(p, q, 7.0 * s, 6.5 * s) for p, q in zip(pts[:-1], pts[1:],
                                                                  strict=True)]
        objs.append(BoneObject(f"clavicle_{side:+.0f}", 0, t1.center, t1.rot, shapes,
                               cortex_hu=cortex, cancellous_hu=geo.bone.cancellous,
                               cortex_mm=1.5, texture_seed=int(rng.integers(1 << 30))))
    objs.append(BoneObject("manubrium", 0, t1.center, t1.rot,
                           [RoundBox((0.0, -64.0 * s, -48.0 * s), (24.0 * s, 6.5 * s, 22.0 * s),
                                     rotation(0.0, 0.0, -15.0), radius=4.0 * s)],
                           cortex_hu=cortex, cancellous_hu=geo.bone.cancellous,
                           cortex_mm=1.0, texture_seed=int(rng.integers(1 << 30))))
    return objs
