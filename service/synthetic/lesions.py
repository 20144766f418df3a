"""Fractures and fracture mimics, applied to a vertebra's bone object.

A fracture is a thin carved slab (1-2 mm lucent gap filled by whatever soft tissue lies
underneath, i.e. haematoma-density) that crosses the cortex of the targeted structure,
optionally with a minimal displacement of one fragment (a coordinate warp that tapers to
zero away from the fracture so it does not tear other structures). A compression fracture
warps the superior half of the body down anteriorly and adds an impaction band.

A mimic changes the image in a way readers confuse with a fracture but is not one: canals
with *sclerotic* (corticated) margins, rounded corticated gaps, osteophytes, sclerotic
bands without a lucent line, surgical defects. The ground-truth box of each lesion is
measured by the renderer (the bone voxels it changed), under the key returned here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from service.synthetic.bones import BoneObject, Carve, Sclerosis
from service.synthetic.options import FractureType, MimicType
from service.synthetic.shapes import Capsule, Coords, Ellipsoid, RoundBox, Slab, Vec
from service.synthetic.spine import SpineGeometry, VertebraParts

logger = logging.getLogger(__name__)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _perturb(n: np.ndarray, rng: np.random.Generator, deg: float) -> np.ndarray:
    return _unit(n + rng.normal(0, math.radians(deg), size=3))


@dataclass
class DisplacementWarp:
    """Shift the fragment on the positive side of a plane by ``shift`` (mm, local frame),
    fading out beyond ``radius`` from ``point`` so distant structures stay in place."""

    point: np.ndarray
    normal: np.ndarray
    shift: np.ndarray
    radius: float

    def __call__(self, p: Coords) -> Coords:
        pu = p[0] - np.float32(self.point[0])
        pv = p[1] - np.float32(self.point[1])
        pw = p[2] - np.float32(self.point[2])
        n = self.normal.astype(np.float32)
        side = np.clip((pu * n[0] + pv * n[1] + pw * n[2]) / np.float32(0.4) + 0.5, 0, 1)
        dist = np.sqrt(pu * pu + pv * pv + pw * pw)
        fade = np.clip((np.float32(self.radius) - dist) / np.float32(0.35 * self.radius), 0, 1)
        k = side * fade
        return (p[0] - k * np.float32(self.shift[0]), p[1] - k * np.float32(self.shift[1]),
                p[2] - k * np.float32(self.shift[2]))


@dataclass
class CompressionWarp:
    """Anterior wedge: the superior half of the body loses up to ``loss`` of its height at
    the anterior wall, none at the posterior wall; only inside the body's width."""

    a: float
    b: float
    c: float
    loss: float

    def __call__(self, p: Coords) -> Coords:
        u, v, w = p
        anterior = np.clip((np.float32(self.b) - v) / np.float32(2 * self.b), 0, 1)
        inside = np.clip((np.float32(self.a + 2.0) - np.abs(u)) / np.float32(2.0), 0, 1) \
            * (v < np.float32(self.b + 1.0))
        k = np.float32(self.loss) * anterior * inside
        # Superior half only: w in (0, c] maps to w / (1 - 2k) (taller in evaluation = lower).
        scale = np.where(w > 0, np.float32(1.0) / np.maximum(1 - 2 * k, np.float32(0.3)), 1)
        return u, v, (w * scale).astype(np.float32)


def _landmark(parts: VertebraParts, key: str, rng: np.random.Generator) -> tuple[str, Vec]:
    sides = [k for k in parts.landmarks if k.startswith(key)]
    choice = sides[int(rng.integers(len(sides)))]
    return choice, parts.landmarks[choice]


def apply_fracture(obj: BoneObject, parts: VertebraParts, geo: SpineGeometry, level: str,
                   ftype: FractureType, rng: np.random.Generator, key: str,
                   displacement_mm: float | None) -> float:
    """Add fracture ``ftype`` to ``obj``; returns the displacement used (mm)."""
    s = geo.scale
    half = float(rng.uniform(0.5, 1.0))  # 1-2 mm gap
    shift_mag = float(rng.uniform(0.0, 1.5) if displacement_mm is None else displacement_mm)
    if level == "C1":
        a = b = c = 0.0
    else:
        a, b, c = geo.levels[level].body
    if ftype == FractureType.BODY:
        kind = rng.choice(["coronal", "sagittal", "oblique", "teardrop", "axial"])
        if kind == "coronal":
            normal = _perturb(np.array([0.0, 1.0, 0.15]), rng, 12)
            point = np.array([rng.uniform(-0.3, 0.3) * a, rng.uniform(-0.4, 0.3) * b, 0.0])
        elif kind == "sagittal":
            normal = _perturb(np.array([1.0, 0.0, 0.1]), rng, 12)
            point = np.array([rng.uniform(-0.45, 0.45) * a, 0.0, 0.0])
        elif kind == "teardrop":
            normal = _unit(np.array([0.0, -0.75, -1.0]))
            normal = _perturb(normal, rng, 8)
            point = np.array([0.0, -0.55 * b, -0.55 * c])
        elif kind == "axial":
            normal = _perturb(np.array([0.0, 0.25, 1.0]), rng, 10)
            point = np.array([0.0, 0.0, rng.uniform(-0.35, 0.35) * c])
        else:
            normal = _unit(rng.normal(size=3))
            point = np.array([rng.uniform(-0.3, 0.3) * a, rng.uniform(-0.3, 0.3) * b,
                              rng.uniform(-0.3, 0.3) * c])
        radius = 1.6 * max(a, b, c)
        body_center = np.zeros(3)
        slab_point = point + body_center
    elif ftype == FractureType.DENS_TYPE_II:
        base = np.asarray(parts.landmarks["dens_base"])
        normal = _perturb(np.array([0.0, 0.2, 1.0]), rng, 10)
        slab_point, radius = base, 7.5 * s
    elif ftype == FractureType.C1_RING:
        name, lm = _landmark(parts, rng.choice(["arch_", "anterior_arch"]), rng)
        p = np.asarray(lm)
        if name == "anterior_arch":
            p = p + np.array([rng.uniform(-9, 9) * s, 0.0, 0.0])
            normal = _perturb(np.array([1.0, 0.25 * np.sign(p[0] or 1.0), 0.0]), rng, 10)
        else:
            # Tangent of the ring at this point: along the ring, so the cut crosses it.
            rel = p - np.array([0.0, 13.0 * s, 0.0])
            theta = math.atan2(rel[1] / (21.5 * s), rel[0] / (18.5 * s))
            normal = _perturb(np.array([-18.5 * math.sin(theta), 21.5 * math.cos(theta),
                                        0.0]), rng, 10)
        slab_point, radius = p, 6.5 * s
    elif ftype == FractureType.PEDICLE:
        name, lm = _landmark(parts, "pedicle_", rng)
        side = 1.0 if name.endswith("l") else -1.0
        normal = _perturb(np.array([side * 0.7, 0.7, 0.1]), rng, 12)
        slab_point, radius = np.asarray(lm), 6.0 * s
    elif ftype == FractureType.LAMINA:
        name, lm = _landmark(parts, "lamina_", rng)
        side = 1.0 if name.endswith("l") else -1.0
        normal = _perturb(np.array([side * 0.8, -0.5, 0.1]), rng, 12)
        slab_point, radius = np.asarray(lm), 7.5 * s
    elif ftype == FractureType.SPINOUS:
        mid = np.asarray(parts.landmarks["spinous_mid"])
        tip = np.asarray(parts.landmarks["spinous_b"])
        t = float(rng.uniform(0.0, 0.7))
        slab_point = mid + t * (tip - mid)
        normal = _perturb(_unit(tip - mid), rng, 15)
        radius = 7.0 * s
    elif ftype == FractureType.TRANSVERSE:
        name, lm = _landmark(parts, "transverse_", rng)
        normal = _perturb(np.array([1.0, 0.0, 0.0]), rng, 15)
        slab_point, radius = np.asarray(lm), 6.5 * s
    elif ftype == FractureType.COMPRESSION:
        loss = float(rng.uniform(0.18, 0.45))
        obj.warps.append(CompressionWarp(a, b, c, loss))
        obj.warp_margin_mm = max(obj.warp_margin_mm, 1.0)
        band_w = c * (1 - 2 * loss * 0.5) - 2.0
        obj.scleroses.append(Sclerosis(
            RoundBox((0.0, 0.0, band_w), (a, b, 1.6), radius=0.8),
            float(rng.uniform(180, 320)), truth=key))
        obj.scleroses.append(Sclerosis(RoundBox((0.0, -0.2 * b, 0.3 * c), (a, 0.8 * b, 0.7 * c),
                                                radius=1.0), 0.0, truth=key))
        return 0.0
    else:  # pragma: no cover - enum is exhaustive
        raise ValueError(f"unknown fracture type {ftype}")
    obj.carves.append(Carve(Slab(tuple(slab_point), tuple(normal), half, radius),  # type: ignore
                            truth=key, corticate=False))
    if shift_mag > 0.05:
        in_plane = _unit(np.cross(normal, rng.normal(size=3)))
        mix = float(rng.uniform(0.0, 0.4))
        shift = shift_mag * _unit((1 - mix) * in_plane + mix * normal)
        obj.warps.insert(0, DisplacementWarp(np.asarray(slab_point), normal, shift,
                                             radius * 1.3))
        obj.warp_margin_mm = max(obj.warp_margin_mm, shift_mag + 0.5)
    if ftype == FractureType.C1_RING and rng.random() < 0.6:
        # Jefferson burst: a second break on the other side of the ring.
        other = np.asarray(parts.landmarks["arch_l" if slab_point[0] < 0 else "arch_r"])
        rel = other - np.array([0.0, 13.0 * s, 0.0])
        theta = math.atan2(rel[1] / (21.5 * s), rel[0] / (18.5 * s))
        n2 = _perturb(np.array([-18.5 * math.sin(theta), 21.5 * math.cos(theta), 0.0]), rng, 10)
        obj.carves.append(Carve(Slab(tuple(other), tuple(n2), half, 6.5 * s),  # type: ignore
                                truth=key, corticate=False))
    return shift_mag


def apply_mimic(obj: BoneObject, parts: VertebraParts, geo: SpineGeometry, level: str,
                mtype: MimicType, rng: np.random.Generator, key: str) -> list[BoneObject]:
    """Add mimic ``mtype`` to ``obj``; returns extra bone objects (a detached ossicle)."""
    s = geo.scale
    a, b, c = geo.levels[level].body if level != "C1" else (0.0, 0.0, 0.0)
    sclerosis = float(rng.uniform(450, 750))
    if mtype == MimicType.NUTRIENT_FORAMEN:
        side = float(rng.choice([-1.0, 1.0]))
        start = np.array([side * rng.uniform(0.2, 0.6) * a, -b - 0.5, rng.uniform(-0.3, 0.3) * c])
        end = start + np.array([side * 1.0, rng.uniform(6.0, 9.0), rng.uniform(-1.5, 1.5)])
        r = float(rng.uniform(0.5, 0.8))
        obj.carves.append(Carve(Capsule(tuple(start), tuple(end), r, r * 0.8),  # type: ignore
                                margin_mm=0.9, sclerosis_hu=sclerosis, truth=key))
    elif mtype == MimicType.BASIVERTEBRAL_CHANNEL:
        w0 = float(rng.uniform(-0.2, 0.2) * c)
        entry: Vec = (0.0, b + 0.8, w0)
        hub: Vec = (0.0, float(b - rng.uniform(5.0, 7.0)), w0)
        r = float(rng.uniform(0.9, 1.4))
        obj.carves.append(Carve(Capsule(entry, hub, r, r * 0.8), margin_mm=1.0,
                                sclerosis_hu=sclerosis, truth=key))
        for side in (-1.0, 1.0):
            branch = (side * rng.uniform(2.5, 4.0), hub[1] - rng.uniform(1.5, 3.0),
                      w0 + rng.uniform(-1.5, 1.5))
            obj.carves.append(Carve(Capsule(hub, branch, r * 0.7, r * 0.5), margin_mm=0.9,
                                    sclerosis_hu=sclerosis, truth=key))
    elif mtype == MimicType.ANTERIOR_OSTEOPHYTE:
        sign = float(rng.choice([-1.0, 1.0]))  # superior or inferior endplate margin
        length = float(rng.uniform(2.5, 5.0))
        for du in (-0.45 * a, 0.0, 0.45 * a):
            root = (du, -b + 1.5, sign * (c - 0.8))
            tip = (du * 1.1, -b - length, sign * (c + rng.uniform(1.0, 3.0)))
            shape = Capsule(root, tip, 2.4, 0.9, flatten=0.6, flat_axis=(0.0, 0.0, 1.0))
            obj.additions.append(shape)
            obj.scleroses.append(Sclerosis(shape, 150.0, truth=key))
    elif mtype == MimicType.DETACHED_OSTEOPHYTE:
        disc = 5.0 * s
        center = obj.center + obj.rot @ np.array([rng.uniform(-3, 3), -b - 3.2,
                                                  -c - 0.5 * disc])
        ossicle = Ellipsoid((0.0, 0.0, 0.0), (float(rng.uniform(2.0, 3.2)), 1.8,
                                              float(rng.uniform(2.2, 3.5))))
        extra = BoneObject(f"ossicle_{key}", 0, center, obj.rot, [ossicle],
                           cortex_hu=obj.cortex_hu, cancellous_hu=obj.cancellous_hu + 150,
                           cortex_mm=0.9, texture_seed=int(rng.integers(1 << 30)),
                           scleroses=[Sclerosis(ossicle, 0.0, truth=key)])
        return [extra]
    elif mtype == MimicType.C1_ARCH_CLEFT:
        posterior = rng.random() < 0.85
        lm = np.asarray(parts.landmarks["posterior_arch" if posterior else "anterior_arch"])
        gap = float(rng.uniform(1.5, 3.5))
        cleft = Ellipsoid(tuple(lm), (gap, 6.0 * s, 7.0 * s))  # type: ignore[arg-type]
        obj.carves.append(Carve(cleft, margin_mm=1.3, sclerosis_hu=sclerosis, truth=key))
    elif mtype == MimicType.OS_ODONTOIDEUM:
        base = np.asarray(parts.landmarks["dens_base"]) + np.array([0.0, 0.0, 3.5 * s])
        gap = float(rng.uniform(1.3, 2.2))
        shape = RoundBox(tuple(base), (7.0 * s, 7.0 * s, gap), radius=gap * 0.9)  # type: ignore
        obj.carves.append(Carve(shape, margin_mm=1.4, sclerosis_hu=sclerosis * 1.1, truth=key))
    elif mtype == MimicType.HEALED_FRACTURE:
        normal = _perturb(np.array([0.0, 0.3, 1.0]) if rng.random() < 0.5
                          else np.array([0.0, 1.0, 0.2]), rng, 15)
        point = np.array([0.0, rng.uniform(-0.3, 0.3) * b, rng.uniform(-0.3, 0.3) * c])
        band = Slab(tuple(point), tuple(normal), float(rng.uniform(0.9, 1.6)),  # type: ignore
                    1.7 * max(a, b, c))
        obj.scleroses.append(Sclerosis(band, float(rng.uniform(300, 500)), truth=key))
        step = float(rng.uniform(0.4, 1.0))
        shift = step * _unit(np.cross(normal, rng.normal(size=3)))
        obj.warps.insert(0, DisplacementWarp(point, normal, shift, 1.7 * max(a, b, c) * 1.3))
        obj.warp_margin_mm = max(obj.warp_margin_mm, step + 0.5)
    elif mtype == MimicType.FACET_DEGENERATION:
        name, joint = _landmark(parts, "facet_joint_", rng)
        j = np.asarray(joint)
        obj.scleroses.append(Sclerosis(Ellipsoid(tuple(j + np.array([0.0, 0.0, 2.0])),  # type: ignore
                                                 (5.0, 6.0, 3.5)),
                                       float(rng.uniform(300, 500)), truth=key))
        side = 1.0 if name.endswith("l") else -1.0
        for dv in (-5.5, 5.5):
            lump = Ellipsoid(tuple(j + np.array([side * 1.0, dv, 0.5])),  # type: ignore
                             (2.5, 1.8, 2.2))
            obj.additions.append(lump)
            obj.scleroses.append(Sclerosis(lump, 100.0, truth=key))
        obj.carves.append(Carve(Ellipsoid(tuple(j - np.array([0.0, 0.0, 0.6])),  # type: ignore
                                          (3.0, 3.5, 0.5)),
                                fill_hu=float(rng.uniform(-700, -400)), truth=None))
    elif mtype == MimicType.LAMINECTOMY:
        lam = np.asarray(parts.landmarks["lamina_l"])
        ca = geo.levels[level].canal[0]
        center = (0.0, lam[1] + 12.0 * s, lam[2] - 2.0 * s)
        defect = RoundBox(center, (ca - 0.5, 18.0 * s, 12.0 * s), radius=3.0)
        obj.carves.append(Carve(defect, margin_mm=1.0, sclerosis_hu=sclerosis * 0.6, truth=key))
    else:
        raise ValueError(f"{mtype} is an image-domain mimic, not a bone change")
    return []
