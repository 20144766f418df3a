"""Training data: RSNA-layout studies -> cached, preprocessed arrays (numpy only, no torch).

A study (real RSNA 2022 data or the synthetic writer's output, the same layout) becomes a
:class:`Case` (HU volume, label map on the DICOM grid, per-vertebra labels, fracture boxes on
volume slices) and then, through the *runtime's own* preprocessing
(``service.inference.pipeline.segmentation_input`` and ``service.inference.crops``), one
``.npz`` file per study:

``seg_image``   uint8 (C, z, y, x): windowed segmentation input on the isotropic grid (x255)
``seg_labels``  uint8 (z, y, x): classes 0 background, 1..7 C1..C7, 8 thoracic, same grid
``stacks``      uint8 (N, S, C, H, W): classifier inputs (x255); per vertebra in view, one
                canonical crop and ``jitters`` jittered ones (box shift/scale, z range),
                cut with the ground-truth label map, the served segmentation's, or both
                (``crops``, see :func:`prepare_case`)
``stack_label`` int8 (N,): 1..7, which vertebra (ground truth, under a served crop's mask)
``stack_target`` float32 (N,): vertebra fractured (0/1) from train.csv
``slice_target`` float32 (N, S): slice overlaps a fracture box of that vertebra (0/1), or -1
                when the study has no boxes (unknown: masked out of the loss)
``stack_canonical`` bool (N,): the unjittered crop (validation uses only these)
``fracture_mask`` uint8 (N, S, H, W): 1 on crop pixels inside a fracture box of that vertebra
                (dense supervision), 255 where unknown (no boxes for the study)

Quantising to uint8 keeps hundreds of studies in memory; 1/255 is far below what the
windows resolve.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from service.evaluation.rsna import (
    RsnaStudy,
    cervical_and_thoracic,
    segmentation_on_volume,
    slice_number_to_z,
)
from service.findings import VERTEBRAE
from service.imaging.preprocess import Box, crop_box, resample_labels
from service.inference.crops import StackSpec, vertebra_box, vertebra_stack
from service.inference.manifest import Preprocessing
from service.inference.pipeline import Segmentation, segmentation_input

logger = logging.getLogger(__name__)


@dataclass
class Case:
    """One study on the DICOM volume grid (z, y, x)."""

    uid: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    labels: np.ndarray | None
    """Model classes (0, 1..7, 8 thoracic) on the volume grid; None without a segmentation."""
    vertebra_fractured: np.ndarray | None
    """(7,) 0/1 for C1..C7; None when the study has no labels."""
    fracture_boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    """(z, y0, x0, y1, x1) fracture boxes on volume slices (pixels, end-exclusive)."""
    has_boxes: bool = False


def case_from_rsna(study: RsnaStudy) -> Case:
    """Read one study of an RSNA-layout directory (DICOM through the service's own loader)."""
    from service.imaging.volume import load_volume

    paths = study.dicom_paths()
    volume = load_volume(paths)
    labels = None
    if study.segmentation is not None:
        labels = cervical_and_thoracic(segmentation_on_volume(study.segmentation, volume.affine,
                                                              volume.shape))
    boxes: list[tuple[int, float, float, float, float]] = []
    if study.boxes:
        z_of = slice_number_to_z(paths, volume.sop_instance_uids)
        for b in study.boxes:
            if b.slice_number in z_of:
                boxes.append((z_of[b.slice_number], b.y, b.x, b.y + b.height, b.x + b.width))
    fractured = None if study.labels is None else np.array(study.labels.vertebrae, np.int8)
    has_boxes = bool(study.boxes) or (fractured is not None and not fractured.any())
    return Case(uid=study.study_instance_uid, hu=volume.hu, spacing=volume.spacing,
                labels=labels, vertebra_fractured=fractured, fracture_boxes=boxes,
                has_boxes=has_boxes)


def case_from_phantom(phantom: Any, uid: str) -> Case:
    """A synthetic phantom as a :class:`Case`, without the DICOM/NIfTI round trip.

    Equivalent to writing it with ``write_rsna_layout`` and reading it back with
    :func:`case_from_rsna` (the phantom's z axis is already the sorted-series order, the
    writer is lossless and the NIfTI mapping exact: ``tests/unit/models`` checks this), at
    half the cost; used to build large synthetic training caches on a small CPU.
    """
    fractured = np.array([int(phantom.vertebra_fractured[v]) for v in VERTEBRAE], np.int8)
    boxes: list[tuple[int, float, float, float, float]] = []
    for fracture in phantom.fractures:
        per_slice = fracture.slice_boxes or tuple(
            (z, fracture.bbox[1], fracture.bbox[2], fracture.bbox[4], fracture.bbox[5])
            for z in range(fracture.bbox[0], fracture.bbox[3]))
        boxes.extend((int(z), float(y0), float(x0), float(y1), float(x1))
                     for z, y0, x0, y1, x1 in per_slice)
    return Case(uid=uid, hu=phantom.hu, spacing=tuple(float(s) for s in phantom.spacing),
                labels=cervical_and_thoracic(phantom.labels), vertebra_fractured=fractured,
                fracture_boxes=boxes, has_boxes=True)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def jitter_box(box: Box, rng: np.random.Generator, *, shift: float = 0.08,
               scale: tuple[float, float] = (0.9, 1.15), z_frac: float = 0.12) -> Box:
    """A randomly perturbed crop box: what an imperfect segmentation would hand the classifier."""
    z0, y0, x0, z1, y1, x1 = box
    s = rng.uniform(*scale)
    out = []
    for lo, hi in ((y0, y1), (x0, x1)):
        size = hi - lo
        centre = (lo + hi) / 2.0 + rng.uniform(-shift, shift) * size
        n = max(4, int(round(size * s)))
        start = int(math.floor(centre - n / 2.0 + 0.5))
        out.append((start, start + n))
    nz = z1 - z0
    dz0 = int(round(rng.uniform(-z_frac, z_frac) * nz))
    dz1 = int(round(rng.uniform(-z_frac, z_frac) * nz))
    nz0, nz1 = z0 + dz0, z1 + dz1
    if nz1 - nz0 < 2:
        nz0, nz1 = z0, z1
    return (nz0, out[0][0], out[1][0], nz1, out[0][1], out[1][1])


def slice_targets(case: Case, label: int, z_positions: np.ndarray) -> np.ndarray:
    """Per sampled slice: 1 when a fracture box on that slice overlaps this vertebra's mask."""
    if not case.has_boxes or case.labels is None:
        return np.full(len(z_positions), -1.0, np.float32)
    out = np.zeros(len(z_positions), np.float32)
    if case.vertebra_fractured is not None and not case.vertebra_fractured[label - 1]:
        return out
    nz = case.labels.shape[0]
    by_z: dict[int, list[tuple[float, float, float, float]]] = {}
    for z, y0, x0, y1, x1 in case.fracture_boxes:
        by_z.setdefault(int(z), []).append((y0, x0, y1, x1))
    for k, zf in enumerate(z_positions):
        z = int(np.clip(round(float(zf)), 0, nz - 1))
        for y0, x0, y1, x1 in by_z.get(z, []):
            patch = case.labels[z, int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))]
            if (patch == label).any():
                out[k] = 1.0
                break
    return out


def fracture_mask(case: Case, label: int, box: Box, spec: StackSpec) -> np.ndarray | None:
    """Where the fracture boxes of this vertebra fall in each classifier slice.

    uint8 (slices, size, size): 1 where a pixel of the crop lies inside a fracture box drawn
    on its (nearest) source slice *and* inside this vertebra's mask, so a box that spills
    onto the next level does not teach the net that level's bone. None when the study's
    boxes are unknown. The crop's pixel -> source mapping is the one
    :func:`service.imaging.preprocess.crop_box` uses for the classifier input.
    """
    if not case.has_boxes or case.labels is None:
        return None
    n_z = spec.slices * spec.subsamples
    shape = (n_z, spec.size, spec.size)
    labels, crop = crop_box(case.labels, box, output_shape=shape, resize=True, order=0, fill=0)
    centre = np.arange(spec.slices) * spec.subsamples + spec.subsamples // 2
    out = np.zeros((spec.slices, spec.size, spec.size), np.uint8)
    if case.vertebra_fractured is not None and not case.vertebra_fractured[label - 1]:
        return out
    by_z: dict[int, list[tuple[float, float, float, float]]] = {}
    for z, y0, x0, y1, x1 in case.fracture_boxes:
        by_z.setdefault(int(z), []).append((y0, x0, y1, x1))
    rows = crop.offset[1] + np.arange(spec.size) * crop.scale[1]
    cols = crop.offset[2] + np.arange(spec.size) * crop.scale[2]
    nz = case.labels.shape[0]
    for k, row in enumerate(centre):
        z = int(np.clip(round(crop.offset[0] + row * crop.scale[0]), 0, nz - 1))
        for y0, x0, y1, x1 in by_z.get(z, []):
            inside = ((rows[:, None] >= y0 - 0.5) & (rows[:, None] < y1 - 0.5)
                      & (cols[None, :] >= x0 - 0.5) & (cols[None, :] < x1 - 0.5))
            out[k] |= (inside & (labels[row] == label)).astype(np.uint8)
    return out


CROP_SOURCES = ("gt", "served", "both", "none")
"""Which label map the classifier crops are cut with: the ground truth, the segmentation
model's own output (what the classifier is served at runtime), or both; "none" cuts no
crops (a cache for ``models.train --stages seg`` only: a fifth of the preparation time)."""

NEEDS_SERVED = ("served", "both")
"""Crop sources that need the segmentation model's output on the case."""


def _gt_crop_sources(case: Case, pre: Preprocessing) -> list[tuple[int, int, Box, np.ndarray]]:
    """(mask label, target label, bbox, label map) per ground-truth level large enough."""
    assert case.labels is not None
    voxel_mm3 = float(np.prod(case.spacing))
    objects = ndimage.find_objects(case.labels, max_label=len(VERTEBRAE))
    counts = np.bincount(case.labels.ravel(), minlength=len(VERTEBRAE) + 1)
    out = []
    for index, obj in enumerate(objects):
        label = index + 1
        if obj is None or counts[label] * voxel_mm3 < pre.min_vertebra_volume_mm3:
            continue
        bbox: Box = (obj[0].start, obj[1].start, obj[2].start, obj[0].stop, obj[1].stop,
                     obj[2].stop)
        out.append((label, label, bbox, case.labels))
    return out


def _served_crop_sources(case: Case, served: Segmentation
                         ) -> list[tuple[int, int, Box, np.ndarray]]:
    """(mask label, target label, bbox, label map) per level the served segmentation finds.

    The target is the ground-truth level under most of the served mask: a crop the
    segmentation calls C5 but that holds C6's bone is judged by C6's fracture status, which is
    what its pixels show (the level it is reported at is the segmentation's business).
    """
    assert case.labels is not None
    out = []
    for label, bbox in served.in_view:
        under = case.labels[served.label_map == label]
        under = under[(under >= 1) & (under <= len(VERTEBRAE))]
        if under.size == 0:
            continue  # the segmentation's level holds no cervical bone: nothing to learn
        truth = int(np.bincount(under).argmax())
        out.append((label, truth, bbox, served.label_map))
    return out


def prepare_case(case: Case, pre: Preprocessing, *, jitters: int, seed: int,
                 served: Segmentation | None = None, crops: str = "gt",
                 ) -> dict[str, np.ndarray]:
    """All training arrays of one case (see module docstring).

    ``crops`` says which label map the classifier crops come from (:data:`CROP_SOURCES`);
    "served" and "both" need ``served``, the segmentation stage's output on this case
    (:func:`service.inference.pipeline.segment_volume`).
    """
    if case.labels is None:
        raise ValueError(f"study {case.uid} has no segmentation; it cannot train the model")
    if crops not in CROP_SOURCES:
        raise ValueError(f"crops must be one of {CROP_SOURCES}, not {crops!r}")
    if crops in NEEDS_SERVED and served is None:
        raise ValueError(f"crops={crops!r} needs the served segmentation")
    rng = np.random.default_rng(seed)
    image, grid = segmentation_input(case.hu, case.spacing, pre)
    z, y, x = grid.shape
    seg_image = _to_uint8(image[0, :, :z, :y, :x])
    seg_labels = resample_labels(case.labels, case.spacing, grid.spacing,
                                 output_shape=grid.shape).astype(np.uint8)
    spec = pre.stack_spec()
    sources = []
    if crops in ("gt", "both"):
        sources += _gt_crop_sources(case, pre)
    if crops in NEEDS_SERVED:
        assert served is not None
        sources += _served_crop_sources(case, served)
    stacks, labels, targets, s_targets, canonical, masks = [], [], [], [], [], []
    unknown_mask = np.full((spec.slices, spec.size, spec.size), 255, np.uint8)
    for label, truth, bbox, label_map in sources:
        base = vertebra_box(bbox, case.spacing, spec)
        target = float(case.vertebra_fractured[truth - 1]) if case.vertebra_fractured is not None \
            else -1.0
        for variant in range(jitters + 1):
            box = base if variant == 0 else jitter_box(base, rng)
            stack, zs = vertebra_stack(case.hu, label_map, label, box, spec)
            stacks.append(_to_uint8(stack))
            labels.append(truth)
            targets.append(target)
            s_targets.append(slice_targets(case, truth, zs))
            canonical.append(variant == 0)
            mask = fracture_mask(case, truth, box, spec)
            masks.append(unknown_mask if mask is None else mask)
    shape = (0, spec.slices, spec.channels, spec.size, spec.size)
    return {
        "seg_image": seg_image,
        "seg_labels": seg_labels,
        "stacks": np.stack(stacks) if stacks else np.zeros(shape, np.uint8),
        "stack_label": np.array(labels, np.int8),
        "stack_target": np.array(targets, np.float32),
        "slice_target": (np.stack(s_targets) if s_targets
                         else np.zeros((0, spec.slices), np.float32)),
        "stack_canonical": np.array(canonical, bool),
        "fracture_mask": (np.stack(masks) if masks
                          else np.zeros((0, spec.slices, spec.size, spec.size), np.uint8)),
    }


def save_prepared(path: Path, arrays: dict[str, np.ndarray], *, compress: bool = True) -> None:
    """Write atomically (a partial file never looks like a prepared study).

    ``compress=False`` trades disk (about 13 MB a study instead of 3) for time: zlib is a
    quarter of a study's preparation and most of loading a large cache.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    (np.savez_compressed if compress else np.savez)(tmp, **arrays)
    tmp.replace(path)


def load_prepared(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
