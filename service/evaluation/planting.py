"""Fractures planted in the bone of a real CT, written as an RSNA-layout dataset.

No labelled real fracture can be downloaded here, so the real-bone test set is made: a
fracture is drawn into a real scan at a chosen vertebral level and site, and the scan is
written again under new UIDs with the ground truth beside it. The unplanted scan is written
too (its own new UIDs) as the negative, so ``triage evaluate`` on the directory measures
sensitivity and specificity on the same real anatomy. These are *simulated* fractures in
real bone, not clinical data.

Where a level is
    From the level reference (``real_reference.json``, :mod:`service.evaluation.levels`):
    the body centre and the superior / inferior endplate centres in LPS mm. On the volume
    itself (:func:`measure_level`), profiles of the lightly smoothed HU through the body
    centre find the anterior and posterior walls of the body, its half width, the spinal
    canal behind it (the first run of non-bone at least :data:`CANAL_MIN_RUN_MM` long
    behind the body) and the bone that closes the canal posteriorly (the lamina junction).
    Posterior sites (pedicle, lamina, spinous and transverse processes) are the bone voxels
    of boxes placed relative to the canal, at the level's height.

What a fracture is
    A *line* (:data:`LINE_KINDS`): a slab ``gap_mm`` wide (1-2 mm) through the site's bone,
    whose voxels move towards ``gap_hu`` (40-80 HU, haematoma / soft tissue). The fragment
    on the positive side of the slab is displaced ``displacement_mm`` (1-2 mm) along the
    fracture plane, fading out beyond the site radius, so where the line meets the cortex
    the fragment's cortex steps against the other fragment's. A displaced fragment may not
    grow beyond the original bone (only bone voxels change): on its leading side the
    original cortex is kept, the step shows on its trailing side.
    *Compression* (:data:`FractureKind.COMPRESSION`): the superior half of the body is
    squashed so that the anterior body height loses ``height_loss`` (20-40 %), none at the
    posterior wall (a wedge); the bone that ends up above the new endplate takes the value
    of what lies above the old one (disc), and a band ``band_hu`` denser (impaction) lies
    under the compressed endplate, stronger anteriorly.

Partial volume
    The edit is computed on sub-samples of every voxel (through the slice thickness at
    :data:`SUBSAMPLE_MM` steps, 2 x 2 in plane) and averaged, then blurred in plane with a
    Gaussian of :data:`PSF_SIGMA_PX` pixels (the scanner's in-plane PSF). It is applied
    with a weight that is 0 at or below :data:`BONE_HU` in the *original* and 1 from
    :data:`BONE_FULL_HU`: voxels that were not bone never change.

Coordinates are DICOM LPS mm through ``Volume.affine`` ((z, y, x, 1) -> LPS); "anterior"
is -y, "left" is +x (the patient's left), "superior" is +z. numpy, scipy and pydicom only.

CLI::

    python -m service.evaluation.planting --data ../shared/data --out var/planted \
        --per-scan 6 --seed 0

Never write the output into the repository: it holds pixels of the real scans.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from service.findings import VERTEBRAE

logger = logging.getLogger(__name__)

BONE_HU = 150.0
"""Original HU at or below which a voxel never changes (not bone)."""
BONE_FULL_HU = 200.0
"""Original HU from which the edit applies in full (a linear ramp from :data:`BONE_HU`)."""
PSF_SIGMA_PX = 0.6
"""In-plane Gaussian (pixels) the edit is blurred with: the scanner's point spread."""
SUBSAMPLE_MM = 0.5
"""Step of the sub-samples through the slice thickness."""
CANAL_MIN_RUN_MM = 5.0
"""A run of non-bone behind the body at least this long is the canal (a basivertebral
channel is shorter)."""
VISIBLE_HU = 25.0
"""A voxel changed by at least this much counts as planted (boxes, changed-voxel counts)."""
MIN_CHANGED_VOXELS = 20
UID_NAMESPACE = uuid.UUID("5d0b8a52-64b0-5a0e-9a43-6f0c3a1d7e21")
"""uuid5 namespace of the planted UIDs (2.25.<uuid as integer>)."""
PLANTABLE_LEVELS: tuple[str, ...] = ("C2", "C3", "C4", "C5", "C6", "C7")
"""C1 has no body and no processes of this kind: not planted."""
VERTEBRA_COLUMNS: tuple[str, ...] = VERTEBRAE
"""RSNA 2022's per-vertebra columns are named as our levels."""
TRAIN_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRA_COLUMNS]
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
PLANTED_CSV = "planted_fractures.csv"
"""Ours, not RSNA's: every planted fracture with its parameters and source scan."""
PLANTED_COLUMNS = ["StudyInstanceUID", "source_series_instance_uid", "scan", "level", "kind",
                   "side", "point_lps", "normal_lps", "shift_lps", "gap_mm", "gap_hu",
                   "displacement_mm", "height_loss", "band_hu", "orientation",
                   "changed_voxels", "first_slice_number", "last_slice_number"]


class PlantingError(ValueError):
    """The fracture cannot be planted as asked (no bone at the site, level unknown...)."""


class FractureKind(StrEnum):
    BODY = "body"
    """Thin lucent line through the vertebral body."""
    DENS = "dens"
    """Type II odontoid fracture: a line through the dens base (C2 only)."""
    PEDICLE = "pedicle"
    LAMINA = "lamina"
    SPINOUS = "spinous"
    TRANSVERSE = "transverse"
    COMPRESSION = "compression"
    """Anterior wedge of the body with a dense impaction band."""


LINE_KINDS = frozenset(set(FractureKind) - {FractureKind.COMPRESSION})
SIDED_KINDS = frozenset({FractureKind.PEDICLE, FractureKind.LAMINA, FractureKind.TRANSVERSE})
BODY_ORIENTATIONS = ("coronal", "sagittal", "oblique")


@dataclass(frozen=True)
class PlantSpec:
    """One fracture to plant. Millimetres and HU; ``side`` is the patient's."""

    level: str
    kind: FractureKind
    side: str | None = None
    """"left" / "right" for pedicle, lamina and transverse process; None otherwise."""
    gap_mm: float = 1.5
    gap_hu: float = 60.0
    displacement_mm: float = 1.5
    orientation: str = "coronal"
    """Body lines: "coronal" (normal anterior-posterior), "sagittal" or "oblique"."""
    tilt: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Added to the site's nominal normal before normalising (a small random tilt)."""
    offset_mm: float = 0.0
    """Line position from the site's point along the normal."""
    shift_sign: float = 1.0
    height_loss: float = 0.3
    """Compression: fraction of the anterior body height lost."""
    band_hu: float = 220.0
    """Compression: HU added in the impaction band under the compressed endplate."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", FractureKind(self.kind))
        if self.kind in SIDED_KINDS and self.side not in ("left", "right"):
            raise PlantingError(f"{self.kind} needs side 'left' or 'right', not {self.side!r}")
        if self.kind == FractureKind.DENS and self.level != "C2":
            raise PlantingError(f"a dens fracture is at C2, not {self.level}")
        if not 0.0 < self.height_loss < 0.5:
            raise PlantingError(f"height_loss must be in (0, 0.5), not {self.height_loss}")
        if self.orientation not in BODY_ORIENTATIONS:
            raise PlantingError(f"orientation must be one of {BODY_ORIENTATIONS}")

    def key(self) -> str:
        """Canonical text of the spec (part of the planted UIDs)."""
        data = asdict(self)
        data["kind"] = str(self.kind)
        return json.dumps(data, sort_keys=True, default=float)


@dataclass(frozen=True)
class LevelGeometry:
    """A level measured on the volume (LPS mm)."""

    name: str
    centre: np.ndarray
    superior: np.ndarray
    """Superior endplate centre (C2: the dens base, the top of its body)."""
    inferior: np.ndarray
    dens_tip: np.ndarray | None
    anterior_y: float
    posterior_y: float
    half_width: float
    canal_centre: np.ndarray
    canal_posterior_y: float
    """Where bone closes the canal behind (lamina junction / spinous base)."""
    canal_half_width: float

    @property
    def height(self) -> float:
        return float(np.linalg.norm(self.superior - self.inferior))

    @property
    def axis(self) -> np.ndarray:
        """Unit vector from the inferior to the superior endplate."""
        return np.asarray((self.superior - self.inferior) / max(self.height, 1e-6))

    def h(self, points: np.ndarray) -> np.ndarray:
        """Height of LPS points above the inferior endplate along :attr:`axis` (mm)."""
        return np.asarray((points - self.inferior) @ self.axis)


@dataclass
class PlantResult:
    spec: PlantSpec
    point_lps: tuple[float, float, float]
    normal_lps: tuple[float, float, float]
    shift_lps: tuple[float, float, float]
    changed_voxels: int
    slices: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    """z index -> (row0, col0, row1, col1) (exclusive ends) of the voxels changed by at least
    :data:`VISIBLE_HU` on that slice."""


# --------------------------------------------------------------------------- geometry

Region = Callable[[np.ndarray], np.ndarray]
"""LPS points (..., 3) -> bool (...): inside a site's box."""


class _Roi:
    """A sub-block of the volume with LPS coordinates of its voxel centres."""

    def __init__(self, hu: np.ndarray, affine: np.ndarray, lo: Sequence[int],
                 hi: Sequence[int]) -> None:
        self.lo = np.asarray(lo, dtype=int)
        self.hi = np.asarray(hi, dtype=int)
        self.slices = tuple(slice(int(a), int(b)) for a, b in zip(self.lo, self.hi, strict=True))
        self.hu = np.asarray(hu[self.slices], dtype=np.float32)
        self.affine = np.asarray(affine, dtype=np.float64)
        grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(self.lo, self.hi,
                                                                      strict=True)],
                                    indexing="ij"), axis=-1).astype(np.float64)
        self.index = grid
        self.points = grid @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_local_index(self, points: np.ndarray) -> np.ndarray:
        """LPS (..., 3) -> fractional indices into this block, (3, ...)."""
        flat = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        index = np.linalg.solve(self.affine[:3, :3], (flat - self.affine[:3, 3]).T)
        index -= self.lo[:, None]
        return np.asarray(index.reshape((3, *np.asarray(points).shape[:-1])))

    def sample(self, values: np.ndarray, points: np.ndarray, order: int = 1) -> np.ndarray:
        return np.asarray(ndimage.map_coordinates(values, self.to_local_index(points),
                                                  order=order, mode="nearest"))


def _roi_around(hu: np.ndarray, affine: np.ndarray, corners_lps: np.ndarray,
                margin_px: Sequence[int] = (1, 2, 2)) -> _Roi:
    index = np.linalg.solve(affine[:3, :3], (np.asarray(corners_lps) - affine[:3, 3]).T).T
    lo = np.floor(index.min(axis=0)).astype(int) - np.asarray(margin_px)
    hi = np.ceil(index.max(axis=0)).astype(int) + 1 + np.asarray(margin_px)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(hu.shape))
    if np.any(hi <= lo):
        raise PlantingError("the site lies outside the volume")
    return _Roi(hu, affine, lo, hi)


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                     for z in (lo[2], hi[2])], dtype=np.float64)


def _walk(sample: Callable[[np.ndarray], np.ndarray], start: np.ndarray,
          direction: np.ndarray, *, want_bone: bool, min_run_mm: float, max_mm: float,
          step_mm: float = 0.5) -> float | None:
    """Distance from ``start`` along ``direction`` where a run of at least ``min_run_mm`` of
    bone (``want_bone``) or non-bone begins; None within ``max_mm``."""
    distances = np.arange(0.0, max_mm + min_run_mm, step_mm)
    values = sample(start[None, :] + distances[:, None] * direction[None, :])
    state = values > BONE_HU if want_bone else values <= BONE_HU
    need = max(1, int(round(min_run_mm / step_mm)))
    run = 0
    for i, ok in enumerate(state):
        run = run + 1 if ok else 0
        if run >= need:
            d = float(distances[i - need + 1])
            return d if d <= max_mm else None
    return None


def _median(values: list[float | None], default: float) -> float:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else default


def measure_level(hu: np.ndarray, affine: np.ndarray, reference_levels: Sequence[dict[str, Any]],
                  name: str) -> LevelGeometry:
    """Walls, canal and widths of level ``name`` from its reference entry and the HU.

    ``reference_levels`` is a reference entry's ``levels`` list (centre and endplate centres
    in LPS mm). Raises :class:`PlantingError` when the level is not in the reference, is C1,
    or no body bone is found at its centre.
    """
    entries = {str(e["name"]): e for e in reference_levels}
    if name not in entries:
        raise PlantingError(f"level {name} is not in the reference "
                            f"(levels: {', '.join(entries) or 'none'})")
    if name not in PLANTABLE_LEVELS:
        raise PlantingError(f"level {name} cannot be planted (planted: {PLANTABLE_LEVELS})")
    entry = entries[name]
    centre = np.asarray(entry["centre_lps"], dtype=np.float64)
    superior = np.asarray(entry["superior_endplate_lps"], dtype=np.float64)
    inferior = np.asarray(entry["inferior_endplate_lps"], dtype=np.float64)
    dens_tip = None
    if name == "C2":
        # The reference's C2 centre is the centre of the body between the dens base and the
        # inferior endplate; its superior point is the dens tip.
        dens_tip = superior
        superior = 2.0 * centre - inferior
    height = float(np.linalg.norm(superior - inferior))
    if height < 4.0:
        raise PlantingError(f"level {name}: endplates {height:.1f} mm apart")
    lo = np.minimum(superior, inferior) + np.array([-45.0, -35.0, -12.0])
    hi = np.maximum(superior, inferior) + np.array([45.0, 80.0, 12.0])
    roi = _roi_around(hu, affine, _box_corners(lo, hi), margin_px=(0, 0, 0))
    spacing_yx = np.linalg.norm(affine[:3, 1:3], axis=0)
    smooth = ndimage.gaussian_filter(roi.hu, sigma=(0.0, *(0.5 / spacing_yx)))

    def sample(points: np.ndarray) -> np.ndarray:
        return roi.sample(smooth, points)

    axis = (superior - inferior) / height
    ant, post, left, right = (np.array([0.0, -1.0, 0.0]), np.array([0.0, 1.0, 0.0]),
                              np.array([1.0, 0.0, 0.0]), np.array([-1.0, 0.0, 0.0]))
    anterior: list[float | None] = []
    posterior: list[float | None] = []
    widths: list[float | None] = []
    for frac in (0.35, 0.5, 0.65):
        start = centre + (frac - 0.5) * height * axis
        if sample(start[None])[0] <= BONE_HU:
            continue
        anterior.append(_walk(sample, start, ant, want_bone=False, min_run_mm=2.0,
                              max_mm=20.0))
        posterior.append(_walk(sample, start, post, want_bone=False,
                               min_run_mm=CANAL_MIN_RUN_MM, max_mm=25.0))
        for side in (left, right):
            widths.append(_walk(sample, start, side, want_bone=False, min_run_mm=2.0,
                                max_mm=16.0))
    if not posterior:
        raise PlantingError(f"level {name}: no bone at the reference body centre "
                            f"{np.round(centre, 1).tolist()}")
    anterior_y = centre[1] - _median(anterior, 8.0)
    posterior_y = centre[1] + _median(posterior, 8.0)
    half_width = min(_median(widths, 10.0), 12.0)
    behind = centre.copy()
    behind[1] = posterior_y + 0.5
    closing = _walk(sample, behind, post, want_bone=True, min_run_mm=1.5, max_mm=25.0)
    canal_length = closing if closing is not None and closing >= 6.0 else 14.0
    canal_posterior_y = posterior_y + 0.5 + canal_length
    canal_centre = centre.copy()
    canal_centre[1] = 0.5 * (posterior_y + canal_posterior_y)
    canal_widths = [_walk(sample, canal_centre, side, want_bone=True, min_run_mm=1.5,
                          max_mm=13.0) for side in (left, right)]
    canal_half_width = float(np.clip(_median(canal_widths, 7.0), 4.0, 12.0))
    return LevelGeometry(name=name, centre=centre, superior=superior, inferior=inferior,
                         dens_tip=dens_tip, anterior_y=float(anterior_y),
                         posterior_y=float(posterior_y), half_width=float(half_width),
                         canal_centre=canal_centre, canal_posterior_y=float(canal_posterior_y),
                         canal_half_width=canal_half_width)


# --------------------------------------------------------------------------- sites


@dataclass
class _Site:
    point: np.ndarray
    normal: np.ndarray
    shift: np.ndarray
    radius: float
    line_region: Region
    fragment_region: Region
    box: tuple[np.ndarray, np.ndarray]
    """LPS box (lo, hi) that holds the whole edit."""


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v / max(float(np.linalg.norm(v)), 1e-9))


def _in_plane(direction: np.ndarray, normal: np.ndarray) -> np.ndarray:
    along = direction - float(direction @ normal) * normal
    if np.linalg.norm(along) < 1e-6:
        along = np.cross(normal, np.array([1.0, 0.0, 0.0]))
    return _unit(along)


def _centroid(points: np.ndarray, inside: np.ndarray, what: str) -> np.ndarray:
    if int(inside.sum()) < MIN_CHANGED_VOXELS:
        raise PlantingError(f"no bone found at the {what}")
    return np.asarray(points[inside].mean(axis=0))


def _site(roi: _Roi, geo: LevelGeometry, spec: PlantSpec) -> _Site:
    """Where the line goes: its plane, the fragment's shift, and the boxes that hold it."""
    kind = spec.kind
    c = geo.centre
    H = geo.height
    tilt = np.asarray(spec.tilt, dtype=np.float64)
    bone = roi.hu > BONE_HU
    p = roi.points
    s = 1.0 if spec.side == "left" else -1.0

    def body_region(pts: np.ndarray, h_margin: float = 1.5) -> np.ndarray:
        hpt = geo.h(pts)
        return np.asarray((np.abs(pts[..., 0] - c[0]) <= geo.half_width + 2.0)
                          & (pts[..., 1] >= geo.anterior_y - 2.0)
                          & (pts[..., 1] <= geo.posterior_y + 1.0)
                          & (hpt >= -h_margin) & (hpt <= H + h_margin))

    if kind == FractureKind.BODY:
        nominal = {"coronal": np.array([0.0, -1.0, 0.1]),
                   "sagittal": np.array([1.0, 0.0, 0.1]),
                   "oblique": np.array([0.7, -0.7, 0.25])}[spec.orientation]
        normal = _unit(nominal + tilt)
        point = c + spec.offset_mm * normal
        preferred = np.array([0.0, 0.0, -1.0]) if spec.orientation != "sagittal" \
            else np.array([0.0, -0.6, -0.8])
        radius = 1.6 * max(geo.half_width, 0.5 * (geo.posterior_y - geo.anterior_y), 0.5 * H)
        line_region: Region = body_region
        fragment_region: Region = body_region
        lo = np.array([c[0] - geo.half_width - 4, geo.anterior_y - 4, 0.0])
        hi = np.array([c[0] + geo.half_width + 4, geo.posterior_y + 3, 0.0])
        zs = [geo.inferior[2], geo.superior[2]]
        lo[2], hi[2] = min(zs) - 4, max(zs) + 4
    elif kind == FractureKind.DENS:
        base = geo.superior
        axis_xy = np.array([c[0], c[1] + 1.0])

        def dens_near(pts: np.ndarray, r: float) -> np.ndarray:
            return np.asarray(np.hypot(pts[..., 0] - axis_xy[0], pts[..., 1] - axis_xy[1]) <= r)

        def dens_line(pts: np.ndarray) -> np.ndarray:
            return np.asarray(dens_near(pts, 7.0) & (np.abs(pts[..., 2] - base[2]) <= 6.0))

        def dens_fragment(pts: np.ndarray) -> np.ndarray:
            return np.asarray(dens_near(pts, 7.5) & (pts[..., 2] >= base[2] - 3.0)
                              & (pts[..., 2] <= base[2] + 25.0))

        normal = _unit(np.array([0.0, 0.2, 1.0]) + tilt)
        point = base + spec.offset_mm * normal
        preferred = np.array([0.0, 1.0, 0.0])
        radius = 12.0
        line_region, fragment_region = dens_line, dens_fragment
        lo = np.array([axis_xy[0] - 10, axis_xy[1] - 10, base[2] - 8])
        hi = np.array([axis_xy[0] + 10, axis_xy[1] + 10, base[2] + 20])
    else:
        cw = geo.canal_half_width
        cc = geo.canal_centre
        cpy = geo.canal_posterior_y
        if kind == FractureKind.PEDICLE:
            def region(pts: np.ndarray) -> np.ndarray:
                lat = s * (pts[..., 0] - c[0])
                hpt = geo.h(pts)
                return np.asarray((pts[..., 1] >= geo.posterior_y - 1.5)
                                  & (pts[..., 1] <= cc[1] + 3.0)
                                  & (lat >= cw - 1.5) & (lat <= cw + 9.0)
                                  & (hpt >= -1.0) & (hpt <= H + 1.0))
            nominal, preferred, radius = np.array([s * 0.35, 1.0, 0.0]), \
                np.array([0.0, 0.0, -1.0]), 7.0
            what = f"{spec.side} pedicle"
            lo = np.array([c[0] + min(s * (cw - 3), s * (cw + 11)), geo.posterior_y - 4,
                           0.0])
            hi = np.array([c[0] + max(s * (cw - 3), s * (cw + 11)), cc[1] + 5, 0.0])
        elif kind == FractureKind.LAMINA:
            def region(pts: np.ndarray) -> np.ndarray:
                lat = s * (pts[..., 0] - c[0])
                hpt = geo.h(pts)
                return np.asarray((pts[..., 1] >= cc[1]) & (pts[..., 1] <= cpy + 8.0)
                                  & (lat >= 2.0) & (lat <= cw + 12.0)
                                  & (hpt >= -4.0) & (hpt <= H + 2.0))
            nominal, preferred, radius = np.array([-s * 0.6, 0.8, 0.0]), \
                np.array([0.0, 0.0, -1.0]), 8.0
            what = f"{spec.side} lamina"
            lo = np.array([c[0] + min(s * 0.0, s * (cw + 14)), cc[1] - 2, 0.0])
            hi = np.array([c[0] + max(s * 0.0, s * (cw + 14)), cpy + 11, 0.0])
        elif kind == FractureKind.SPINOUS:
            def region(pts: np.ndarray) -> np.ndarray:
                hpt = geo.h(pts)
                return np.asarray((np.abs(pts[..., 0] - c[0]) <= 6.0)
                                  & (pts[..., 1] >= cpy + 3.0) & (pts[..., 1] <= cpy + 22.0)
                                  & (hpt >= -0.6 * H) & (hpt <= H + 1.0))
            nominal, preferred, radius = np.array([0.0, 1.0, -0.3]), \
                np.array([0.0, 0.0, -1.0]), 8.0
            what = "spinous process"
            lo = np.array([c[0] - 9, cpy, 0.0])
            hi = np.array([c[0] + 9, cpy + 26, 0.0])
        else:  # TRANSVERSE
            def region(pts: np.ndarray) -> np.ndarray:
                lat = s * (pts[..., 0] - c[0])
                hpt = geo.h(pts)
                # Lateral to the body, not behind it: the articular pillars (lateral masses)
                # lie further back, beside the canal.
                return np.asarray((lat >= max(geo.half_width, cw) + 4.0)
                                  & (lat <= max(geo.half_width, cw) + 22.0)
                                  & (pts[..., 1] >= c[1] - 10.0)
                                  & (pts[..., 1] <= geo.posterior_y + 1.0)
                                  & (hpt >= -1.0) & (hpt <= H + 1.0))
            nominal, preferred, radius = np.array([s * 1.0, 0.0, 0.0]), \
                np.array([0.0, 0.0, -1.0]), 7.0
            what = f"{spec.side} transverse process"
            edge = max(geo.half_width, cw)
            lo = np.array([c[0] + min(s * (edge + 2), s * (edge + 24)), c[1] - 12, 0.0])
            hi = np.array([c[0] + max(s * (edge + 2), s * (edge + 24)), geo.posterior_y + 3,
                           0.0])
        inside = region(p) & bone
        point0 = _centroid(p, inside, f"{what} of {geo.name}")
        if kind == FractureKind.TRANSVERSE:
            lateral = s * (p[..., 0] - c[0])
            outer = inside & (lateral >= np.median(lateral[inside]))
            if int(outer.sum()) >= MIN_CHANGED_VOXELS:
                point0 = np.asarray(p[outer].mean(axis=0))
        normal = _unit(nominal + tilt)
        point = point0 + spec.offset_mm * normal
        line_region = fragment_region = region
        zs = [geo.inferior[2], geo.superior[2]]
        lo[2], hi[2] = min(zs) - 0.6 * H - 4, max(zs) + 4
    shift = spec.shift_sign * spec.displacement_mm * _in_plane(preferred, normal)
    return _Site(point=np.asarray(point), normal=normal, shift=shift, radius=float(radius),
                 line_region=line_region, fragment_region=fragment_region, box=(lo, hi))


# --------------------------------------------------------------------------- rendering


def _slice_thickness(affine: np.ndarray, thickness_mm: float | None) -> float:
    spacing = float(np.linalg.norm(affine[:3, 0]))
    return float(thickness_mm) if thickness_mm and thickness_mm > 0 else spacing


def _subsample_offsets(affine: np.ndarray, thickness_mm: float, *,
                       in_plane: bool = True) -> np.ndarray:
    """(n, 3) LPS offsets of a voxel's sub-samples: through the slice thickness at
    :data:`SUBSAMPLE_MM`, and 2 x 2 in plane unless ``in_plane`` is False."""
    spacing_z = float(np.linalg.norm(affine[:3, 0]))
    nz = max(1, int(math.ceil(thickness_mm / SUBSAMPLE_MM)))
    half = 0.5 * thickness_mm / spacing_z
    zs = np.linspace(-half + half / nz, half - half / nz, nz)
    plane = (-0.25, 0.25) if in_plane else (0.0,)
    offsets = np.array([[dz, dy, dx] for dz in zs for dy in plane for dx in plane])
    return np.asarray(offsets @ affine[:3, :3].T)


def _bone_weight(original: np.ndarray) -> np.ndarray:
    return np.asarray(np.clip((original - BONE_HU) / (BONE_FULL_HU - BONE_HU), 0.0, 1.0),
                      dtype=np.float32)


def _psf(field_: np.ndarray, affine: np.ndarray) -> np.ndarray:
    del affine
    return np.asarray(ndimage.gaussian_filter(field_, sigma=(0.0, PSF_SIGMA_PX, PSF_SIGMA_PX)))


def _render_line(roi: _Roi, site: _Site, spec: PlantSpec, thickness_mm: float) -> np.ndarray:
    """New HU of the block for a line fracture (before the bone weight is applied)."""
    original = roi.hu
    p = roi.points
    n = site.normal
    # Displaced fragment: positive side of the plane, inside the fragment box, fading out
    # beyond the site radius.
    d = (p - site.point) @ n
    dist = np.linalg.norm(p - site.point, axis=-1)
    side = np.clip(d / 0.4 + 0.5, 0.0, 1.0)
    fade = np.clip((1.35 * site.radius - dist) / (0.35 * site.radius), 0.0, 1.0)
    k = (side * fade * site.fragment_region(p))[..., None]
    moved = original
    if np.linalg.norm(site.shift) > 1e-3:
        displaced = roi.sample(original, p - k * site.shift)
        ahead = roi.sample(original, p + k * site.shift)
        leading = (ahead <= BONE_HU) & (k[..., 0] > 0.0)
        moved = np.where(leading, np.maximum(original, displaced), displaced).astype(np.float32)
    # The lucent slab, partial-volume averaged over sub-samples, then the in-plane PSF.
    offsets = _subsample_offsets(roi.affine, thickness_mm)
    occupancy = np.zeros(original.shape, dtype=np.float32)
    half = 0.5 * spec.gap_mm
    for offset in offsets:
        q = p + offset
        inside = (np.abs((q - site.point) @ n) <= half) \
            & (np.linalg.norm(q - site.point, axis=-1) <= site.radius) & site.line_region(q)
        occupancy += inside
    occupancy /= len(offsets)
    occupancy = _psf(occupancy, roi.affine)
    return np.asarray(moved + occupancy * (spec.gap_hu - moved), dtype=np.float32)


def _render_compression(roi: _Roi, geo: LevelGeometry, spec: PlantSpec,
                        thickness_mm: float) -> np.ndarray:
    """New HU of the block for an anterior wedge compression of the superior half of the
    body, with an impaction band under the new endplate."""
    original = roi.hu
    H = geo.height
    u = geo.axis
    c = geo.centre
    depth = max(geo.posterior_y - geo.anterior_y, 1.0)
    # The warp moves along the body axis only: sub-samples through the slice thickness.
    offsets = _subsample_offsets(roi.affine, thickness_mm, in_plane=False)
    total = np.zeros(original.shape, dtype=np.float32)
    identity = np.zeros(original.shape, dtype=np.float32)
    band = np.zeros(original.shape, dtype=np.float32)
    for offset in offsets:
        q = roi.points + offset
        h = geo.h(q)
        anterior = np.clip((geo.posterior_y - q[..., 1]) / depth, 0.0, 1.0)
        inside = ((np.abs(q[..., 0] - c[0]) <= geo.half_width + 2.0)
                  & (q[..., 1] >= geo.anterior_y - 2.0) & (q[..., 1] <= geo.posterior_y + 1.0))
        new_top = H * (1.0 - spec.height_loss * anterior)
        half = 0.5 * H
        scale = half / np.maximum(new_top - half, 1e-3)
        # h in [H/2, new_top] comes from [H/2, H]; above new_top from above the old endplate.
        source_h = np.where(h <= half, h,
                            np.where(h <= new_top, half + (h - half) * scale,
                                     h + (H - new_top)))
        source_h = np.where(inside & (h > -1.0) & (h < H + 1.5), source_h, h)
        source = q + (source_h - h)[..., None] * u
        # Nearest samples: a slice's value stands for its whole thickness, so re-averaging
        # the moved sub-samples is the partial volume of the moved anatomy.
        total += roi.sample(original, source, order=0)
        identity += roi.sample(original, q, order=0)
        in_band = inside & (h <= new_top) & (h >= new_top - 2.5) & (anterior > 0.0)
        band += in_band * (0.5 + 0.5 * anterior)
    # Only what the warp changes is added to the voxel (the sub-sampling itself would blur).
    change = (total - identity) / len(offsets)
    band = _psf(band / len(offsets), roi.affine)
    return np.asarray(original + change + band * spec.band_hu, dtype=np.float32)


def plant(hu: np.ndarray, affine: np.ndarray, reference_levels: Sequence[dict[str, Any]],
          spec: PlantSpec, *, thickness_mm: float | None = None) -> tuple[np.ndarray,
                                                                         PlantResult]:
    """Plant one fracture; returns the new HU volume (a copy, same dtype) and the result.

    ``hu`` is (z, y, x) HU on the grid of ``affine`` ((z, y, x, 1) -> LPS mm);
    ``reference_levels`` the level list of the scan's reference entry; ``thickness_mm`` the
    reconstructed slice thickness (default: the slice spacing). Only voxels whose original
    HU is above :data:`BONE_HU` change. Raises :class:`PlantingError` when the site has no
    bone or nothing visible was planted.
    """
    affine = np.asarray(affine, dtype=np.float64)
    thickness = _slice_thickness(affine, thickness_mm)
    geo = measure_level(hu, affine, reference_levels, spec.level)
    if spec.kind == FractureKind.COMPRESSION:
        zs = [geo.inferior[2], geo.superior[2]]
        lo = np.array([geo.centre[0] - geo.half_width - 4, geo.anterior_y - 4, min(zs) - 3])
        hi = np.array([geo.centre[0] + geo.half_width + 4, geo.posterior_y + 3, max(zs) + 4])
        roi = _roi_around(hu, affine, _box_corners(lo, hi))
        rendered = _render_compression(roi, geo, spec, thickness)
        point, normal, shift = geo.superior, geo.axis, -spec.height_loss * geo.height * geo.axis
    else:
        coarse = _roi_around(hu, affine, _box_corners(
            *(geo.centre + np.array([-45.0, -35.0, -30.0]),
              geo.centre + np.array([45.0, 80.0, 30.0]))), margin_px=(0, 0, 0))
        site = _site(coarse, geo, spec)
        margin = math.ceil(float(np.linalg.norm(site.shift)) + 3.0)
        lo, hi = site.box
        roi = _roi_around(hu, affine, _box_corners(lo - margin, hi + margin))
        rendered = _render_line(roi, site, spec, thickness)
        point, normal, shift = site.point, site.normal, site.shift
    weight = _bone_weight(roi.hu)
    new_block = roi.hu + weight * (rendered - roi.hu)
    out = hu.copy()
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        out[roi.slices] = np.clip(np.rint(new_block), info.min, info.max).astype(out.dtype)
    else:
        out[roi.slices] = new_block.astype(out.dtype)
    change = np.abs(out[roi.slices].astype(np.float32) - roi.hu)
    visible = change >= VISIBLE_HU
    if int(visible.sum()) < MIN_CHANGED_VOXELS:
        raise PlantingError(f"{spec.kind} at {spec.level}: nothing visible planted "
                            f"({int(visible.sum())} voxels changed by {VISIBLE_HU:.0f} HU)")
    slices: dict[int, tuple[int, int, int, int]] = {}
    for z in np.flatnonzero(visible.any(axis=(1, 2))):
        rows, cols = np.nonzero(visible[z])
        slices[int(z + roi.lo[0])] = (int(rows.min() + roi.lo[1]), int(cols.min() + roi.lo[2]),
                                      int(rows.max() + roi.lo[1] + 1),
                                      int(cols.max() + roi.lo[2] + 1))
    result = PlantResult(spec=spec, point_lps=_triple(point), normal_lps=_triple(normal),
                         shift_lps=_triple(shift), changed_voxels=int(visible.sum()),
                         slices=slices)
    logger.info("planted %s at %s: %d voxels on %d slices", spec.kind, spec.level,
                result.changed_voxels, len(slices))
    return out, result


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    return (round(float(v[0]), 2), round(float(v[1]), 2), round(float(v[2]), 2))


# --------------------------------------------------------------------------- drawing specs


KIND_WEIGHTS: dict[FractureKind, float] = {
    FractureKind.BODY: 0.3, FractureKind.DENS: 0.1, FractureKind.PEDICLE: 0.1,
    FractureKind.LAMINA: 0.15, FractureKind.SPINOUS: 0.1, FractureKind.TRANSVERSE: 0.1,
    FractureKind.COMPRESSION: 0.15}
"""Kinds drawn by :func:`draw_specs` (the dens only where C2 and its dens base are in view)."""


def plantable_levels(reference_levels: Sequence[dict[str, Any]]) -> list[str]:
    """Levels in view (not cut by the scan's edge) that can be planted."""
    return [str(e["name"]) for e in reference_levels
            if e["name"] in PLANTABLE_LEVELS and not e.get("cut")]


def dens_in_view(reference_levels: Sequence[dict[str, Any]]) -> bool:
    for e in reference_levels:
        if e["name"] == "C2":
            return not e.get("cut")
    return False


def draw_spec(rng: np.random.Generator, level: str, *, dens_allowed: bool) -> PlantSpec:
    """A random fracture at ``level`` with the documented parameter ranges."""
    kinds = [k for k in KIND_WEIGHTS if k != FractureKind.DENS or (level == "C2"
                                                                    and dens_allowed)]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
    side = str(rng.choice(["left", "right"])) if kind in SIDED_KINDS else None
    return PlantSpec(
        level=level, kind=kind, side=side,
        gap_mm=round(float(rng.uniform(1.0, 2.0)), 2),
        gap_hu=round(float(rng.uniform(40.0, 80.0)), 1),
        displacement_mm=round(float(rng.uniform(1.0, 2.0)), 2),
        orientation=str(rng.choice(BODY_ORIENTATIONS)),
        tilt=tuple(round(float(t), 3) for t in rng.normal(0.0, 0.15, size=3)),  # type: ignore
        offset_mm=round(float(rng.uniform(-2.0, 2.0)), 2),
        shift_sign=float(rng.choice([-1.0, 1.0])),
        height_loss=round(float(rng.uniform(0.2, 0.4)), 3),
        band_hu=round(float(rng.uniform(150.0, 300.0)), 1))


def draw_specs(rng: np.random.Generator, reference_levels: Sequence[dict[str, Any]],
               count: int) -> list[PlantSpec]:
    """``count`` fractures at distinct levels in view."""
    levels = plantable_levels(reference_levels)
    if not levels:
        raise PlantingError("no plantable level in view")
    chosen = rng.choice(len(levels), size=min(count, len(levels)), replace=False)
    dens_allowed = dens_in_view(reference_levels)
    return [draw_spec(rng, levels[int(i)], dens_allowed=dens_allowed) for i in sorted(chosen)]


# --------------------------------------------------------------------------- DICOM output


def planted_uid(*parts: object) -> str:
    """``2.25.<uuid5>``: a UID that depends only on ``parts`` (source UIDs, seed, specs)."""
    text = "|".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, text).int}"


@dataclass
class SourceScan:
    """A real series loaded for planting."""

    name: str
    paths: list[Path]
    hu: np.ndarray
    affine: np.ndarray
    sop_instance_uids: list[str]
    study_instance_uid: str
    series_instance_uid: str
    thickness_mm: float | None
    reference_levels: list[dict[str, Any]]


def load_source(directory: Path, reference: dict[str, Any] | None = None,
                name: str | None = None) -> SourceScan:
    """Load the series of ``directory`` (its ``*.dcm`` files, or those of ``ct/``) and its
    reference entry (the packaged reference unless given; the pixel hash is checked)."""
    from pydicom import dcmread

    from service.evaluation.levels import load_reference, reference_for
    from service.imaging.volume import load_volume

    directory = Path(directory)
    folder = directory / "ct" if (directory / "ct").is_dir() else directory
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not paths:
        raise PlantingError(f"{folder}: no .dcm files")
    volume = load_volume(paths)
    if volume.resampled or any(f is not None for f in volume.frame_numbers):
        raise PlantingError(f"{folder}: resampled or multi-frame series are not planted")
    entry = reference_for(volume, reference if reference is not None else load_reference())
    first = dcmread(paths[0], stop_before_pixels=True)
    thickness = float(first.SliceThickness) if first.get("SliceThickness") else None
    return SourceScan(name=name or str(entry.get("name") or directory.name), paths=paths,
                      hu=volume.hu, affine=volume.affine,
                      sop_instance_uids=list(volume.sop_instance_uids),
                      study_instance_uid=volume.study_instance_uid,
                      series_instance_uid=volume.series_instance_uid,
                      thickness_mm=thickness, reference_levels=list(entry["levels"]))


def slice_numbers(affine: np.ndarray, depth: int) -> list[int]:
    """RSNA file number of each z index: 1 is the most superior slice (head first, as the
    competition's studies and ``service.synthetic.rsna``); source InstanceNumbers are kept
    in the headers but not trusted (a real scan here has 1 on every slice)."""
    z_lps = np.arange(depth) * affine[2, 0] + affine[2, 3]
    order = np.argsort(-z_lps, kind="stable")
    numbers = [0] * depth
    for rank, z in enumerate(order, start=1):
        numbers[int(z)] = rank
    return numbers


def write_series(scan: SourceScan, hu: np.ndarray, out_dir: Path, *, study_uid: str,
                 series_uid: str, sop_key: str) -> list[int]:
    """Write ``hu`` over the source files under new UIDs into ``out_dir``; returns the file
    number of each z index.

    Every other attribute is kept as it is (dates that are not dates included). Pixel data
    changes only where ``hu`` differs from the source volume: those stored values are
    ``(HU - intercept) / slope`` clipped to the stored range; the rest are the source's own
    values, bit for bit. Uncompressed sources keep their transfer syntax; compressed ones are
    written decompressed (Explicit VR Little Endian): lossless either way.
    """
    from pydicom import dcmread
    from pydicom.uid import UID, ExplicitVRLittleEndian

    out_dir.mkdir(parents=True, exist_ok=True)
    z_of_sop = {uid: z for z, uid in enumerate(scan.sop_instance_uids)}
    numbers = slice_numbers(scan.affine, hu.shape[0])
    for path in scan.paths:
        ds = dcmread(path)
        source_sop = str(ds.SOPInstanceUID)
        z = z_of_sop.get(source_sop)
        if z is None:
            logger.warning("%s: not in the loaded volume (duplicate?); not written", path.name)
            continue
        changed = hu[z] != scan.hu[z]
        if changed.any():
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            stored = ds.pixel_array.copy()
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            bits = int(ds.BitsStored)
            if int(ds.PixelRepresentation) == 1:
                low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            else:
                low, high = 0, (1 << bits) - 1
            values = np.rint((hu[z][changed].astype(np.float64) - intercept) / slope)
            stored[changed] = np.clip(values, low, high).astype(stored.dtype)
            ds.PixelData = stored.tobytes()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        sop = planted_uid("sop", sop_key, source_sop)
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop)
        target = out_dir / f"{numbers[z]}.dcm"
        ds.save_as(target, enforce_file_format=True)
    return numbers


@dataclass
class WrittenStudy:
    study_instance_uid: str
    scan: str
    labels: dict[str, int]
    boxes: list[list[object]]
    planted: list[list[object]]


def write_study(scan: SourceScan, specs: Sequence[PlantSpec], out: Path, *, seed: int,
                variant: str) -> WrittenStudy:
    """Plant ``specs`` (none: the negative) into ``scan`` and write the study under
    ``out/train_images/<new StudyInstanceUID>/``; returns its CSV rows."""
    key = json.dumps([variant, seed, [s.key() for s in specs]])
    base = (scan.study_instance_uid, scan.series_instance_uid, key)
    study_uid = planted_uid("study", *base)
    series_uid = planted_uid("series", *base)
    hu = scan.hu
    results: list[PlantResult] = []
    for spec in specs:
        hu, result = plant(hu, scan.affine, scan.reference_levels, spec,
                           thickness_mm=scan.thickness_mm)
        results.append(result)
    study_dir = out / "train_images" / study_uid
    if study_dir.exists():
        for old in study_dir.glob("*.dcm"):
            old.unlink()
    numbers = write_series(scan, hu, study_dir, study_uid=study_uid, series_uid=series_uid,
                           sop_key="|".join(base))
    labels = {v: int(any(r.spec.level == v for r in results)) for v in VERTEBRA_COLUMNS}
    labels["patient_overall"] = int(bool(results))
    boxes: list[list[object]] = []
    planted: list[list[object]] = []
    for r in results:
        for z, (r0, c0, r1, c1) in sorted(r.slices.items()):
            boxes.append([study_uid, c0, r0, c1 - c0, r1 - r0, numbers[z]])
        spec_numbers = sorted(numbers[z] for z in r.slices)
        planted.append([study_uid, scan.series_instance_uid, scan.name, r.spec.level,
                        str(r.spec.kind), r.spec.side or "", json.dumps(r.point_lps),
                        json.dumps(r.normal_lps), json.dumps(r.shift_lps), r.spec.gap_mm,
                        r.spec.gap_hu,
                        r.spec.displacement_mm if r.spec.kind != FractureKind.COMPRESSION
                        else 0.0,
                        r.spec.height_loss if r.spec.kind == FractureKind.COMPRESSION else "",
                        r.spec.band_hu if r.spec.kind == FractureKind.COMPRESSION else "",
                        r.spec.orientation if r.spec.kind == FractureKind.BODY else "",
                        r.changed_voxels, spec_numbers[0], spec_numbers[-1]])
    logger.info("planted study %s from %s: %s", study_uid[-12:], scan.name,
                ", ".join(f"{s.kind}@{s.level}" for s in specs) or "negative")
    return WrittenStudy(study_instance_uid=study_uid, scan=scan.name, labels=labels,
                        boxes=sorted(boxes, key=lambda b: (b[5], b[1], b[2])), planted=planted)


def write_csvs(out: Path, studies: Sequence[WrittenStudy]) -> None:
    """train.csv, train_bounding_boxes.csv and planted_fractures.csv of ``studies``."""
    _write_csv(out / "train.csv", TRAIN_COLUMNS,
               [[s.study_instance_uid, s.labels["patient_overall"],
                 *[s.labels[v] for v in VERTEBRA_COLUMNS]] for s in studies])
    _write_csv(out / "train_bounding_boxes.csv", BOX_COLUMNS,
               [b for s in studies for b in s.boxes])
    _write_csv(out / PLANTED_CSV, PLANTED_COLUMNS, [p for s in studies for p in s.planted])


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def scan_seed(seed: int, series_instance_uid: str) -> np.random.Generator:
    digest = uuid.uuid5(UID_NAMESPACE, series_instance_uid).int & 0xFFFFFFFF
    return np.random.default_rng([int(seed), digest])


def plant_scan(scan: SourceScan, out: Path, *, per_scan: int, seed: int,
               attempts: int = 20) -> list[WrittenStudy]:
    """The negative and ``per_scan`` planted variants (1-2 fractures each) of one scan."""
    rng = scan_seed(seed, scan.series_instance_uid)
    studies = [write_study(scan, [], out, seed=seed, variant="negative")]
    for index in range(per_scan):
        for attempt in range(attempts):
            specs = draw_specs(rng, scan.reference_levels, int(rng.integers(1, 3)))
            try:
                studies.append(write_study(scan, specs, out, seed=seed,
                                           variant=f"planted-{index}"))
                break
            except PlantingError as exc:
                logger.info("%s variant %d attempt %d: %s; drawing again", scan.name, index,
                            attempt, exc)
        else:
            raise PlantingError(f"{scan.name}: variant {index} not planted in {attempts} "
                                "attempts")
    return studies


def find_sources(data: Path) -> list[Path]:
    """Scan directories under ``data``: those holding a ``ct/`` folder of DICOM files."""
    return sorted(p for p in Path(data).iterdir()
                  if p.is_dir() and (p / "ct").is_dir() and any((p / "ct").glob("*.dcm")))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.evaluation.planting",
        description="Plant fractures into the real scans' bone; write an RSNA-layout dataset "
                    "of planted variants and unplanted negatives (simulated fractures, not "
                    "clinical data).")
    parser.add_argument("--data", type=Path, required=True,
                        help="directory of real scans (each <name>/ct/*.dcm)")
    parser.add_argument("--out", type=Path, required=True, help="RSNA-layout output directory")
    parser.add_argument("--per-scan", type=int, default=6, help="planted variants per scan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", type=Path, default=None,
                        help="level reference JSON (default: the packaged one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from service.evaluation.levels import LevelReferenceError, load_reference

    reference = load_reference(args.reference)
    out: Path = args.out
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    studies: list[WrittenStudy] = []
    for directory in find_sources(args.data):
        try:
            scan = load_source(directory, reference)
        except LevelReferenceError as exc:
            logger.warning("%s: skipped: %s", directory.name, exc)
            continue
        studies += plant_scan(scan, out, per_scan=args.per_scan, seed=args.seed)
    if not studies:
        parser.error(f"no scan with a reference entry under {args.data}")
    write_csvs(out, studies)
    planted = sum(s.labels["patient_overall"] for s in studies)
    print(json.dumps({"out": str(out), "studies": len(studies), "planted": planted,
                      "negatives": len(studies) - planted}))
    return 0


__all__ = ["FractureKind", "PlantSpec", "PlantResult", "PlantingError", "LevelGeometry",
           "measure_level", "plant", "draw_specs", "write_study", "write_csvs", "load_source",
           "plant_scan", "planted_uid"]

if __name__ == "__main__":
    raise SystemExit(main())
