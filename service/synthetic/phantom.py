"""Generate one synthetic cervical-spine CT phantom with ground truth.

``generate_phantom(options)`` draws a patient from ``options.seed`` (size, lordosis,
rotation, bone density, soft-tissue build), places the requested fractures and mimics,
renders soft tissue slice by slice and each bone inside its own bounding box (threads
over slices and over bones; numpy releases the GIL), adds the scanner's blur, noise and
streaks, and returns a :class:`Phantom`.

The result depends only on ``options`` (not on thread count or timing).
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.synthetic import lesions, scanner, softtissue, spine
from service.synthetic.bones import BBox, BoneObject, Extent, Grid, Rendered, composite, render_bone
from service.synthetic.calibration import HU, NOISE
from service.synthetic.options import (
    FRACTURE_LEVELS,
    LABEL_OF,
    MIMIC_LEVELS,
    VERTEBRA_NAMES,
    FractureSpec,
    FractureTruth,
    FractureType,
    MimicSpec,
    MimicTruth,
    MimicType,
    PatientInfo,
    PhantomOptions,
)
from service.synthetic.shapes import Capsule, RoundBox, Shape

logger = logging.getLogger(__name__)

IMAGE_MIMICS = (MimicType.SHOULDER_STREAK, MimicType.BEAM_HARDENING)
SOFT_TISSUE_Z_STEP_MM = 1.2
"""Soft tissue is painted about every 1.2 mm along z and interpolated in between."""
HU_MIN, HU_MAX = -1024, 3071

# Relative frequency of fracture types and of levels (trauma series: C2 and C6-C7 lead).
FRACTURE_WEIGHTS: dict[FractureType, float] = {
    FractureType.BODY: 0.24, FractureType.DENS_TYPE_II: 0.08, FractureType.C1_RING: 0.07,
    FractureType.PEDICLE: 0.1, FractureType.LAMINA: 0.12, FractureType.SPINOUS: 0.1,
    FractureType.TRANSVERSE: 0.14, FractureType.COMPRESSION: 0.15,
}
LEVEL_WEIGHTS: dict[str, float] = {"C1": 0.8, "C2": 1.6, "C3": 0.6, "C4": 0.8, "C5": 1.1,
                                   "C6": 1.5, "C7": 1.5}


@dataclass
class Phantom:
    """A synthetic CT volume with its ground truth.

    ``hu`` and ``labels`` are indexed (z, y, x); z = 0 is the most *inferior* slice
    (ascending LPS z), y runs posteriorly (image rows), x to the patient's left (columns).
    ``origin`` is the LPS position (x, y, z) in mm of the centre of voxel (0, 0, 0);
    ``spacing`` is (dz, dy, dx) in mm. The slices are axial with ImageOrientationPatient
    ``[1, 0, 0, 0, 1, 0]``, so slice k has ImagePositionPatient
    ``(origin[0], origin[1], origin[2] + k * spacing[0])``.
    """

    hu: np.ndarray
    """int16 Hounsfield units, clipped to [-1024, 3071]."""
    labels: np.ndarray
    """uint8: 0 background, 1..7 = C1..C7, 8, 9, 10 = T1, T2, T3 (vertebrae only)."""
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    slice_thickness: float
    kernel: str
    fractures: list[FractureTruth]
    mimics: list[MimicTruth]
    vertebra_fractured: dict[str, bool]
    """C1..C7 -> True when at least one fracture of that vertebra is in the volume."""
    options: PhantomOptions
    patient: PatientInfo
    metal: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def patient_fractured(self) -> bool:
        return any(self.vertebra_fractured.values())

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def affine(self) -> np.ndarray:
        """4x4 mapping a homogeneous voxel index (z, y, x, 1) to LPS mm (x, y, z)."""
        a = np.zeros((4, 4))
        a[0, 2] = self.spacing[2]
        a[1, 1] = self.spacing[1]
        a[2, 0] = self.spacing[0]
        a[:3, 3] = self.origin
        a[3, 3] = 1.0
        return a

    def slice_position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient (LPS mm) of slice ``k`` (centre of its first pixel)."""
        return (self.origin[0], self.origin[1], self.origin[2] + k * self.spacing[0])

    def vertebrae_in_view(self) -> list[str]:
        present = set(np.unique(self.labels).tolist())
        return [n for n in VERTEBRA_NAMES if LABEL_OF[n] in present]


def _patient(seed: int, age: int | None, rng: np.random.Generator) -> PatientInfo:
    sex = "M" if rng.random() < 0.6 else "F"
    age_years = int(age if age is not None else rng.integers(18, 96))
    return PatientInfo(
        patient_id=f"SYN{seed:08d}",
        patient_name=f"SYNTHETIC^PHANTOM{seed}",
        sex=sex,
        age_years=age_years,
        weight_kg=float(round(rng.uniform(50, 110) if sex == "M" else rng.uniform(42, 95), 1)),
        accession_number=f"A{seed:09d}"[:16],
    )


def _choose_weighted(rng: np.random.Generator, weights: dict, allowed: tuple) -> object:
    keys = [k for k in weights if k in allowed]
    w = np.asarray([weights[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def _resolve_fractures(options: PhantomOptions, rng: np.random.Generator,
                       in_view: set[str]) -> list[FractureSpec]:
    if not isinstance(options.fractures, int):
        return list(options.fractures)
    specs = []
    for _ in range(options.fractures):
        for _attempt in range(20):
            ftype = _choose_weighted(rng, FRACTURE_WEIGHTS, tuple(FractureType))
            allowed = tuple(v for v in FRACTURE_LEVELS[ftype] if v in in_view)  # type: ignore
            if allowed:
                level = _choose_weighted(rng, LEVEL_WEIGHTS, allowed)
                specs.append(FractureSpec(ftype, str(level)))  # type: ignore[arg-type]
                break
    return specs


def _resolve_mimics(options: PhantomOptions, rng: np.random.Generator,
                    in_view: set[str]) -> list[MimicSpec]:
    if not isinstance(options.mimics, int):
        return list(options.mimics)
    specs = []
    types = list(MimicType)
    for _ in range(options.mimics):
        for _attempt in range(20):
            mtype = types[int(rng.integers(len(types)))]
            allowed = [v for v in MIMIC_LEVELS[mtype] if v in in_view]
            if allowed:
                specs.append(MimicSpec(mtype, allowed[int(rng.integers(len(allowed)))]))
                break
    return specs


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def generate_phantom(options: PhantomOptions) -> Phantom:
    """Build the phantom described by ``options`` (deterministic in ``options``)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    seed = int(options.seed)
    rng = np.random.default_rng([seed, 1])
    patient = _patient(seed, getattr(options, "age_years", None), rng)
    scale = float(options.size_scale if options.size_scale is not None
                  else np.clip(rng.normal(1.0 if patient.sex == "F" else 1.06, 0.045), 0.88, 1.16)
                  * (0.96 if patient.sex == "F" else 1.0))
    lordosis = float(options.lordosis if options.lordosis is not None
                     else np.clip(rng.normal(18.0, 10.0), -12.0, 40.0))
    rot = options.rotation_deg if options.rotation_deg is not None else tuple(
        float(np.clip(rng.normal(0, 2.5), -6, 6)) for _ in range(3))
    table_z = float(rng.uniform(-420.0, -60.0))
    c4 = (float(rng.normal(0, 3.0)), float(rng.normal(-9.0, 4.0)), table_z)
    geo = spine.build_geometry(rng, scale, lordosis, rot, options.osteopenia, c4)  # type: ignore

    # ---- grid
    dz = float(options.slice_spacing)
    pixel = float(options.pixel_spacing)
    n = int(options.matrix)
    if options.n_slices is None:
        top = float(geo.skull.center[2]) + 40.0 * scale
        bottom = float(geo.levels["T2"].center[2]) - 12.0 * scale
        nz = int(math.ceil((top - bottom) / dz)) + 1
        z0 = bottom + options.z_offset_mm
    else:
        nz = int(options.n_slices)
        z0 = table_z + options.z_offset_mm - 0.5 * (nz - 1) * dz
    fov_center = (0.0, float(rng.normal(2.0, 4.0)))
    origin = (fov_center[0] - 0.5 * (n - 1) * pixel, fov_center[1] - 0.5 * (n - 1) * pixel, z0)
    grid = Grid(origin=origin, spacing=(dz, pixel, pixel), shape=(nz, n, n))
    z_lo, z_hi = z0, z0 + (nz - 1) * dz
    kernel = str(options.kernel.value if hasattr(options.kernel, "value") else options.kernel)
    edge = scanner.edge_mm(kernel, pixel)

    # ---- bones
    bone_rng = np.random.default_rng([seed, 2])
    parts: dict[str, spine.VertebraParts] = {}
    objects: dict[str, BoneObject] = {}
    for name in ("C1", "C2") + spine.SUBAXIAL:
        if name == "C1":
            vp = spine.c1_parts(geo, bone_rng)
            level = geo.c1
        elif name == "C2":
            vp = spine.c2_parts(geo, bone_rng)
            level = geo.levels["C2"]
        else:
            vp = spine.subaxial_parts(geo, name, bone_rng)
            level = geo.levels[name]
        parts[name] = vp
        objects[name] = spine.vertebra_object(name, level.center, level.rot, vp, geo.bone,
                                              int(bone_rng.integers(1 << 30)), bone_rng)

    def level_in_view(name: str) -> bool:
        zc = float((geo.c1 if name == "C1" else geo.levels[name]).center[2])
        return z_lo + 4.0 < zc < z_hi - 4.0

    in_view = {n for n in VERTEBRA_NAMES if level_in_view(n)}
    lesion_rng = np.random.default_rng([seed, 3])
    fracture_specs = _resolve_fractures(options, lesion_rng, in_view)
    mimic_specs = _resolve_mimics(options, lesion_rng, in_view)
    pending_fractures: list[tuple[str, FractureSpec, float]] = []
    pending_mimics: list[tuple[str, MimicSpec]] = []
    extra_objects: list[BoneObject] = []
    image_mimics: list[tuple[str, MimicSpec]] = []
    for i, fspec in enumerate(fracture_specs):
        level_name = fspec.vertebra or str(_choose_weighted(
            lesion_rng, LEVEL_WEIGHTS, FRACTURE_LEVELS[fspec.type]))
        if level_name not in FRACTURE_LEVELS[fspec.type]:
            raise ValueError(f"{fspec.type} cannot be placed at {level_name}")
        key = f"fracture{i}"
        disp = lesions.apply_fracture(objects[level_name], parts[level_name], geo, level_name,
                                      fspec.type, lesion_rng, key, fspec.displacement_mm)
        pending_fractures.append((key, FractureSpec(fspec.type, level_name), disp))
    for i, mspec in enumerate(mimic_specs):
        allowed = MIMIC_LEVELS[mspec.type]
        level_name = mspec.vertebra or allowed[int(lesion_rng.integers(len(allowed)))]
        if level_name not in allowed:
            raise ValueError(f"{mspec.type} cannot be placed at {level_name}")
        key = f"mimic{i}"
        if mspec.type in IMAGE_MIMICS:
            image_mimics.append((key, MimicSpec(mspec.type, level_name)))
            continue
        extra_objects += lesions.apply_mimic(objects[level_name], parts[level_name], geo,
                                             level_name, mspec.type, lesion_rng, key)
        pending_mimics.append((key, MimicSpec(mspec.type, level_name)))

    discs = [spine.disc_object(geo, u, lo, HU.disc * float(bone_rng.uniform(0.9, 1.1)))
             for u, lo in geo.discs]
    others = (spine.skull_base_objects(geo, bone_rng) + spine.mandible_hyoid_objects(geo, bone_rng)
              + spine.thorax_objects(geo, bone_rng))
    metal_objects = _metal_objects(geo, bone_rng) if options.metal else []
    ordered = discs + others + [objects[n] for n in objects] + extra_objects
    timings["setup"] = time.perf_counter() - t_start

    # ---- soft tissue, slice by slice
    t0 = time.perf_counter()
    hu = np.empty(grid.shape, dtype=np.float32)
    xs, ys, zs = grid.axis(2), grid.axis(1), grid.axis(0)
    soft = softtissue.draw_params(np.random.default_rng([seed, 4]), scale, patient.age_years)
    heights = softtissue.level_heights(geo)
    axis_pts = geo.body_axis_samples()
    canal_pts = np.asarray(sorted(
        [lv.to_world((0.0, lv.body[1] + lv.canal[1], 0.0)) for lv in geo.levels.values()]
        + [geo.c1.to_world((0.0, 15.0 * scale, 0.0)), geo.skull.to_world((0.0, 14.0, 8.0))],
        key=lambda p: p[2]))
    edge_soft = max(edge, 0.7)
    threads = _threads()

    # Soft tissue changes slowly along z: paint every ``step``-th slice (about every mm)
    # and interpolate the ones between linearly.
    step = max(1, int(round(SOFT_TISSUE_Z_STEP_MM / dz)))
    painted = sorted(set(range(0, nz, step)) | {nz - 1})

    def soft_chunk(ks: list[int]) -> None:
        for k in ks:
            softtissue.paint_slice(hu[k], float(zs[k]), xs, ys, geo, heights, soft, axis_pts,
                                   canal_pts, edge_soft, options.shoulders)

    def between_chunk(pairs: list[tuple[int, int]]) -> None:
        for a, b in pairs:
            for k in range(a + 1, b):
                w = np.float32((k - a) / (b - a))
                np.multiply(hu[a], 1 - w, out=hu[k])
                hu[k] += w * hu[b]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(soft_chunk, [painted[i:i + 6] for i in range(0, len(painted), 6)]))
        pairs = [(a, b) for a, b in zip(painted[:-1], painted[1:], strict=True) if b - a > 1]
        list(pool.map(between_chunk, [pairs[i:i + 8] for i in range(0, len(pairs), 8)]))
    timings["soft_tissue"] = time.perf_counter() - t0

    # ---- bones
    t0 = time.perf_counter()
    labels = np.zeros(grid.shape, dtype=np.uint8)
    truth: dict[str, Extent] = {}
    with ThreadPoolExecutor(threads) as pool:
        rendered = list(pool.map(lambda o: render_bone(o, grid, edge), ordered + metal_objects))
    for r in rendered:
        if r is None:
            continue
        if r.name.startswith("metal"):
            _composite_metal(r, hu)
        else:
            composite(r, hu, labels)
        for key, extent in r.truth.items():
            truth.setdefault(key, Extent()).merge(extent)
    del rendered
    timings["bones"] = time.perf_counter() - t0

    # ---- scanner: through-plane blur, streaks, noise
    t0 = time.perf_counter()
    thickness = options.resolved_thickness()
    if thickness > 1.25 * dz:
        from scipy.ndimage import uniform_filter1d

        size = int(round(thickness / dz))
        if size > 1:
            uniform_filter1d(hu, size=size, axis=0, output=hu, mode="nearest")
    art_rng = np.random.default_rng([seed, 5])
    truth.update(_image_mimics(hu, labels, grid, geo, image_mimics, art_rng, xs, ys, zs))
    if options.shoulders:
        _shoulder_artifact(hu, grid, geo, art_rng, xs, ys, zs)
    if metal_objects:
        _metal_artifact(hu, grid, art_rng, xs, ys)
    sigma = NOISE.sigma(kernel, pixel, thickness) * float(options.noise_scale)
    plan = scanner.NoisePlan(seed=seed, sigma=sigma,
                             shoulder_z=float(geo.levels["C6"].center[2]),
                             shoulder_span=max(1.0, float(geo.levels["C6"].center[2]
                                                          - geo.levels["T2"].center[2])),
                             shoulder_gain=0.9 if options.shoulders else 0.3)
    pool_fields = scanner.noise_pool(seed, kernel, n, n, pixel)
    out = np.empty(grid.shape, dtype=np.int16)

    def finish_chunk(ks: range) -> None:
        for k in ks:
            scanner.add_noise(hu[k], k, float(zs[k]), pool_fields, plan)
            np.clip(hu[k], HU_MIN, HU_MAX, out=hu[k])
            np.rint(hu[k], out=hu[k])
            out[k] = hu[k]

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(finish_chunk, [range(i, min(i + 8, nz)) for i in range(0, nz, 8)]))
    timings["scanner"] = time.perf_counter() - t0

    # ---- ground truth
    fractures: list[FractureTruth] = []
    for key, spec, disp in pending_fractures:
        found = truth.get(key)
        box = found.bbox if found else None
        if found is None or box is None:
            logger.info("fracture %s at %s fell outside the volume; dropped", spec.type,
                        spec.vertebra)
            continue
        fractures.append(FractureTruth(str(spec.vertebra), spec.type, box, round(disp, 2),
                                       _center_lps(box, grid), found.slice_boxes()))
    mimics: list[MimicTruth] = []
    for key, mspec in pending_mimics + image_mimics:
        found = truth.get(key)
        box = found.bbox if found else None
        if found is None or box is None:
            logger.info("mimic %s at %s fell outside the volume; dropped", mspec.type,
                        mspec.vertebra)
            continue
        mimics.append(MimicTruth(mspec.type, mspec.vertebra, box, _center_lps(box, grid),
                                 found.slice_boxes()))
    fractured = {n: any(f.vertebra == n for f in fractures) for n in VERTEBRA_NAMES}
    timings["total"] = time.perf_counter() - t_start
    logger.debug("phantom seed=%d shape=%s timings=%s", seed, grid.shape, timings)
    return Phantom(hu=out, labels=labels, spacing=grid.spacing, origin=origin,
                   slice_thickness=thickness, kernel=kernel, fractures=fractures,
                   mimics=mimics, vertebra_fractured=fractured, options=options,
                   patient=patient, metal=bool(metal_objects), timings=timings)


def _union(a: BBox | None, b: BBox | None) -> BBox | None:
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), min(a[1], b[1]), min(a[2], b[2]),
            max(a[3], b[3]), max(a[4], b[4]), max(a[5], b[5]))


def _center_lps(box: BBox, grid: Grid) -> tuple[float, float, float]:
    zc, yc, xc = ((box[i] + box[i + 3] - 1) / 2 for i in range(3))
    return (round(grid.origin[0] + xc * grid.spacing[2], 2),
            round(grid.origin[1] + yc * grid.spacing[1], 2),
            round(grid.origin[2] + zc * grid.spacing[0], 2))


def _metal_objects(geo: spine.SpineGeometry, rng: np.random.Generator) -> list[BoneObject]:
    """Anterior cervical plate over two adjacent bodies with two screws in each."""
    upper = str(rng.choice(["C4", "C5"]))
    lower = {"C4": "C5", "C5": "C6"}[upper]
    lu, ll = geo.levels[upper], geo.levels[lower]
    objs = []
    top = lu.to_world((0.0, -lu.body[1] - 1.6, lu.body[2] - 1.0))
    bottom = ll.to_world((0.0, -ll.body[1] - 1.6, -ll.body[2] + 1.0))
    center = 0.5 * (top + bottom)
    half_len = 0.5 * float(np.linalg.norm(top - bottom)) + 2.0
    plate = RoundBox((0.0, 0.0, 0.0), (7.5, 1.1, half_len), radius=0.8)
    objs.append(BoneObject("metal_plate", 0, center, lu.rot, [plate], cortex_hu=3071.0,
                           cancellous_hu=3071.0, cortex_mm=1.0, texture_hu=0.0))
    for lv in (lu, ll):
        screws: list[Shape] = [Capsule((side * 4.0, -lv.body[1] - 1.5, 0.0),
                          (side * 2.5, lv.body[1] - 3.0, 0.5), 1.9, 1.5) for side in (-1, 1)]
        objs.append(BoneObject(f"metal_screws_{lv.name}", 0, lv.center, lv.rot, screws,
                               cortex_hu=3071.0, cancellous_hu=3071.0, cortex_mm=1.0,
                               texture_hu=0.0))
    return objs


def _composite_metal(r: Rendered, hu: np.ndarray) -> None:
    flat = hu.reshape(-1)
    values = flat[r.index]
    values += r.fraction * (np.float32(3071.0) - values)
    flat[r.index] = values


def _metal_artifact(hu: np.ndarray, grid: Grid, rng: np.random.Generator,
                    xs: np.ndarray, ys: np.ndarray) -> None:
    for k in range(hu.shape[0]):
        metal = hu[k] > 2900
        if metal.sum() < 4:
            continue
        jj, ii = np.nonzero(metal)
        cx, cy = float(xs[ii].mean()), float(ys[jj].mean())
        srng = np.random.default_rng([int(rng.integers(1 << 30)), k])
        scanner.paint_streaks(hu[k], xs, ys, scanner.metal_streaks(srng, cx, cy))
        hu[k][metal] = 3071.0


def _shoulder_artifact(hu: np.ndarray, grid: Grid, geo: spine.SpineGeometry,
                       rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray,
                       zs: np.ndarray) -> None:
    """Photon-starvation streaks in every slice below C6 (stronger lower down)."""
    z_start = float(geo.levels["C6"].center[2])
    z_full = float(geo.levels["T1"].center[2])
    seed = int(rng.integers(1 << 30))
    group_mm = 3.0
    for k in np.flatnonzero(zs < z_start):
        z = float(zs[k])
        strength = float(np.clip((z_start - z) / max(z_start - z_full, 1.0), 0.2, 1.0))
        group = int(max(z - grid.origin[2], 0.0) // group_mm)
        srng = np.random.default_rng([seed, group])
        body = geo.levels["C7"].center
        scanner.paint_streaks(hu[k], xs, ys, scanner.shoulder_streaks(
            srng, float(body[0]), float(body[1]), strength), mask_min_hu=-500)


def _image_mimics(hu: np.ndarray, labels: np.ndarray, grid: Grid, geo: spine.SpineGeometry,
                  mimics: list[tuple[str, MimicSpec]], rng: np.random.Generator,
                  xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> dict[str, Extent]:
    """Streak and beam-hardening bands laid through a vertebral body: dark lines that cross
    the cortex like a fracture but are artefacts (they extend beyond the bone, straight)."""
    out: dict[str, Extent] = {}
    for key, spec in mimics:
        lv = geo.levels[str(spec.vertebra)]
        label = LABEL_OF[str(spec.vertebra)]
        zc = float(lv.center[2] + rng.uniform(-0.4, 0.4) * lv.body[2])
        if spec.type == MimicType.SHOULDER_STREAK:
            amp, width, half_z = -rng.uniform(220, 380), rng.uniform(0.5, 0.9), 0.9
        else:
            amp, width, half_z = -rng.uniform(140, 240), rng.uniform(1.2, 2.2), 2.0
        angle = float(rng.normal(0, 5))
        y0 = float(lv.center[1] + rng.uniform(-0.3, 0.3) * lv.body[1])
        extent = Extent()
        ks = np.flatnonzero(np.abs(zs - zc) <= max(half_z, 0.5 * grid.spacing[0]))
        for k in ks:
            streak = scanner.Streak(float(amp), float(lv.center[0]), y0, angle, float(width))
            added = scanner.paint_streaks(hu[k], xs, ys, [streak], mask_min_hu=-300)
            hit = (added < -60) & (labels[k] == label)
            if hit.any():
                jj, ii = np.nonzero(hit)
                extent.add_box(int(k), int(jj.min()), int(ii.min()), int(jj.max()) + 1,
                               int(ii.max()) + 1)
        out[key] = extent
    return out
