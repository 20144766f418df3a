"""Reformats of the real scans with the reference vertebral levels marked, for review.

``python -m service.evaluation.real_figures docs/real-scans [--data DIR]`` draws, for every
scan of the data directory (default ``../shared/data`` beside the repository) that has an
entry in ``real_reference.json``, one PNG: a curved mid-sagittal reformat (the plane follows
the x of the reference body centres, a 4 mm mean slab) and a curved coronal reformat (the
plane follows their y, through the bodies), in a bone window (W 1800 / L 400), with patient
coordinates in mm (DICOM LPS: x to the patient's left, y posterior; z = patient superior
on the vertical axis) and a 10 mm grid. Each reference level is marked: its body centre (dot
and name) and its superior and inferior endplate centres (short bars).

Only figures are written (no pixel data, no crops). matplotlib is a dev dependency: it is
imported inside :func:`draw_scan`, so importing this module costs nothing at runtime.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

WINDOW = (1800.0, 400.0)
"""Bone window (width, level) in HU."""
SLAB_MM = 4.0
"""Thickness of the mean slab of each reformat."""
STEP_MM = 0.5
"""Sampling step of the reformats (the slices are 3-4 mm apart: linear interpolation)."""
HALF_WIDTH_MM = 70.0
"""In-plane half width shown around the spine."""
ZOOM_WINDOW = (1000.0, 300.0)
"""Narrower window of the zoomed cervical views: discs (about 80 HU) apart from bone."""


def _plane_track(levels: list[dict[str, Any]], axis: int, zs: np.ndarray) -> np.ndarray:
    """The x (axis 0) or y (axis 1) of the reference centres, interpolated along z
    (held constant beyond the first and last level) and lightly smoothed."""
    centres = np.array([lv["centre_lps"] for lv in levels], dtype=np.float64)
    order = np.argsort(centres[:, 2])
    track = np.interp(zs, centres[order, 2], centres[order, axis])
    return np.asarray(ndimage.gaussian_filter1d(track, 10.0 / STEP_MM, mode="nearest"))


def _sample(hu: np.ndarray, affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``hu`` at (..., 3) LPS points (air outside the volume)."""
    index = np.linalg.solve(affine[:3, :3], (points.reshape(-1, 3) - affine[:3, 3]).T)
    values = ndimage.map_coordinates(hu, index, order=1, mode="constant", cval=-1000.0)
    return np.asarray(values.reshape(points.shape[:-1]))


def reformats(hu: np.ndarray, affine: np.ndarray, levels: list[dict[str, Any]], *,
              z_range: tuple[float, float] | None = None,
              half_width: float = HALF_WIDTH_MM) -> dict[str, Any]:
    """Curved sagittal and coronal reformats (HU, float32) and their mm extents.

    ``z_range`` (LPS mm) limits the reformats to part of the scan (a zoomed view).
    """
    hu = hu.astype(np.float32, copy=False)
    corners = np.array([[i, j, k] for i in (0, hu.shape[0] - 1) for j in (0, hu.shape[1] - 1)
                        for k in (0, hu.shape[2] - 1)], dtype=np.float64)
    lps = corners @ affine[:3, :3].T + affine[:3, 3]
    z_lo, z_hi = float(lps[:, 2].min()), float(lps[:, 2].max())
    if z_range is not None:
        z_lo, z_hi = max(z_lo, min(z_range)), min(z_hi, max(z_range))
    zs = np.arange(z_lo, z_hi + 1e-6, STEP_MM)
    track_x = _plane_track(levels, 0, zs)
    track_y = _plane_track(levels, 1, zs)
    centres = np.array([lv["centre_lps"] for lv in levels], dtype=np.float64)
    shown = centres[(centres[:, 2] >= z_lo - 20) & (centres[:, 2] <= z_hi + 20)]
    shown = shown if len(shown) else centres
    # The sagittal panel runs from in front of the bodies to behind the spinous processes.
    y_lo, y_hi = float(shown[:, 1].min()) - 0.5 * half_width, float(shown[:, 1].max()) + half_width
    ys = np.arange(y_lo, y_hi + 1e-6, STEP_MM)
    x_mid = float(shown[:, 0].mean())
    xs = np.arange(x_mid - half_width, x_mid + half_width + 1e-6, STEP_MM)
    slab = np.arange(-SLAB_MM / 2, SLAB_MM / 2 + 1e-6, 1.0)

    sagittal = np.zeros((zs.size, ys.size), dtype=np.float32)
    coronal = np.zeros((zs.size, xs.size), dtype=np.float32)
    for d in slab:
        pts = np.empty((zs.size, ys.size, 3))
        pts[..., 0] = (track_x + d)[:, None]
        pts[..., 1] = ys[None, :]
        pts[..., 2] = zs[:, None]
        sagittal += _sample(hu, affine, pts) / slab.size
        pts = np.empty((zs.size, xs.size, 3))
        pts[..., 0] = xs[None, :]
        pts[..., 1] = (track_y + d)[:, None]
        pts[..., 2] = zs[:, None]
        coronal += _sample(hu, affine, pts) / slab.size
    return {
        "sagittal": sagittal, "coronal": coronal,
        "sagittal_extent": (float(ys[0]), float(ys[-1]), z_lo, z_hi),
        "coronal_extent": (float(xs[0]), float(xs[-1]), z_lo, z_hi),
    }


def draw_scan(hu: np.ndarray, affine: np.ndarray, entry: dict[str, Any], out: Path, *,
              title: str | None = None, dpi: int = 80,
              z_range: tuple[float, float] | None = None,
              half_width: float = HALF_WIDTH_MM,
              window: tuple[float, float] = WINDOW,
              predicted: dict[str, tuple[float, float, float]] | None = None) -> Path:
    """Draw one scan's reformats with its reference levels into ``out`` (PNG).

    ``z_range`` and ``half_width`` (mm) draw a zoomed view; ``window`` is (width, level) HU.
    ``predicted`` (name -> LPS centre, e.g. a model's level centres) is drawn in magenta,
    named on the far side of the reference names; centres outside the panels are listed in
    the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MultipleLocator

    levels = entry["levels"]
    views = reformats(hu, affine, levels, z_range=z_range, half_width=half_width)
    width, level = window
    z_lo, z_hi = views["sagittal_extent"][2:]
    height_in = max(6.0, min(16.0, (z_hi - z_lo) / 26.0))
    widths = [views[f"{key}_extent"][1] - views[f"{key}_extent"][0]
              for key in ("sagittal", "coronal")]
    fig, axes = plt.subplots(1, 2, figsize=(height_in * sum(widths) / (z_hi - z_lo) + 1.8,
                                            height_in),
                             gridspec_kw={"width_ratios": widths}, squeeze=True)
    panels = (("sagittal", 1, "y (LPS mm, posterior +)", "curved mid-sagittal"),
              ("coronal", 0, "x (LPS mm, patient left +)", "curved coronal"))
    for ax, (key, axis, xlabel, label) in zip(axes, panels, strict=True):
        ax.set_facecolor("black")
        ax.imshow(views[key], cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
                  origin="lower", extent=views[f"{key}_extent"], interpolation="bilinear")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("z (LPS mm, superior +)", fontsize=8)
        ax.set_title(f"{label}, W {width:.0f} / L {level:.0f}", fontsize=9)
        ax.xaxis.set_major_locator(MultipleLocator(20))
        ax.yaxis.set_major_locator(MultipleLocator(20))
        ax.xaxis.set_minor_locator(MultipleLocator(10))
        ax.yaxis.set_minor_locator(MultipleLocator(10))
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", color="yellow", alpha=0.18, linewidth=0.4)
        for lv in levels:
            if not z_lo - 1 <= lv["centre_lps"][2] <= z_hi + 1:
                continue
            colour = "orange" if lv.get("cut") else "cyan"
            c, s, i = (np.asarray(lv[k], dtype=float) for k in
                       ("centre_lps", "superior_endplate_lps", "inferior_endplate_lps"))
            ax.plot([c[axis]], [c[2]], "+", ms=5, mew=1.0, color=colour)
            # Endplates as ticks beside the body (in front of it on the sagittal, on both
            # sides on the coronal), so that the disc between them stays visible.
            for p in (s, i):
                spans = ((-16, -9),) if axis == 1 else ((-20, -13), (13, 20))
                for a, b in spans:
                    ax.plot([p[axis] + a, p[axis] + b], [p[2], p[2]], "-", lw=1.0,
                            color=colour)
            ax.text(c[axis] - 22 if axis == 1 else c[axis] + 25, c[2], lv["name"],
                    color=colour, fontsize=7, va="center", ha="center")
        x_lo, x_hi = views[f"{key}_extent"][:2]
        for name, centre in (predicted or {}).items():
            if z_lo <= centre[2] <= z_hi and x_lo <= centre[axis] <= x_hi:
                ax.plot([centre[axis]], [centre[2]], "x", ms=5, mew=1.2, color="magenta")
                ax.text(centre[axis] + 14 if axis == 1 else centre[axis] - 25, centre[2],
                        name, color="magenta", fontsize=7, va="center", ha="center")
    outside = [name for name, c in (predicted or {}).items() if not z_lo <= c[2] <= z_hi]
    suptitle = title or entry.get("name", "")
    if predicted is not None:
        suptitle += "\ncyan/orange +: reference; magenta x: predicted" + (
            f" (outside the view: {', '.join(outside)})" if outside else "")
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from service.config import Settings
    from service.evaluation.levels import LevelReferenceError, load_reference, reference_for
    from service.evaluation.scans import default_data_dir, find_scans, load_scan
    from service.findings import VERTEBRAE

    parser = argparse.ArgumentParser(prog="python -m service.evaluation.real_figures",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory for the PNGs (e.g. docs/real-scans)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data directory (default: ../shared/data beside the repository)")
    parser.add_argument("--dpi", type=int, default=70)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data or default_data_dir()
    reference = load_reference()
    scans = find_scans(data)
    if not scans:
        print(f"no scans under {data}", file=sys.stderr)
        return 1
    for name, paths in scans:
        volume = load_scan(paths, Settings())
        try:
            entry = reference_for(volume, reference)
        except LevelReferenceError as exc:
            print(f"{name}: skipped: {exc}", file=sys.stderr)
            continue
        out = draw_scan(volume.hu, volume.affine, entry, args.out / f"{name}-levels.png",
                        title=f"{name}: reference levels (read in this repository)",
                        dpi=args.dpi)
        print(out)
        cervical = [lv["centre_lps"][2] for lv in entry["levels"]
                    if lv["name"] in VERTEBRAE or lv["name"] == "T1"]
        if cervical:
            out = draw_scan(volume.hu, volume.affine, entry, args.out / f"{name}-cervical.png",
                            title=f"{name}: cervical levels, zoomed (W {ZOOM_WINDOW[0]:.0f} / "
                                  f"L {ZOOM_WINDOW[1]:.0f} shows the discs better)",
                            dpi=args.dpi + 20, z_range=(min(cervical) - 20, max(cervical) + 20),
                            half_width=40.0, window=ZOOM_WINDOW)
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
