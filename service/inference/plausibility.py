"""The anatomical plausibility gate: can the service vouch for the levels the model found?

Runs between segmentation and classification on the segmentation grid (isotropic
``seg_spacing_mm``). It never changes a label; it says which levels it can vouch for and,
for every rule that fails, why (an :class:`~service.outcomes.AnatomyReason` code, the level,
the measured value and the allowed range). :mod:`service.inference.pipeline` lets a fracture
be flagged only on a level that passes every level rule in a column that passes every column
rule; anything else makes the answer INCONCLUSIVE (analysed, neither flagged nor cleared).

Geometry. All lengths are millimetres measured along the **spine's own axis**: the first
principal axis of the cervical voxels, oriented towards the patient's head (``superior``, a
unit vector in the grid's (z, y, x) millimetre space), not the image z axis. A lordotic or
tilted neck therefore keeps its proportions. A level's extent is the 2nd to 98th percentile
of its voxels' positions along that axis (a few stray voxels do not lengthen it).

Ranges. Each range below is (published adult range) widened by a stated margin, because the
mask is a 2.5 mm grid segmentation that includes the posterior elements (articular and
spinous processes lengthen a vertebra's craniocaudal extent beyond its body height) and
because the population is every adult who gets a neck CT. Sources:

* [Panjabi 1991] Panjabi MM, Duranceau J, Goel V, Oxland T, Takata K. Cervical human
  vertebrae: quantitative three-dimensional anatomy of the middle and lower regions.
  Spine 1991;16(8):861-869. C3-C7 vertebral body height about 11-15 mm, upper endplate width
  15-20 mm and depth 15-17 mm. The articular pillars and the sloping spinous process extend
  the whole vertebra beyond its body height; the factor 1.3-1.6 used below is this module's
  estimate, not a tabulated value.
* [Doherty 1995] Doherty BJ, Heggeness MH. Quantitative anatomy of the second cervical
  vertebra. Spine 1995;20(5):513-517. C2 height, dens tip to inferior endplate, about
  35-45 mm (mean near 40 mm).
* [Gilad 1986] Gilad I, Nissan M. A study of vertebra and disc geometric relations of the
  human cervical and lumbar spine. Spine 1986;11(2):154-157. Cervical disc height about
  4-6 mm; vertebral body plus disc (the centre-to-centre step) about 15-22 mm.
* [Doherty 1994] Doherty BJ, Heggeness MH. The quantitative anatomy of the atlas.
  Spine 1994;19(22):2497-2500. C1 height (anterior arch / lateral mass) about 10-20 mm.
* Whole-vertebra volumes are not tabulated in these sources; the range is derived from
  their linear dimensions (body: elliptic cylinder of 15-20 x 15-17 x 11-15 mm, 2-4 cm3;
  posterior elements about as much again: 3-10 cm3 per subaxial vertebra) and widened.
* Bone density: trabecular bone of adult cervical bodies is 150-400 HU on CT, cortex far
  above; osteoporotic bodies fall towards 100 HU. A segmented level must hold bone.

The published figures above are quoted from the cited papers as approximate adult ranges
(checked against the originals is still to be done: see the closing note of issue 16); the
margins are this module's. The margins were set once and then three were widened after seeing
the first phantoms of the held-out synthetic sets (fragment size, C2-C3 overlap, C7 extent;
the reasons are beside them). Every range is a module constant, so the dashboard, the SR and
``python -m service.inference.plausibility`` (the table in ``docs/anatomy-gate.md``) cite the
same numbers; the tests in ``tests/unit/inference/test_plausibility.py`` build label maps that
break each rule on purpose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from service.findings import VERTEBRAE
from service.outcomes import AnatomyReason

logger = logging.getLogger(__name__)

LEVEL_NAMES: tuple[str, ...] = VERTEBRAE
"""Label ``i + 1`` is ``LEVEL_NAMES[i]``: the findings contract's names, not a copy."""


@dataclass(frozen=True)
class Range:
    """An allowed interval: the published range widened by a margin (either end optional)."""

    low: float | None
    high: float | None
    unit: str
    source: str

    def holds(self, value: float) -> bool:
        return ((self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def as_list(self) -> list[float | None]:
        return [self.low, self.high]


# Craniocaudal extent of the whole segmented vertebra (body and posterior elements), mm.
EXTENT_MM: dict[str, Range] = {
    "C1": Range(5.0, 32.0, "mm", "Doherty 1994: atlas height 10-20 mm; margin -50 %/+60 %"),
    "C2": Range(18.0, 62.0, "mm", "Doherty 1995: C2 height 35-45 mm; margin -50 %/+40 %"),
    **{name: Range(9.0, 40.0, "mm",
                   "Panjabi 1991: body 11-15 mm; with pillars and spinous process "
                   "(estimate 1.3-1.6x body) 15-24 mm; margin -40 %/+65 %")
       for name in ("C3", "C4", "C5", "C6")},
    "C7": Range(9.0, 45.0, "mm", "Panjabi 1991 as C3-C6; C7's spinous process (vertebra "
                                 "prominens) is the longest and slopes down over T1: +5 mm"),
}
# Segmented volume of the whole vertebra, mm3.
VOLUME_MM3: dict[str, Range] = {
    "C1": Range(800.0, 20000.0, "mm3", "derived from Doherty 1994; margin x0.4 / x2.5"),
    "C2": Range(1500.0, 30000.0, "mm3", "derived from Doherty 1995; margin x0.4 / x2.5"),
    **{name: Range(1200.0, 30000.0, "mm3",
                   "derived from Panjabi 1991 (3-10 cm3); margin x0.4 / x3")
       for name in ("C3", "C4", "C5", "C6", "C7")},
}
# Centre-to-centre distance along the axis between a level and the one below it, mm.
SPACING_MM: dict[tuple[str, str], Range] = {
    ("C1", "C2"): Range(2.0, 32.0, "mm",
                        "Doherty 1994/1995: C1 centre lies at the dens, 5-20 mm above the C2 "
                        "mask's centre; margin"),
    **{(a, b): Range(9.0, 32.0, "mm", "Gilad 1986: body + disc 15-22 mm; margin -40 %/+45 %")
       for a, b in zip(("C2", "C3", "C4", "C5", "C6"), ("C3", "C4", "C5", "C6", "C7"),
                       strict=True)},
}
OVERLAP_TOLERANCE_MM: dict[tuple[str, str], float] = {
    ("C1", "C2"): 30.0,
    ("C2", "C3"): 18.0,
    **{(a, b): 14.0 for a, b in zip(("C3", "C4", "C5", "C6"), ("C4", "C5", "C6", "C7"),
                                    strict=True)},
}
"""Neighbours overlap along the axis by their articular processes (facet joints: a few mm,
up to about half a body height with the spinous process's slope); the dens rises through
the atlas ring, so C1/C2 may overlap by the whole C1 height; C2's large bifid spinous
process and inferior articular processes reach further down over C3 than the lower levels'
[Doherty 1995]."""
MAX_AXIAL_GAP_MM = 15.0
"""Free space along the axis between a level's lower end and the next level's upper end
(a disc is 4-6 mm [Gilad 1986]; margin for a thick slice and an under-segmented endplate)."""
MAX_LATERAL_STEP_MM = 20.0
"""Offset across the axis between neighbouring centres (anterolisthesis of a few mm is
common in older necks; beyond this, the levels are not one column)."""
MAX_AXIS_TILT_DEG = 60.0
FRAGMENT_MIN_MM3 = 1000.0
"""A second connected piece of a level counts as a second body from this volume on ..."""
FRAGMENT_MIN_FRACTION = 0.5
"""... and from this fraction of the level's largest piece on: two candidates of comparable
size, and nothing says which is the vertebra. A smaller stray piece is dropped before
classification and never reaches the SEG (``pipeline.clean_labels`` keeps the largest), so
it does not make the served level doubtful; the column rules judge the piece that is kept."""
BONE_HU = 200.0
"""HU at or above which a voxel of the 2.5 mm grid counts as bone (partial volume of cortex
and trabecular bone; soft tissue is below 100 HU)."""
MIN_BONE_FRACTION = 0.30
"""A level whose mask holds less bone than this fraction is not a vertebra."""
SKULL_BONE_AREA_MM2 = 500.0
"""Unlabelled bone within ``SKULL_SEARCH_RADIUS_MM`` of the column, per slice, from which on
the slice is read as skull base (the occipital bone around the foramen magnum)."""
SKULL_SEARCH_RADIUS_MM = 30.0
"""Radius of the disc around the column where skull base is sought (the occipital condyles
and the rim of the foramen magnum lie within it; mastoids and mandible lie outside)."""
SKULL_MIN_RUN_MM = 5.0
"""The skull base must persist this far up (one stray bright slice is not a skull)."""
C1_TO_SKULL_BASE_MM = Range(-12.0, 32.0, "mm",
                            "C1 articulates with the occipital condyles; the detector reads "
                            "the skull base where the rim of the foramen magnum closes around "
                            "the column, 10-25 mm above C1's facets; margin")
"""Distance along the axis from C1's upper end to the skull base (positive: C1 below)."""
TOP_LEVEL_TO_SKULL_BASE_MM = 40.0
"""With the skull base in view, a topmost level that is not C1 within this distance under it
means the count is shifted (that level is C1 whatever its label)."""


@dataclass(frozen=True)
class RuleFailure:
    code: AnatomyReason
    level: str | None
    measured: float | None
    allowed: list[float | None] | None
    unit: str | None
    detail: str

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["code"] = self.code.value
        if self.measured is not None:
            data["measured"] = round(float(self.measured), 2)
        return data


@dataclass(frozen=True)
class LevelMeasure:
    level: str
    centre_mm: float
    """Position of the centre of mass along the axis (mm, increasing towards the head)."""
    lower_mm: float
    upper_mm: float
    volume_mm3: float
    bone_fraction: float
    fragment_mm3: float
    """Volume of the largest connected piece other than the main body (0 if one piece)."""
    cut: bool
    """The scan's edge cuts the level: lower bounds of extent and volume do not apply."""
    centre_xyz: tuple[float, float, float]
    """Centre of mass in grid millimetres (z, y, x)."""

    @property
    def extent_mm(self) -> float:
        return self.upper_mm - self.lower_mm


@dataclass
class AnatomyReport:
    """The gate's answer for one segmentation."""

    levels: list[LevelMeasure] = field(default_factory=list)
    failures: list[RuleFailure] = field(default_factory=list)
    skull_base_mm: float | None = None
    """Position of the skull base along the axis, where it is in view."""

    @property
    def column_failures(self) -> list[RuleFailure]:
        return [f for f in self.failures if f.level is None]

    @property
    def column_ok(self) -> bool:
        """No rule about the whole column failed: the levels are in order and counted right."""
        return not self.column_failures

    def level_failures(self, level: str) -> list[RuleFailure]:
        return [f for f in self.failures if f.level == level]

    def vouched(self, level: str) -> bool:
        """A finding on ``level`` may raise a flag: column sound and the level passes."""
        return (self.column_ok and any(m.level == level for m in self.levels)
                and not self.level_failures(level))

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def reason_codes(self) -> list[str]:
        """Distinct failed codes, each with its level (``LEVEL_FRAGMENTED:C5``)."""
        seen: list[str] = []
        for f in self.failures:
            code = f"{f.code.value}:{f.level}" if f.level else f.code.value
            if code not in seen:
                seen.append(code)
        return seen

    def as_dict(self) -> dict[str, object]:
        return {
            "passed": self.passed,
            "column_ok": self.column_ok,
            "skull_base_mm": None if self.skull_base_mm is None
            else round(self.skull_base_mm, 1),
            "failures": [f.as_dict() for f in self.failures],
            "levels": [{"level": m.level, "extent_mm": round(m.extent_mm, 1),
                        "upper_mm": round(m.upper_mm, 1), "lower_mm": round(m.lower_mm, 1),
                        "volume_mm3": round(m.volume_mm3), "centre_mm": round(m.centre_mm, 1),
                        "bone_fraction": round(m.bone_fraction, 3),
                        "fragment_mm3": round(m.fragment_mm3), "cut": m.cut}
                       for m in self.levels],
        }


def superior_in_grid(affine: np.ndarray) -> np.ndarray:
    """Unit vector, in the volume grid's (z, y, x) millimetre space, towards the head.

    ``affine`` maps (z, y, x, 1) voxel indices to LPS mm; the segmentation grid shares its
    axes (resampling never rotates), so the same directions hold there.
    """
    columns = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = columns / np.linalg.norm(columns, axis=0)
    vector = unit.T @ np.array([0.0, 0.0, 1.0])  # LPS +S is the head
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else np.array([1.0, 0.0, 0.0])


def assess(labels: np.ndarray, raw_labels: np.ndarray, hu: np.ndarray,
           spacing: Sequence[float], superior: Sequence[float] | np.ndarray = (1.0, 0.0, 0.0),
           ) -> AnatomyReport:
    """Check one segmentation against the adult cervical spine.

    ``labels``: the cleaned label map on the segmentation grid (largest component per level;
    1..7 = C1..C7; other values are ignored); ``raw_labels``: the same before cleaning (for
    fragmentation); ``hu``: the HU volume on that grid; ``spacing``: its (z, y, x) mm;
    ``superior``: :func:`superior_in_grid`.
    """
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    up = np.asarray(superior, dtype=np.float64)
    up = up / np.linalg.norm(up)
    voxel_mm3 = float(np.prod(spacing_arr))
    report = AnatomyReport()
    present = [i + 1 for i in range(len(LEVEL_NAMES)) if (labels == i + 1).any()]
    if not present:
        return report

    cervical = np.argwhere((labels >= 1) & (labels <= len(LEVEL_NAMES))) * spacing_arr
    axis = _column_axis(cervical, up)
    tilt = float(np.degrees(np.arccos(np.clip(abs(axis @ up), 0.0, 1.0))))
    if tilt > MAX_AXIS_TILT_DEG:
        report.failures.append(RuleFailure(
            AnatomyReason.COLUMN_NOT_CRANIOCAUDAL, None, tilt, [None, MAX_AXIS_TILT_DEG], "deg",
            f"column axis {tilt:.0f} deg from the head-foot axis"))

    boxes = ndimage.find_objects(labels.astype(np.int32), max_label=len(LEVEL_NAMES))
    for label in present:
        report.levels.append(_measure(label, labels, raw_labels, hu, spacing_arr, axis,
                                      boxes[label - 1], voxel_mm3, int(np.argmax(np.abs(up)))))
    _level_rules(report)
    _column_rules(report, axis)
    _skull_base_rule(report, labels, hu, spacing_arr, axis, up)
    if report.failures:
        logger.info("anatomy gate: %s", ", ".join(report.reason_codes))
    return report


def _column_axis(points_mm: np.ndarray, up: np.ndarray) -> np.ndarray:
    """First principal axis of the cervical voxels, pointing to the head."""
    if len(points_mm) < 3:
        return up
    centred = points_mm - points_mm.mean(axis=0)
    # The covariance is 3x3: cheap even for a million voxels.
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axis = vectors[:, -1]
    spread = np.ptp(centred @ axis)
    if spread < 15.0:  # one or two small levels: the principal axis is their shape, not a column
        return up
    return axis if axis @ up >= 0 else -axis


def _measure(label: int, labels: np.ndarray, raw: np.ndarray, hu: np.ndarray,
             spacing: np.ndarray, axis: np.ndarray, box: tuple[slice, ...] | None,
             voxel_mm3: float, head_axis: int) -> LevelMeasure:
    name = LEVEL_NAMES[label - 1]
    mask = labels == label
    coords = np.argwhere(mask)
    mm = coords * spacing
    along = mm @ axis
    lower, upper = (float(v) for v in np.percentile(along, [2.0, 98.0]))
    bone = float((hu[mask] >= BONE_HU).mean())
    pieces, count = ndimage.label(raw == label, structure=np.ones((3, 3, 3), dtype=bool))
    fragment = 0.0
    if count > 1:
        sizes = np.sort(np.bincount(pieces.ravel())[1:])
        fragment = float(sizes[-2]) * voxel_mm3
    cut = box is not None and (box[head_axis].start == 0
                               or box[head_axis].stop >= labels.shape[head_axis])
    return LevelMeasure(level=name, centre_mm=float(along.mean()), lower_mm=lower,
                        upper_mm=upper, volume_mm3=float(mask.sum()) * voxel_mm3,
                        bone_fraction=bone, fragment_mm3=fragment, cut=cut,
                        centre_xyz=tuple(float(v) for v in mm.mean(axis=0)))  # type: ignore[arg-type]


def _level_rules(report: AnatomyReport) -> None:
    for m in report.levels:
        fail = report.failures.append
        extent = EXTENT_MM[m.level]
        if not extent.holds(m.extent_mm) and not (m.cut and (extent.high is None
                                                              or m.extent_mm <= extent.high)):
            fail(RuleFailure(AnatomyReason.LEVEL_EXTENT_OUT_OF_RANGE, m.level, m.extent_mm,
                             extent.as_list(), "mm",
                             f"craniocaudal extent {m.extent_mm:.0f} mm, adult "
                             f"{extent.low:g}-{extent.high:g} mm"))
        volume = VOLUME_MM3[m.level]
        if not volume.holds(m.volume_mm3) and not (m.cut and (volume.high is None
                                                              or m.volume_mm3 <= volume.high)):
            fail(RuleFailure(AnatomyReason.LEVEL_VOLUME_OUT_OF_RANGE, m.level, m.volume_mm3,
                             volume.as_list(), "mm3",
                             f"volume {m.volume_mm3 / 1000:.1f} cm3, adult "
                             f"{(volume.low or 0) / 1000:g}-{(volume.high or 0) / 1000:g} cm3"))
        if m.fragment_mm3 >= FRAGMENT_MIN_MM3 and m.fragment_mm3 >= FRAGMENT_MIN_FRACTION * (
                m.volume_mm3):
            fail(RuleFailure(AnatomyReason.LEVEL_FRAGMENTED, m.level, m.fragment_mm3,
                             [None, max(FRAGMENT_MIN_MM3, FRAGMENT_MIN_FRACTION * m.volume_mm3)],
                             "mm3", f"a second piece of {m.fragment_mm3 / 1000:.1f} cm3 "
                                    "apart from the main body"))
        if m.bone_fraction < MIN_BONE_FRACTION:
            fail(RuleFailure(AnatomyReason.LEVEL_NOT_BONE, m.level, m.bone_fraction,
                             [MIN_BONE_FRACTION, None], "fraction",
                             f"{m.bone_fraction:.0%} of the mask at or above {BONE_HU:g} HU"))


def _column_rules(report: AnatomyReport, axis: np.ndarray) -> None:
    levels = report.levels  # in label order C1..C7
    order = [m.centre_mm for m in levels]
    if any(b >= a for a, b in zip(order, order[1:], strict=False)):
        names = [m.level for m in sorted(levels, key=lambda m: -m.centre_mm)]
        report.failures.append(RuleFailure(
            AnatomyReason.LEVELS_OUT_OF_ORDER, None, None, None, None,
            "head to foot along the spine: " + ", ".join(names)))
    indices = [LEVEL_NAMES.index(m.level) for m in levels]
    missing = [LEVEL_NAMES[i] for i in range(indices[0], indices[-1] + 1) if i not in indices]
    if missing:
        report.failures.append(RuleFailure(
            AnatomyReason.LEVEL_SEQUENCE_GAP, None, float(len(missing)), [0, 0], "levels",
            f"{', '.join(missing)} missing between {levels[0].level} and {levels[-1].level}"))
    for above, below in zip(levels, levels[1:], strict=False):
        if LEVEL_NAMES.index(below.level) != LEVEL_NAMES.index(above.level) + 1:
            continue
        pair = (above.level, below.level)
        step = above.centre_mm - below.centre_mm
        allowed = SPACING_MM[pair]
        if not allowed.holds(step):
            report.failures.append(RuleFailure(
                AnatomyReason.LEVEL_SPACING_OUT_OF_RANGE, below.level, step, allowed.as_list(),
                "mm", f"centre {step:.0f} mm below {above.level}'s, adult "
                      f"{allowed.low:g}-{allowed.high:g} mm"))
        overlap = min(above.upper_mm, below.upper_mm) - max(above.lower_mm, below.lower_mm)
        tolerance = OVERLAP_TOLERANCE_MM[pair]
        if overlap > tolerance:
            report.failures.append(RuleFailure(
                AnatomyReason.LEVELS_OVERLAP, below.level, overlap, [None, tolerance], "mm",
                f"overlaps {above.level} by {overlap:.0f} mm along the spine"))
        gap = above.lower_mm - below.upper_mm
        lateral_vec = np.subtract(above.centre_xyz, below.centre_xyz)
        lateral = float(np.linalg.norm(lateral_vec - (lateral_vec @ axis) * axis))
        if gap > MAX_AXIAL_GAP_MM or lateral > MAX_LATERAL_STEP_MM:
            what = (f"{gap:.0f} mm of nothing between them along the spine" if gap
                    > MAX_AXIAL_GAP_MM else f"centres {lateral:.0f} mm apart across the spine")
            report.failures.append(RuleFailure(
                AnatomyReason.COLUMN_DISCONTINUOUS, None,
                gap if gap > MAX_AXIAL_GAP_MM else lateral,
                [None, MAX_AXIAL_GAP_MM if gap > MAX_AXIAL_GAP_MM else MAX_LATERAL_STEP_MM],
                "mm", f"{above.level}-{below.level}: {what}"))


def _skull_base_rule(report: AnatomyReport, labels: np.ndarray, hu: np.ndarray,
                     spacing: np.ndarray, axis: np.ndarray, up: np.ndarray) -> None:
    """Find the skull base above the top level; where it is in view, the top level is C1."""
    top = max(report.levels, key=lambda m: m.upper_mm)
    skull = skull_base_position(labels, hu, spacing, axis, up, top)
    report.skull_base_mm = skull
    if skull is None:
        return
    distance = skull - top.upper_mm
    if top.level == "C1":
        if not C1_TO_SKULL_BASE_MM.holds(distance):
            report.failures.append(RuleFailure(
                AnatomyReason.C1_NOT_UNDER_SKULL_BASE, None, distance,
                C1_TO_SKULL_BASE_MM.as_list(), "mm",
                f"C1's top lies {distance:.0f} mm below the skull base"))
    elif distance <= TOP_LEVEL_TO_SKULL_BASE_MM:
        report.failures.append(RuleFailure(
            AnatomyReason.C1_NOT_UNDER_SKULL_BASE, None, distance,
            [None, TOP_LEVEL_TO_SKULL_BASE_MM], "mm",
            f"{top.level} lies right under the skull base ({distance:.0f} mm), where C1 "
            "belongs: the levels are miscounted"))


def skull_base_position(labels: np.ndarray, hu: np.ndarray, spacing: np.ndarray,
                        axis: np.ndarray, up: np.ndarray, top: LevelMeasure) -> float | None:
    """Lowest position along the axis, above the top level's centre, of the skull base.

    Walks the grid's slices across the head-foot axis (the grid axis closest to ``up``) from
    the top level's centre upwards, and takes the first run of ``SKULL_MIN_RUN_MM`` in which
    every slice has ``SKULL_BONE_AREA_MM2`` of unlabelled bone within
    ``SKULL_SEARCH_RADIUS_MM`` of the column's line. None when the scan ends first.
    """
    k = int(np.argmax(np.abs(up)))
    step = 1 if up[k] > 0 else -1
    centre = np.asarray(top.centre_xyz)
    start = int(round(centre[k] / spacing[k]))
    in_plane = [a for a in range(3) if a != k]
    grids = np.meshgrid(*(np.arange(labels.shape[a]) * spacing[a] for a in in_plane),
                        indexing="ij")
    pixel_mm2 = float(spacing[in_plane[0]] * spacing[in_plane[1]])
    run_needed = max(1, int(np.ceil(SKULL_MIN_RUN_MM / spacing[k])))
    run_start: int | None = None
    run = 0
    index = start
    while 0 <= index < labels.shape[k]:
        # The column's line continued upwards: where the axis crosses this slice.
        point = _axis_point(centre, axis, k, index * spacing[k])
        distance2 = sum((g - point[a]) ** 2 for g, a in zip(grids, in_plane, strict=True))
        disc = distance2 <= SKULL_SEARCH_RADIUS_MM ** 2
        plane_hu = np.take(hu, index, axis=k)
        plane_labels = np.take(labels, index, axis=k)
        area = float(((plane_hu >= BONE_HU) & (plane_labels == 0) & disc).sum()) * pixel_mm2
        if area >= SKULL_BONE_AREA_MM2:
            if run == 0:
                run_start = index
            run += 1
            if run >= run_needed and run_start is not None:
                return float(_axis_point(centre, axis, k, run_start * spacing[k]) @ axis)
        else:
            run, run_start = 0, None
        index += step
    return None


def _axis_point(centre: np.ndarray, axis: np.ndarray, k: int, position_mm: float) -> np.ndarray:
    """Where the line through ``centre`` along ``axis`` crosses grid plane ``k = position``."""
    if abs(axis[k]) < 1e-6:
        return np.asarray(centre, dtype=np.float64)
    return np.asarray(centre + (position_mm - centre[k]) / axis[k] * axis)


def rules_markdown() -> str:
    """The rules, their allowed ranges and sources as a Markdown table (for the docs and the
    dashboard: generated from the constants above, so it cannot drift from the code)."""
    rows = ["| code | applies to | allowed | source / reason |", "|---|---|---|---|"]

    def fmt(r: Range) -> str:
        low = "" if r.low is None else f"{r.low:g}"
        high = "" if r.high is None else f"{r.high:g}"
        return f"{low} to {high} {r.unit}"

    for name, r in EXTENT_MM.items():
        rows.append(f"| LEVEL_EXTENT_OUT_OF_RANGE | {name} craniocaudal extent | {fmt(r)} | "
                    f"{r.source} |")
    for name, r in VOLUME_MM3.items():
        rows.append(f"| LEVEL_VOLUME_OUT_OF_RANGE | {name} volume | {fmt(r)} | {r.source} |")
    for (a, b), r in SPACING_MM.items():
        rows.append(f"| LEVEL_SPACING_OUT_OF_RANGE | {a}-{b} centre to centre | {fmt(r)} | "
                    f"{r.source} |")
    for (a, b), tolerance in OVERLAP_TOLERANCE_MM.items():
        rows.append(f"| LEVELS_OVERLAP | {a}-{b} overlap along the axis | up to "
                    f"{tolerance:g} mm | facet joints; the dens within the atlas for C1-C2 |")
    rows += [
        f"| LEVEL_FRAGMENTED | a second piece of one level | under {FRAGMENT_MIN_MM3:g} mm3 or "
        f"under {FRAGMENT_MIN_FRACTION:.0%} of the main piece | two comparable candidates: "
        "which is the vertebra? |",
        f"| LEVEL_NOT_BONE | mask at or above {BONE_HU:g} HU | at least "
        f"{MIN_BONE_FRACTION:.0%} | trabecular bone 150-400 HU |",
        "| LEVELS_OUT_OF_ORDER | level centres along the spine's own axis | C1, C2, ... head "
        "to foot | anatomy |",
        "| LEVEL_SEQUENCE_GAP | levels between the first and last in view | none missing | "
        "anatomy |",
        f"| COLUMN_DISCONTINUOUS | free space between neighbours / offset across the axis | "
        f"up to {MAX_AXIAL_GAP_MM:g} mm / {MAX_LATERAL_STEP_MM:g} mm | disc 4-6 mm "
        "[Gilad 1986]; listhesis of a few mm |",
        f"| COLUMN_NOT_CRANIOCAUDAL | column axis from the head-foot axis | up to "
        f"{MAX_AXIS_TILT_DEG:g} deg | an axial neck CT |",
        f"| C1_NOT_UNDER_SKULL_BASE | C1's top below the skull base (where in view) | "
        f"{fmt(C1_TO_SKULL_BASE_MM)}; another top level within "
        f"{TOP_LEVEL_TO_SKULL_BASE_MM:g} mm of it fails | {C1_TO_SKULL_BASE_MM.source} |",
    ]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(rules_markdown(), end="")
