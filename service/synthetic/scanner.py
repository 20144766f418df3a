"""What the scanner adds to the ideal image: blur, noise texture and streak artefacts.

* Blur: the reconstruction kernel's point spread is folded into the edge width of every
  shape (see ``edge_mm``); thick slices (thickness > spacing) get a through-plane box blur.
* Noise: a pool of a few 2-D noise fields is shaped in the Fourier domain with a kernel-
  specific noise power spectrum (sharp, fine-grained for BONE; blotchy for SOFT), normalised
  to unit standard deviation; each slice adds two randomly rolled pool fields, scaled by
  the calibrated sigma, which rises towards the shoulders (more attenuation, fewer photons).
* Streaks: photon-starvation streaks running left-right between the shoulders, beam-
  hardening dark bands, and metal streaks radiating from fixation hardware.

Every random choice comes from ``numpy.random.default_rng([seed, ...])`` keyed by slice,
so results do not depend on threading.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

PSF_MM = {"BONE": 0.45, "SOFT": 0.95}
"""Approximate in-plane blur (mm) of each reconstruction kernel."""


def edge_mm(kernel: str, pixel_mm: float) -> float:
    """Width (mm) of the partial-volume ramp at a sharp boundary."""
    return float(math.sqrt(PSF_MM[kernel] ** 2 + (0.8 * pixel_mm) ** 2))


def noise_pool(seed: int, kernel: str, ny: int, nx: int, pixel_mm: float,
               count: int = 6) -> np.ndarray:
    """``count`` unit-variance noise fields (float32) with the kernel's noise texture."""
    rng = np.random.default_rng([seed, 424242])
    fy = np.fft.fftfreq(ny, d=pixel_mm)[:, None]
    fx = np.fft.rfftfreq(nx, d=pixel_mm)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    if kernel == "BONE":
        peak = 0.75  # cycles/mm
        nps = (f / peak) ** 1.2 * np.exp(-((f / (1.25 * peak)) ** 2))
    else:
        peak = 0.28
        nps = (f / peak) ** 1.0 * np.exp(-((f / (1.1 * peak)) ** 2))
    amp = np.sqrt(nps).astype(np.float32)
    pool = np.empty((count, ny, nx), dtype=np.float32)
    for i in range(count):
        white = rng.standard_normal((ny, nx), dtype=np.float32)
        shaped = np.fft.irfft2(np.fft.rfft2(white) * amp, s=(ny, nx)).astype(np.float32)
        shaped /= np.float32(shaped.std() or 1.0)
        pool[i] = shaped
    return pool


@dataclass
class NoisePlan:
    seed: int
    sigma: float
    shoulder_z: float
    """LPS z (mm) below which noise rises (around C6-C7)."""
    shoulder_span: float
    shoulder_gain: float


def add_noise(img: np.ndarray, z_index: int, z_mm: float, pool: np.ndarray,
              plan: NoisePlan) -> None:
    if plan.sigma <= 0:
        return
    rng = np.random.default_rng([plan.seed, 99, z_index])
    i, j = rng.integers(pool.shape[0], size=2)
    ny, nx = img.shape
    a = np.roll(pool[i], (int(rng.integers(ny)), int(rng.integers(nx))), axis=(0, 1))
    b = np.roll(pool[j][::-1] if rng.random() < 0.5 else pool[j],
                (int(rng.integers(ny)), int(rng.integers(nx))), axis=(0, 1))
    depth = np.clip((plan.shoulder_z - z_mm) / plan.shoulder_span, 0, 1)
    sigma = plan.sigma * (1.0 + plan.shoulder_gain * depth)
    img += np.float32(sigma / math.sqrt(2)) * (a + b)


@dataclass
class Streak:
    """A straight streak in one slice: signed amplitude (HU), line through ``(x0, y0)`` at
    ``angle_deg`` from the x axis, Gaussian width ``width_mm``, and ``fade`` describing how
    it falls off with distance from ``(x0, y0)`` (mm; 0 = uniform)."""

    amplitude: float
    x0: float
    y0: float
    angle_deg: float
    width_mm: float
    fade_mm: float = 0.0


def paint_streaks(img: np.ndarray, xs: np.ndarray, ys: np.ndarray,
                  streaks: list[Streak], mask_min_hu: float | None = None) -> np.ndarray:
    """Add streaks to ``img`` in place; returns the added field (HU) for ground truth."""
    total = np.zeros(img.shape, dtype=np.float32)
    for st in streaks:
        t = math.radians(st.angle_deg)
        nx_, ny_ = -math.sin(t), math.cos(t)
        rows = slice(None)
        if abs(ny_) > 0.5:
            # Mostly horizontal line: only the rows within 4 widths of it are touched.
            ends = [st.y0 + (float(xs[i]) - st.x0) * math.tan(t) for i in (0, -1)]
            pad = 4.0 * st.width_mm / abs(ny_)
            j0 = int(np.searchsorted(ys, min(ends) - pad))
            j1 = int(np.searchsorted(ys, max(ends) + pad))
            if j0 >= j1:
                continue
            rows = slice(j0, j1)
        x = xs[None, :] - np.float32(st.x0)
        y = ys[rows, None] - np.float32(st.y0)
        dist = x * np.float32(nx_) + y * np.float32(ny_)
        field = np.exp(-(dist / np.float32(st.width_mm)) ** 2) * np.float32(st.amplitude)
        if st.fade_mm > 0:
            along = np.sqrt(x * x + y * y)
            field = (field / (1 + along / np.float32(st.fade_mm))).astype(np.float32)
        total[rows] += field
    if mask_min_hu is not None:
        total *= img > np.float32(mask_min_hu)
    img += total
    return total


def shoulder_streaks(rng: np.random.Generator, body_x: float, body_y: float,
                     strength: float) -> list[Streak]:
    """Left-right photon-starvation streaks through the lower neck."""
    out = []
    for _ in range(int(rng.integers(3, 7))):
        out.append(Streak(amplitude=float(rng.choice([-1, 1]) * rng.uniform(20, 70) * strength),
                          x0=body_x, y0=float(body_y + rng.uniform(-40, 40)),
                          angle_deg=float(rng.normal(0, 6)), width_mm=float(rng.uniform(0.8, 3.0))))
    return out


def metal_streaks(rng: np.random.Generator, cx: float, cy: float) -> list[Streak]:
    """Bright and dark streaks radiating from metal at (cx, cy)."""
    out = []
    for _ in range(int(rng.integers(6, 12))):
        out.append(Streak(amplitude=float(rng.choice([-1, 1]) * rng.uniform(150, 500)),
                          x0=cx, y0=cy, angle_deg=float(rng.uniform(0, 180)),
                          width_mm=float(rng.uniform(0.5, 1.5)), fade_mm=25.0))
    return out
