"""Soft tissue of the neck, slice by slice, laid out around the spine's anterior column.

Each axial slice starts as air (-1000 HU) and is painted with ellipses in 2-D, each only
inside its own pixel bounding box: skin and subcutaneous fat, muscle with fat planes,
sternocleidomastoid muscles, carotid arteries and jugular veins in fat, the airway
(pharynx, larynx with calcified cartilage, trachea), oesophagus, thyroid, spinal canal
(CSF, cord, epidural fat), lung apices and the shoulders. Values are HU, calibrated
against a real head-and-neck CT (see ``service.synthetic.calibration``). Bones are added
afterwards by ``service.synthetic.bones``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from service.synthetic.calibration import HU
from service.synthetic.spine import SpineGeometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SoftParams:
    """Per-patient soft-tissue build (mm): drawn once from the seed."""

    neck_half_width: float
    neck_half_depth: float
    fat_mm: float
    posterior_fat_extra_mm: float
    airway_scale: float
    shoulder_width: float
    muscle_hu: float
    fat_hu: float
    thyroid_hu: float
    cartilage_hu: float
    jugular_r: float


def draw_params(rng: np.random.Generator, scale: float, age: int) -> SoftParams:
    bmi = float(np.clip(rng.normal(26.0, 4.5), 17.0, 42.0))
    fat = float(np.clip(2.0 + (bmi - 18.0) * 0.55 + rng.normal(0, 1.0), 1.5, 18.0))
    return SoftParams(
        neck_half_width=float(scale * rng.uniform(50.0, 58.0) + 0.6 * fat),
        neck_half_depth=float(scale * rng.uniform(58.0, 66.0) + 0.6 * fat),
        fat_mm=fat,
        posterior_fat_extra_mm=float(rng.uniform(0.0, 6.0)),
        airway_scale=float(scale * rng.uniform(0.85, 1.15)),
        shoulder_width=float(scale * rng.uniform(165.0, 195.0) + fat),
        muscle_hu=float(rng.normal(HU.muscle, 4.0)),
        fat_hu=float(rng.normal(HU.fat, 6.0)),
        thyroid_hu=float(rng.uniform(80.0, 115.0)),
        cartilage_hu=float(np.clip(60.0 + (age - 20) * 5.0 + rng.normal(0, 40), 60, 450)),
        jugular_r=float(rng.uniform(4.0, 7.5)),
    )


class SlicePainter:
    """Paints 2-D shapes into one axial slice (rows = LPS y, columns = LPS x)."""

    def __init__(self, img: np.ndarray, xs: np.ndarray, ys: np.ndarray, edge_mm: float):
        self.img = img
        self.xs = xs
        self.ys = ys
        self.edge = np.float32(edge_mm)
        self.dx = float(xs[1] - xs[0]) if len(xs) > 1 else 1.0

    def _window(self, cx: float, cy: float, rx: float, ry: float) -> tuple[slice, slice] | None:
        i0 = int(np.searchsorted(self.xs, cx - rx - 1.0))
        i1 = int(np.searchsorted(self.xs, cx + rx + 1.0))
        j0 = int(np.searchsorted(self.ys, cy - ry - 1.0))
        j1 = int(np.searchsorted(self.ys, cy + ry + 1.0))
        if i0 >= i1 or j0 >= j1:
            return None
        return slice(j0, j1), slice(i0, i1)

    def ellipse_distance(self, cx: float, cy: float, ax: float, ay: float,
                         angle_deg: float = 0.0, pad: float = 0.0
                         ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        r = max(ax, ay) + pad
        win = self._window(cx, cy, r, r) if angle_deg else self._window(cx, cy, ax + pad,
                                                                        ay + pad)
        if win is None:
            return None
        x = (self.xs[win[1]] - np.float32(cx))[None, :]
        y = (self.ys[win[0]] - np.float32(cy))[:, None]
        if angle_deg:
            t = math.radians(angle_deg)
            ct, st = np.float32(math.cos(t)), np.float32(math.sin(t))
            x, y = ct * x + st * y, -st * x + ct * y
        n = np.sqrt((x / np.float32(ax)) ** 2 + (y / np.float32(ay)) ** 2)
        rr = np.sqrt(x * x + y * y)
        return win, rr - rr / np.maximum(n, np.float32(1e-6))

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, value: float,
                angle_deg: float = 0.0, y_min: float | None = None,
                y_max: float | None = None) -> None:
        found = self.ellipse_distance(cx, cy, ax, ay, angle_deg)
        if found is None:
            return
        win, d = found
        weight = np.clip(np.float32(0.5) - d / self.edge, 0, 1)
        if y_min is not None or y_max is not None:
            y = self.ys[win[0]][:, None]
            if y_min is not None:
                weight = weight * np.clip((y - np.float32(y_min)) / self.edge + 0.5, 0, 1)
            if y_max is not None:
                weight = weight * np.clip((np.float32(y_max) - y) / self.edge + 0.5, 0, 1)
        view = self.img[win]
        view += weight * (np.float32(value) - view)

    def ring(self, cx: float, cy: float, ax: float, ay: float, thickness: float,
             value: float, y_min: float | None = None, y_max: float | None = None,
             angle_deg: float = 0.0) -> None:
        """Band of ``thickness`` mm centred on the ellipse outline (fat planes, cartilage)."""
        found = self.ellipse_distance(cx, cy, ax, ay, angle_deg, pad=thickness)
        if found is None:
            return
        win, d = found
        weight = np.clip(np.float32(0.5 * thickness) - np.abs(d), 0, None) / self.edge
        weight = np.clip(weight, 0, 1)
        y = self.ys[win[0]][:, None]
        if y_min is not None:
            weight = weight * (y >= np.float32(y_min))
        if y_max is not None:
            weight = weight * (y <= np.float32(y_max))
        view = self.img[win]
        view += weight * (np.float32(value) - view)


@dataclass
class LevelHeights:
    """LPS z (mm) of landmarks along the spine, used to interpolate soft tissue."""

    t3: float
    t1: float
    c7: float
    c6: float
    c5: float
    c4: float
    c3: float
    c2: float
    c1: float
    skull: float


def level_heights(geo: SpineGeometry) -> LevelHeights:
    z = {n: float(lv.center[2]) for n, lv in geo.levels.items()}
    return LevelHeights(z["T3"], z["T1"], z["C7"], z["C6"], z["C5"], z["C4"], z["C3"],
                        z["C2"], float(geo.c1.center[2]), float(geo.skull.center[2]))


def _interp(z: float, anchors: list[tuple[float, float]]) -> float:
    zs, vals = zip(*sorted(anchors), strict=True)
    return float(np.interp(z, zs, vals))


def paint_slice(img: np.ndarray, z: float, xs: np.ndarray, ys: np.ndarray,
                geo: SpineGeometry, heights: LevelHeights, p: SoftParams,
                axis_pts: np.ndarray, canal_pts: np.ndarray, edge_mm: float,
                shoulders: bool) -> None:
    """Fill one axial slice (``img``, float32, rows = y, cols = x) at LPS height ``z``."""
    h = heights
    s = geo.scale
    img.fill(np.float32(HU.air))
    painter = SlicePainter(img, xs, ys, edge_mm)
    bx = float(np.interp(z, axis_pts[:, 2], axis_pts[:, 0]))
    by = float(np.interp(z, axis_pts[:, 2], axis_pts[:, 1]))
    body_b = 8.0 * s
    # Neck outline: neck proper, widening into shoulders below C7, head above C1.
    hw, hd = p.neck_half_width, p.neck_half_depth
    half_w = _interp(z, [(h.t3 - 30, p.shoulder_width if shoulders else hw * 1.6),
                         (h.t1, (0.65 * p.shoulder_width + 0.35 * hw) if shoulders else hw * 1.4),
                         (h.c7, hw * 1.15), (h.c6, hw * 1.02), (h.c4, hw), (h.c2, hw * 1.05),
                         (h.c1, hw * 1.12), (h.skull + 15, hw * 1.25),
                         (h.skull + 80, hw * 1.3)])
    half_d = _interp(z, [(h.t3 - 30, hd * 1.45), (h.t1, hd * 1.22), (h.c7, hd * 1.05),
                         (h.c4, hd), (h.c2, hd * 1.05), (h.c1, hd * 1.22),
                         (h.skull + 20, hd * 1.45), (h.skull + 80, hd * 1.5)])
    center_off = _interp(z, [(h.t3 - 30, 2.0), (h.t1, 14.0), (h.c4, 20.0), (h.c2, 16.0),
                             (h.c1, 6.0), (h.skull + 20, -8.0), (h.skull + 80, -10.0)])
    cy = by + center_off
    fat = p.fat_mm
    # Floor of the mouth and submandibular region: the face in front of the upper neck.
    face = _interp(z, [(h.c4, 0.0), (h.c3, 0.75), (h.c2, 1.0), (h.skull + 25, 1.0),
                       (h.skull + 45, 0.0)])
    face_c = by - 52.0 * s
    face_w, face_d = 47.0 * s * face, 42.0 * s * face
    painter.ellipse(bx, cy, half_w, half_d, p.fat_hu)
    if face > 0.05:
        painter.ellipse(bx, face_c, face_w + fat, face_d + fat, p.fat_hu)
    painter.ellipse(bx, cy + 0.5 * p.posterior_fat_extra_mm, half_w - fat,
                    half_d - fat - 0.5 * p.posterior_fat_extra_mm, p.muscle_hu)
    if face > 0.05:
        painter.ellipse(bx, face_c, face_w, face_d, p.muscle_hu - 4)
    # Posterior intermuscular fat planes (trapezius / splenius / semispinalis): thin,
    # partial and slightly irregular, not concentric rings.
    spin_y = by + 30.0 * s
    for k, (rx, ry, dy, th) in enumerate(((23.0, 19.0, 2.0, 1.1), (33.0, 30.0, -3.0, 0.9),
                                          (45.0, 40.0, 5.0, 1.3))):
        wobble = 1.0 + 0.06 * math.sin(0.05 * z + 1.7 * k)
        painter.ring(bx, spin_y + dy, rx * s * wobble, ry * s, th, p.fat_hu * 0.6,
                     y_min=spin_y + 4.0 + 3.0 * k)
    painter.ellipse(bx, by + 58.0 * s, 1.2, 12.0 * s, 20.0)  # ligamentum nuchae
    neck = h.t1 + 5 < z < h.skull + 5
    if neck:
        # Sternocleidomastoid muscles under the skin: anterolateral low in the neck,
        # lateral high up; long axis along the outline.
        phi = math.radians(_interp(z, [(h.c7, 58.0), (h.c4, 42.0), (h.c2, 18.0),
                                       (h.c1, 8.0)]))
        inset_w = min(half_w, 1.25 * hw) - fat - 8.0 * s
        inset_d = half_d - fat - 8.0 * s
        for side in (-1.0, 1.0):
            sx = bx + side * inset_w * math.cos(phi)
            sy = cy - inset_d * math.sin(phi)
            angle = -side * math.degrees(phi)
            painter.ellipse(sx, sy, 7.6 * s, 14.0 * s, p.fat_hu * 0.7, angle_deg=angle)
            painter.ellipse(sx, sy, 6.4 * s, 12.8 * s, p.muscle_hu + 3, angle_deg=angle)
        # Carotid sheath: artery medial, jugular lateral, in a fat collar.
        for side in (-1.0, 1.0):
            car_x, car_y = bx + side * 19.0 * s, by - body_b - 8.0 * s
            jug_x, jug_y = bx + side * 28.0 * s, by - body_b - 5.0 * s
            painter.ellipse(car_x, car_y, 6.0, 6.0, p.fat_hu)
            painter.ellipse(jug_x, jug_y, p.jugular_r + 2.0, p.jugular_r * 0.8 + 2.0, p.fat_hu)
            painter.ellipse(car_x, car_y, 3.6 * s, 3.6 * s, HU.blood)
            painter.ellipse(jug_x, jug_y, p.jugular_r, p.jugular_r * 0.8, HU.blood)
    # Airway and the organs around it.
    prevert = _interp(z, [(h.c6, 13.0), (h.c5, 8.0), (h.c4, 4.0), (h.c2, 4.5), (h.c1, 6.0)])
    a_s = p.airway_scale
    if h.t3 - 40 < z < h.skull + 18:
        if z > h.c3:      # naso/oropharynx: wide and flat
            ax, ay = 15.0 * a_s, 6.5 * a_s
        elif z > h.c6:    # hypopharynx / larynx
            ax, ay = 10.0 * a_s, 9.0 * a_s
        else:             # trachea
            ax, ay = 8.5 * a_s, 8.0 * a_s
        air_y = by - body_b - prevert - ay
        if z <= h.c5:
            eso_y = by - body_b - 5.0
            painter.ellipse(bx, eso_y, 8.0 * s, 4.0 * s, p.muscle_hu - 8)
        if h.c7 - 12 < z < h.c5:  # thyroid lobes beside the trachea
            for side in (-1.0, 1.0):
                painter.ellipse(bx + side * 15.0 * a_s, air_y + 3.0, 7.0 * s, 11.0 * s,
                                p.thyroid_hu)
        if h.c6 - 6 < z < h.c3:  # thyroid / cricoid cartilage, calcifying with age
            painter.ring(bx, air_y, ax + 4.0, ay + 5.0, 1.6, p.cartilage_hu,
                         y_max=air_y + 0.3 * ay)
        elif z <= h.c6 - 6:      # tracheal rings (anterior horseshoe)
            painter.ring(bx, air_y, ax + 1.2, ay + 1.2, 1.2, 0.5 * (p.cartilage_hu + 60),
                         y_max=air_y + 0.5 * ay)
        painter.ellipse(bx, air_y, ax, ay, HU.air)
    # Spinal canal: CSF, epidural fat behind, cord in front of centre.
    if z < h.skull + 5:
        cx_c = float(np.interp(z, canal_pts[:, 2], canal_pts[:, 0]))
        cy_c = float(np.interp(z, canal_pts[:, 2], canal_pts[:, 1]))
        ca = _interp(z, [(h.t3, 8.0), (h.t1, 9.0), (h.c7, 11.0), (h.c5, 12.0), (h.c2, 11.0),
                         (h.c1, 13.0), (h.skull, 14.0)]) * s
        cb = _interp(z, [(h.t3, 7.0), (h.c7, 7.0), (h.c2, 8.0), (h.c1, 10.0),
                         (h.skull, 12.0)]) * s
        painter.ellipse(cx_c, cy_c + 0.5 * cb, 0.7 * ca, 0.45 * cb, p.fat_hu * 0.7)
        painter.ellipse(cx_c, cy_c, 0.95 * ca, 0.82 * cb, HU.csf)
        painter.ellipse(cx_c, cy_c - 0.12 * cb, 0.5 * ca, 0.55 * cb, HU.cord)
    # The table and the head holder under the patient (plastic / carbon fibre).
    back = cy + half_d
    painter.ring(bx, cy, min(half_w, 1.3 * hw) + 6.0, half_d + 6.0, 2.5, 180.0,
                 y_min=cy + 0.55 * half_d)
    painter.ellipse(bx, back + 30.0, 300.0, 4.0, -150.0)
    painter.ellipse(bx, back + 26.0, 300.0, 0.8, 300.0)
    painter.ellipse(bx, back + 34.0, 300.0, 0.8, 300.0)
    # Brain (cerebellum, brainstem) inside the posterior fossa, above the foramen magnum.
    sk = geo.skull
    fossa = sk.to_world((0.0, 30.0 * s, 42.0 * s))
    fz = (z - float(fossa[2])) / (30.0 * s)
    if abs(fz) < 1.0:
        r = math.sqrt(1.0 - fz * fz)
        painter.ellipse(float(fossa[0]), float(fossa[1]), 45.0 * s * r, 41.5 * s * r, HU.brain)
    # Lung apices below the first ribs.
    if shoulders and z < h.t1 + 6:
        t1 = geo.levels["T1"]
        for side in (-1.0, 1.0):
            zc = float(t1.center[2]) - 45.0 * s
            az, ax_l, ay_l = 52.0 * s, 34.0 * s, 42.0 * s
            f = 1.0 - ((z - zc) / az) ** 2
            if f > 0:
                r = math.sqrt(f)
                painter.ellipse(bx + side * (t1.body[0] + 44.0 * s), by - 4.0,
                                ax_l * r, ay_l * r, HU.lung)
