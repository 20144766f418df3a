"""Figures of fractures planted in the real scans: original beside planted, bone window.

For each showcase plant (:data:`SHOWCASE`) one PNG: the axial slice through the fracture and
a sagittal reformat through it (at the fracture point's column), original on the left,
planted on the right, cropped around the site, window W 1800 / L 400, pixels at their true
aspect (slices stretched to their thickness). matplotlib is imported lazily (not a runtime
dependency of the service).

    python -m service.evaluation.planting_figures --data ../shared/data --out docs/real-scans

The figures show simulated fractures in two real scans, not clinical data.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.evaluation.planting import (
    FractureKind,
    PlantingError,
    PlantResult,
    PlantSpec,
    SourceScan,
    find_sources,
    load_source,
    plant,
)

logger = logging.getLogger(__name__)

WINDOW = (400.0, 1800.0)
"""Bone window (level, width) in HU."""
CROP_MM = 35.0
"""Half width of the crop around the fracture point."""

SHOWCASE: tuple[tuple[str, PlantSpec], ...] = (
    ("real-ct-head-neck", PlantSpec("C4", FractureKind.BODY, orientation="coronal",
                                    gap_mm=1.5, gap_hu=60.0, displacement_mm=1.5)),
    ("real-ct-head-neck", PlantSpec("C2", FractureKind.DENS, gap_mm=1.5, gap_hu=60.0,
                                    displacement_mm=1.5)),
    ("real-ct-head-neck", PlantSpec("C5", FractureKind.LAMINA, side="left", gap_mm=1.5,
                                    displacement_mm=1.5)),
    ("real-ct-head-neck", PlantSpec("C3", FractureKind.TRANSVERSE, side="left", gap_mm=1.5,
                                    displacement_mm=1.5)),
    ("real-ct-head-neck", PlantSpec("C5", FractureKind.COMPRESSION, height_loss=0.35,
                                    band_hu=250.0)),
    ("real-ct-chest-neck", PlantSpec("C6", FractureKind.SPINOUS, gap_mm=1.8,
                                     displacement_mm=1.8)),
    ("real-ct-chest-neck", PlantSpec("C5", FractureKind.PEDICLE, side="right", gap_mm=1.8,
                                     displacement_mm=1.5)),
)
"""(scan name, plant) drawn into ``planted-<scan>-<level>-<kind>.png``."""


def _window(hu: np.ndarray) -> np.ndarray:
    level, width = WINDOW
    return np.asarray(np.clip((hu - (level - width / 2)) / width, 0.0, 1.0))


def draw_plant(original: np.ndarray, planted: np.ndarray, affine: np.ndarray,
               result: PlantResult, path: Path, title: str,
               centre_lps: Sequence[float] | None = None) -> Path:
    """Axial and sagittal views through ``result``'s point, original | planted; PNG.

    The crop is centred on ``centre_lps`` in plane (the level's body centre: the anatomy
    around the site stays in view) or on the fracture point; a yellow arrow points at the
    fracture point on every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = np.linalg.solve(affine[:3, :3], np.asarray(result.point_lps) - affine[:3, 3])
    middle = index if centre_lps is None else np.linalg.solve(
        affine[:3, :3], np.asarray(centre_lps, dtype=np.float64) - affine[:3, 3])
    # Pick the slice with the most changed voxels near the point: the line is easiest seen.
    z = int(np.clip(round(index[0]), 0, original.shape[0] - 1))
    if result.slices:
        changed = np.abs(planted.astype(np.float32) - original) >= 25
        counts = {k: int(changed[k].sum()) for k in result.slices}
        z = max(counts, key=lambda k: (counts[k], -abs(k - index[0])))
    col = int(np.clip(round(index[2]), 0, original.shape[2] - 1))
    row = int(np.clip(round(middle[1]), 0, original.shape[1] - 1))
    mid_col = int(np.clip(round(middle[2]), 0, original.shape[2] - 1))
    dz = float(np.linalg.norm(affine[:3, 0]))
    dy = float(np.linalg.norm(affine[:3, 1]))
    dx = float(np.linalg.norm(affine[:3, 2]))
    half_r, half_c = int(CROP_MM / dy), int(CROP_MM / dx)
    r0, r1 = max(row - half_r, 0), min(row + half_r, original.shape[1])
    c0, c1 = max(mid_col - half_c, 0), min(mid_col + half_c, original.shape[2])
    half_z = int(CROP_MM / dz)
    z0, z1 = max(int(round(index[0])) - half_z, 0), min(int(round(index[0])) + half_z + 1,
                                                        original.shape[0])
    fig, axes = plt.subplots(2, 2, figsize=(7.2, 7.6), dpi=100)
    for column, (label, volume) in enumerate((("original", original), ("planted", planted))):
        axial = _window(volume[z, r0:r1, c0:c1].astype(np.float32))
        axes[0, column].imshow(axial, cmap="gray", vmin=0, vmax=1, interpolation="nearest",
                               aspect=dy / dx)
        axes[0, column].set_title(f"{label}: axial, slice {z}", fontsize=9)
        # Sagittal: rows of the reformat are z (superior at the top), columns are y.
        sagittal = volume[z0:z1, r0:r1, col].astype(np.float32)
        superior_up = affine[2, 0] > 0
        if superior_up:
            sagittal = sagittal[::-1]
        axes[1, column].imshow(_window(sagittal), cmap="gray", vmin=0, vmax=1,
                               interpolation="nearest", aspect=dz / dy)
        axes[1, column].set_title(f"{label}: sagittal at column {col}", fontsize=9)
        zi = z - z0 if not superior_up else (z1 - 1 - z)
        axes[1, column].axhline(zi, color="#3aa0ff", lw=0.6, alpha=0.6)
        zp = index[0] - z0 if not superior_up else (z1 - 1 - index[0])
        for ax, (px, py), (sx, sy) in (
                (axes[0, column], (index[2] - c0, index[1] - r0), (dx, dy)),
                (axes[1, column], (index[1] - r0, zp), (dy, dz))):
            ax.annotate("", xy=(px, py), xytext=(px + 9 / sx, py - 9 / sy),
                        arrowprops={"arrowstyle": "->", "color": "yellow", "lw": 0.9})
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title + "\nsimulated fracture in a real scan (not clinical data); "
                 "W 1800 / L 400", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _describe(scan: SourceScan, spec: PlantSpec) -> str:
    where = f"{spec.side} " if spec.side else ""
    if spec.kind == FractureKind.COMPRESSION:
        what = (f"compression: anterior height -{spec.height_loss:.0%}, "
                f"band +{spec.band_hu:.0f} HU")
    else:
        what = (f"{where}{spec.kind} line{f' ({spec.orientation})' if spec.kind == 'body' else ''}"
                f": gap {spec.gap_mm} mm at {spec.gap_hu:.0f} HU, "
                f"shift {spec.displacement_mm} mm")
    return f"{scan.name} {spec.level}: {what}"


def draw_showcase(data: Path, out: Path,
                  showcase: Sequence[tuple[str, PlantSpec]] = SHOWCASE) -> list[Path]:
    scans = {d.name: d for d in find_sources(data)}
    loaded: dict[str, SourceScan] = {}
    written: list[Path] = []
    for name, spec in showcase:
        if name not in scans:
            logger.warning("%s not under %s; skipped", name, data)
            continue
        scan = loaded.get(name) or load_source(scans[name])
        loaded[name] = scan
        try:
            planted, result = plant(scan.hu, scan.affine, scan.reference_levels, spec,
                                    thickness_mm=scan.thickness_mm)
        except PlantingError as exc:
            logger.warning("%s %s: %s", name, spec.kind, exc)
            continue
        path = out / f"planted-{name}-{spec.level}-{spec.kind}.png"
        centre = {e["name"]: e for e in scan.reference_levels}[spec.level]["centre_lps"]
        written.append(draw_plant(scan.hu, planted, scan.affine, result, path,
                                  _describe(scan, spec), centre_lps=centre))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.evaluation.planting_figures")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/real-scans"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for path in draw_showcase(args.data, args.out):
        print(path, f"{path.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
