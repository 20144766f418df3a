"""Figures that let a person judge the phantoms: axial slice, sagittal reformat and a
3D-ish MIP of a fractured and of a normal phantom, saved as PNG (for docs/ and README).

Run: ``python -m service.synthetic.figures docs/``. matplotlib is a dev dependency and is
imported lazily, so the runtime package never needs it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from service.synthetic.options import (
    LABEL_OF,
    FractureSpec,
    FractureType,
    MimicSpec,
    MimicType,
    PhantomOptions,
)
from service.synthetic.phantom import Phantom, generate_phantom

logger = logging.getLogger(__name__)

BONE_WINDOW = (-450.0, 1550.0)
"""Display window (HU) of the bone window, level 550 / width 2000."""


def _window(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((img.astype(np.float32) - lo) / (hi - lo), 0, 1)


def sagittal(phantom: Phantom, x_index: int) -> np.ndarray:
    """Sagittal reformat at column ``x_index``: rows head (top) to feet, columns anterior
    (left) to posterior, resampled to square pixels."""
    plane = phantom.hu[:, :, x_index][::-1].astype(np.float32)
    return _square(plane, phantom.spacing[0], phantom.spacing[1])


def _square(plane: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    from scipy.ndimage import zoom

    factor = row_mm / col_mm
    return zoom(plane, (factor, 1.0), order=1) if abs(factor - 1) > 1e-3 else plane


def oblique_mip(phantom: Phantom, angle_deg: float = 35.0, threshold: float = 180.0) -> np.ndarray:
    """Slab maximum intensity projection of bone around the spine (12 mm in front of and
    behind the vertebrae, 60 mm left and right, so the mandible and shoulders stay out)
    after rotating the patient ``angle_deg`` about the vertical axis: a '3D-ish' view.
    Rows head to feet."""
    from scipy.ndimage import rotate

    zz, yy, xx = np.nonzero(phantom.labels[::4, ::4, ::4] > 0)
    margin = int(round(12.0 / phantom.spacing[1]))
    y0, y1 = max(4 * yy.min() - margin, 0), 4 * yy.max() + margin
    xc = int(4 * np.median(xx))
    half = int(round(60.0 / phantom.spacing[2]))
    x0, x1 = max(xc - half, 0), xc + half
    step = max(1, (x1 - x0) // 200)
    vol = phantom.hu[:, y0:y1:step, x0:x1:step].astype(np.float32)
    vol = np.where(vol > threshold, vol, threshold)
    rotated = rotate(vol, angle_deg, axes=(1, 2), reshape=True, order=1, cval=threshold)
    mip = rotated.max(axis=1)[::-1]
    return _square(mip, phantom.spacing[0], phantom.spacing[2] * step)


def _axial_index(phantom: Phantom) -> tuple[int, str]:
    if phantom.fractures:
        f = phantom.fractures[0]
        return (f.bbox[0] + f.bbox[3]) // 2, f"{f.vertebra} {f.type.value} fracture"
    label = LABEL_OF["C5"]
    zs = np.flatnonzero((phantom.labels == label).any(axis=(1, 2)))
    k = int(zs[len(zs) // 2]) if len(zs) else phantom.shape[0] // 2
    return k, "C5, no fracture"


def _sagittal_x(phantom: Phantom) -> int:
    if phantom.fractures:
        f = phantom.fractures[0]
        return (f.bbox[2] + f.bbox[5]) // 2
    cols = np.flatnonzero((phantom.labels > 0).any(axis=(0, 1)))
    return int(cols.mean()) if len(cols) else phantom.shape[2] // 2


def render_panel(phantom: Phantom, path: Path, title: str) -> None:
    """One PNG: axial | sagittal | MIP, with the fracture boxes outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    k, axial_title = _axial_index(phantom)
    x = _sagittal_x(phantom)
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), dpi=100,
                             gridspec_kw={"width_ratios": [1, 1, 1]})
    lo, hi = BONE_WINDOW
    # Axial: a 120 mm square around the spine, so the vertebra is large enough to judge.
    ys, xs = np.nonzero((phantom.labels[k] > 0) | (phantom.labels.max(axis=0) > 0))
    half = int(round(60.0 / phantom.spacing[1]))
    cy, cx = (int(np.median(ys)), int(np.median(xs))) if len(ys) else (
        phantom.shape[1] // 2, phantom.shape[2] // 2)
    r0, c0 = max(cy - half, 0), max(cx - half, 0)
    axes[0].imshow(_window(phantom.hu[k, r0:r0 + 2 * half, c0:c0 + 2 * half], lo, hi),
                   cmap="gray", interpolation="nearest")
    axes[0].set_title(f"axial z={k} (120 mm crop): {axial_title}", fontsize=10)
    for f in phantom.fractures:
        for z, y0, x0, y1, x1 in f.slice_boxes:
            if z == k:
                axes[0].add_patch(patches.Rectangle((x0 - c0 - 2, y0 - r0 - 2), x1 - x0 + 4,
                                                    y1 - y0 + 4, fill=False, edgecolor="red",
                                                    lw=0.8))
    sag = sagittal(phantom, x)
    axes[1].imshow(_window(sag, lo, hi), cmap="gray", interpolation="bilinear")
    axes[1].set_title(f"sagittal reformat, column {x}", fontsize=10)
    factor = phantom.spacing[0] / phantom.spacing[1]
    nz = phantom.shape[0]
    for f in phantom.fractures:
        if f.bbox[2] <= x < f.bbox[5]:
            z0, z1 = nz - f.bbox[3], nz - f.bbox[0]
            axes[1].add_patch(patches.Rectangle(
                (f.bbox[1] - 2, z0 * factor - 2), f.bbox[4] - f.bbox[1] + 4,
                (z1 - z0) * factor + 4, fill=False, edgecolor="red", lw=0.8))
    mip = oblique_mip(phantom)
    axes[2].imshow(_window(mip, 150, 1900), cmap="gray", interpolation="bilinear")
    axes[2].set_title("bone MIP, rotated 35 degrees", fontsize=10)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


FIGURE_CASES: dict[str, PhantomOptions] = {
    "phantom_fractured": PhantomOptions(
        seed=11, fractures=[FractureSpec(FractureType.BODY, "C6", 1.0),
                            FractureSpec(FractureType.LAMINA, "C6"),
                            FractureSpec(FractureType.DENS_TYPE_II, "C2")],
        mimics=[MimicSpec(MimicType.ANTERIOR_OSTEOPHYTE, "C4")], osteopenia=0.3),
    "phantom_normal": PhantomOptions(seed=12, mimics=[MimicSpec(MimicType.BASIVERTEBRAL_CHANNEL,
                                                                "C5")]),
    "phantom_compression": PhantomOptions(
        seed=13, fractures=[FractureSpec(FractureType.COMPRESSION, "C5")], osteopenia=0.6),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="directory for the PNG files (e.g. docs/)")
    parser.add_argument("--only", action="append", help="case name(s) to render")
    args = parser.parse_args(argv)
    for name, options in FIGURE_CASES.items():
        if args.only and name not in args.only:
            continue
        phantom = generate_phantom(options)
        kinds = ", ".join(f"{f.vertebra} {f.type.value}" for f in phantom.fractures) or "none"
        mims = ", ".join(f"{m.vertebra} {m.type.value}" for m in phantom.mimics) or "none"
        title = (f"SYNTHETIC phantom seed {options.seed} - fractures: {kinds}; "
                 f"mimics: {mims}; {phantom.spacing[1]:.2f} mm pixels, "
                 f"{phantom.spacing[0]:.3f} mm slices, {phantom.kernel} kernel")
        render_panel(phantom, args.out / f"{name}.png", title)
        print(f"{name}: generated in {phantom.timings['total']:.1f} s -> "
              f"{args.out / name}.png")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
