"""Volume -> Findings: segmentation of C1..C7, then a fracture classifier per vertebra in view.

Stages (each timed into ``Findings.stage_durations``, seconds):

``preprocess``
    The HU volume is resampled onto an isotropic grid of ``seg_spacing_mm`` (origin-aligned,
    see ``service.imaging.preprocess``), windowed into the model's channels and padded at the
    far end of each axis to a multiple of ``seg_divisor``.
``segmentation``
    ``seg.onnx`` gives class probabilities on that grid (where the manifest names a
    ``seg_field_of_view_mm``, a second pass on that square around the spine the first pass
    found, the field of view the net learned on); the arg-max label map is cleaned
    (each level keeps its largest connected component, so a stray blob cannot put a vertebra
    "in view") and brought back to the volume's own grid by nearest neighbour: that is the
    label map the DICOM SEG is built from (0 background, 1..7 = C1..C7; the model's extra
    thoracic class is dropped).
``classification``
    For every vertebra in view, :func:`service.inference.crops.vertebra_stack` samples the
    classifier input; ``frac.onnx`` gives the vertebra's fracture probability and a score per
    sampled slice (averaged with its left-right mirror's where ``crop_flip_average``),
    interpolated onto every slice of the vertebra's z range (key images are the
    highest-scoring ones).

All indices in the findings are into the sorted ``Volume`` array (z, y, x). No torch here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from service.config import Settings
from service.findings import (
    VERTEBRAE,
    Findings,
    VertebraFinding,
    instances_fingerprint,
)
from service.imaging.preprocess import multi_window, resample_to_original, resample_to_spacing
from service.imaging.volume import Volume
from service.inference.crops import vertebra_box, vertebra_stack
from service.inference.manifest import Preprocessing
from service.inference.plausibility import (
    AnatomyReason,
    AnatomyReport,
    assess,
    superior_in_grid,
)
from service.inference.runtime import ModelRuntime, Stage, get_runtime
from service.outcomes import AnalysisResult

logger = logging.getLogger(__name__)

KEY_SLICES = 3
"""Key images per vertebra."""
FRAC_BATCH = 8
"""Vertebrae per classifier call (bounds memory; all seven fit in one call on CPU)."""
PARTIAL_VERTEBRA = "PARTIAL_VERTEBRA"
NO_VERTEBRA_IN_VIEW = "NO_VERTEBRA_IN_VIEW"
NOT_BONE = "SEGMENTED_LEVEL_WITHOUT_BONE"
OUT_OF_ORDER = AnatomyReason.LEVELS_OUT_OF_ORDER.value
"""Also a warning: the levels' centres do not follow C1, C2, ... along the spine's own axis
(the anatomy gate's rule, :mod:`.plausibility`; one definition for both)."""


@dataclass(frozen=True)
class SegGrid:
    """The isotropic segmentation grid of one volume and how it maps back.

    Coarse voxel ``c`` along an axis sits at source index ``c * coarse / source spacing``
    (origin-aligned), so a source index ``i`` belongs to coarse voxel
    ``floor(i * source / coarse spacing + 0.5)``, as in the label map's nearest resampling.
    """

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    """Unpadded coarse shape."""
    padded_shape: tuple[int, int, int]

    @classmethod
    def for_volume(cls, shape: Sequence[int], spacing: Sequence[float], target_mm: float,
                   divisor: int) -> SegGrid:
        from service.imaging.preprocess import resampled_shape

        target = (target_mm, target_mm, target_mm)
        coarse = resampled_shape(shape, spacing, target)
        padded = tuple(int(-(-n // divisor) * divisor) for n in coarse)
        return cls(tuple(int(n) for n in shape),  # type: ignore[arg-type]
                   tuple(float(s) for s in spacing), target,  # type: ignore[arg-type]
                   tuple(int(n) for n in coarse), padded)  # type: ignore[arg-type]

    def source_box(self, coarse_box: tuple[int, int, int, int, int, int],
                   ) -> tuple[int, int, int, int, int, int]:
        """End-exclusive source-grid box of the source voxels that map into a coarse box."""
        lo, hi = [], []
        for axis in range(3):
            # Exactly the coordinate and rounding of the order-0 resampling back to the source
            # grid (scipy: coordinate i * source/coarse spacing, rounded half up).
            scale = self.source_spacing[axis] / self.spacing[axis]
            n = self.source_shape[axis]
            nearest = np.clip(np.floor(np.arange(n) * scale + 0.5), 0, self.shape[axis] - 1)
            c0, c1 = coarse_box[axis], coarse_box[axis + 3]
            lo.append(int(np.searchsorted(nearest, c0, side="left")))
            hi.append(max(int(np.searchsorted(nearest, c1 - 1, side="right")), lo[-1] + 1))
        return (lo[0], lo[1], lo[2], hi[0], hi[1], hi[2])


def coarse_volume(hu: np.ndarray, spacing: Sequence[float], pre: Preprocessing,
                  ) -> tuple[np.ndarray, SegGrid]:
    """The HU volume on the segmentation grid (float32, unpadded) and that grid."""
    grid = SegGrid.for_volume(hu.shape, spacing, pre.seg_spacing_mm, pre.seg_divisor)
    coarse = resample_to_spacing(hu, spacing, grid.spacing, order=1, output_shape=grid.shape,
                                 antialias=pre.seg_antialias)
    return coarse, grid


def window_and_pad(coarse: np.ndarray, grid: SegGrid, pre: Preprocessing) -> np.ndarray:
    """(1, C, Z, Y, X) float32 network input from the coarse HU volume."""
    image = pad_to_divisor(multi_window(coarse, pre.preprocess_windows()), pre.seg_divisor)
    assert image.shape[1:] == grid.padded_shape
    return image[None]


def pad_to_divisor(image: np.ndarray, divisor: int) -> np.ndarray:
    """(C, z, y, x) padded at the far end of each spatial axis to a multiple of ``divisor``."""
    pad = [(0, 0)] + [(0, -(-n // divisor) * divisor - n) for n in image.shape[1:]]
    return np.pad(image, pad, mode="constant")


def segmentation_input(hu: np.ndarray, spacing: Sequence[float], pre: Preprocessing,
                       ) -> tuple[np.ndarray, SegGrid]:
    """(1, C, Z, Y, X) float32 network input and its grid; shared with training."""
    coarse, grid = coarse_volume(hu, spacing, pre)
    return window_and_pad(coarse, grid, pre), grid


SegPredict = Callable[[np.ndarray], np.ndarray]
"""(1, C, Z, Y, X) window image, each size a multiple of ``seg_divisor`` -> (1, classes, Z, Y,
X) class probabilities: ``seg.onnx`` at runtime, the torch net while training."""


def _argmax_labels(image: np.ndarray, predict: SegPredict, divisor: int) -> np.ndarray:
    shape = image.shape[1:]
    probabilities = predict(pad_to_divisor(image, divisor)[None])[0]
    z, y, x = shape
    return np.argmax(probabilities[:, :z, :y, :x], axis=0).astype(np.uint8)


def spine_window(labels: np.ndarray, side: int) -> tuple[slice, slice] | None:
    """The in-plane (y, x) square of ``side`` voxels centred on the segmented spine.

    None where the image is no wider than that already or nothing was segmented. The centre
    is the median of the foreground voxels, so a stray blob does not move it.
    """
    if labels.shape[1] <= side and labels.shape[2] <= side:
        return None
    cervical = (labels >= 1) & (labels <= len(VERTEBRAE))
    yx = np.argwhere(cervical.any(axis=0) if cervical.any() else (labels > 0).any(axis=0))
    if not len(yx):
        return None
    window = []
    for axis, centre in enumerate(np.median(yx, axis=0)):
        n = labels.shape[axis + 1]
        start = int(np.clip(round(float(centre) - side / 2), 0, max(0, n - side)))
        window.append(slice(start, min(n, start + side)))
    return window[0], window[1]


def segmentation_labels(image: np.ndarray, predict: SegPredict, pre: Preprocessing,
                        ) -> np.ndarray:
    """Arg-max class labels (z, y, x) of the unpadded window image (C, z, y, x).

    Shared by the runtime and by training's validation, so the Dice that picks a checkpoint
    is measured the way the model is served.
    """
    labels = _argmax_labels(image, predict, pre.seg_divisor)
    if pre.seg_field_of_view_mm is None:
        return labels
    side = int(-(-round(pre.seg_field_of_view_mm / pre.seg_spacing_mm) // pre.seg_divisor)
               * pre.seg_divisor)
    window = spine_window(labels, side)
    if window is None:
        return labels
    focused = np.zeros_like(labels)
    focused[:, window[0], window[1]] = _argmax_labels(image[:, :, window[0], window[1]],
                                                      predict, pre.seg_divisor)
    return focused


def clean_labels(labels: np.ndarray, classes: int) -> np.ndarray:
    """Keep, for each label 1..classes-1, only its largest 26-connected component."""
    out = np.zeros_like(labels)
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in range(1, classes):
        mask = labels == value
        if not mask.any():
            continue
        components, count = ndimage.label(mask, structure=structure)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            mask = components == int(np.argmax(sizes))
        out[mask] = value
    return out


def _key_slices(scores: np.ndarray, first_z: int, count: int) -> tuple[int, ...]:
    order = np.argsort(-scores, kind="stable")[:count]
    return tuple(int(first_z + i) for i in order)


@dataclass
class Segmentation:
    """What the segmentation stage hands the classifier (and the DICOM SEG)."""

    label_map: np.ndarray
    """(z, y, x) on the volume grid: 0 background, 1..7 C1..C7 in view."""
    in_view: list[tuple[int, tuple[int, int, int, int, int, int]]]
    """(label, voxel box on the volume grid, end-exclusive) of every level in view."""
    warnings: list[str]
    anatomy: AnatomyReport = field(default_factory=AnatomyReport)
    """The plausibility gate's answer on the levels in view (:mod:`.plausibility`)."""


def segment_volume(hu: np.ndarray, spacing: Sequence[float], seg: Stage, pre: Preprocessing,
                   durations: dict[str, float] | None = None,
                   superior: Sequence[float] | np.ndarray = (1.0, 0.0, 0.0)) -> Segmentation:
    """Stage 1 on one HU volume: the levels in view, their label map, the anatomy gate.

    Shared by :func:`run_pipeline` and by ``models.data``, which cuts classifier training
    crops from this very output so the classifier learns on the masks it is served.
    ``superior``: the head's direction in the volume's (z, y, x) grid
    (:func:`~service.inference.plausibility.superior_in_grid`; the default, z increasing
    towards the head, is how the phantoms and most axial series are sorted).
    """
    durations = durations if durations is not None else {}
    warnings: list[str] = []
    started = time.perf_counter()
    coarse_hu, grid = coarse_volume(hu, spacing, pre)
    image = multi_window(coarse_hu, pre.preprocess_windows())
    durations["preprocess"] = time.perf_counter() - started

    started = time.perf_counter()
    raw = segmentation_labels(image, lambda x: seg.run(x)[0], pre)
    del image
    coarse = clean_labels(raw, len(pre.seg_classes))
    coarse[coarse > len(VERTEBRAE)] = 0  # extra classes (thoracic) are context, not findings
    label_map = resample_to_original(coarse, grid.spacing, tuple(spacing), hu.shape, order=0)
    voxel_mm3 = float(np.prod(grid.spacing))
    counts = np.bincount(coarse.ravel(), minlength=len(VERTEBRAE) + 1)
    # Plausibility: a vertebra is bone. A segmented level without bone-density voxels (a
    # stray blob in soft tissue or water) is not in view, whatever the network says.
    bone = np.bincount(coarse.ravel(), weights=(coarse_hu >= pre.min_bone_hu).ravel(),
                       minlength=len(VERTEBRAE) + 1)
    coarse_boxes = ndimage.find_objects(coarse, max_label=len(VERTEBRAE))
    in_view: list[tuple[int, tuple[int, int, int, int, int, int]]] = []
    for index in range(len(VERTEBRAE)):
        label = index + 1
        box = coarse_boxes[index] if index < len(coarse_boxes) else None
        if box is None:
            continue
        if counts[label] * voxel_mm3 < pre.min_vertebra_volume_mm3:
            # Too small to be this vertebra: not in view, so not in the SEG either.
            label_map[label_map == label] = 0
            coarse[coarse == label] = 0
            continue
        if bone[label] * voxel_mm3 < pre.min_vertebra_volume_mm3 * pre.min_bone_fraction:
            warnings.append(f"{NOT_BONE}:{VERTEBRAE[index]}")
            label_map[label_map == label] = 0
            coarse[coarse == label] = 0
            continue
        cbox = (box[0].start, box[1].start, box[2].start, box[0].stop, box[1].stop,
                box[2].stop)
        bbox = grid.source_box(cbox)
        if cbox[0] == 0 or cbox[3] >= grid.shape[0]:
            warnings.append(f"{PARTIAL_VERTEBRA}:{VERTEBRAE[index]}")
        in_view.append((label, bbox))
    durations["segmentation"] = time.perf_counter() - started
    started = time.perf_counter()
    anatomy = assess(coarse, raw, coarse_hu, grid.spacing, superior)
    durations["plausibility"] = time.perf_counter() - started
    if any(f.code is AnatomyReason.LEVELS_OUT_OF_ORDER for f in anatomy.failures):
        warnings.append(OUT_OF_ORDER)
    return Segmentation(label_map=label_map, in_view=in_view, warnings=warnings,
                        anatomy=anatomy)


def run_pipeline(volume: Volume, runtime: ModelRuntime, settings: Settings, *,
                 load_seconds: float | None = None) -> Findings:
    """Run both model stages on a loaded volume and return the findings."""
    manifest = runtime.manifest
    pre = manifest.preprocessing
    durations: dict[str, float] = {}
    if load_seconds is not None:
        durations["load"] = load_seconds
    segmentation = segment_volume(volume.hu, volume.spacing, runtime.seg, pre, durations,
                                  superior=superior_in_grid(volume.affine))
    label_map, in_view = segmentation.label_map, segmentation.in_view
    warnings = list(segmentation.warnings)

    started = time.perf_counter()
    spec = pre.stack_spec()
    stacks, z_positions = [], []
    for label, bbox in in_view:
        stack, zs = vertebra_stack(volume.hu, label_map, label,
                                   vertebra_box(bbox, volume.spacing, spec), spec)
        stacks.append(stack)
        z_positions.append(zs)
    probs = np.zeros(len(in_view), dtype=np.float32)
    slice_scores = np.zeros((len(in_view), spec.slices), dtype=np.float32)
    for start in range(0, len(stacks), FRAC_BATCH):
        batch = np.stack(stacks[start:start + FRAC_BATCH])
        p, s = runtime.frac.run(batch)
        if pre.crop_flip_average:
            mirrored_p, mirrored_s = runtime.frac.run(np.ascontiguousarray(batch[..., ::-1]))
            p, s = (p + mirrored_p) / 2, (s + mirrored_s) / 2
        probs[start:start + len(batch)] = p.reshape(-1)
        slice_scores[start:start + len(batch)] = s
    durations["classification"] = time.perf_counter() - started

    vertebra_threshold = (settings.fracture_threshold if settings.fracture_threshold is not None
                          else manifest.thresholds.vertebra)
    patient_threshold = (settings.patient_threshold if settings.patient_threshold is not None
                         else manifest.thresholds.patient)
    anatomy = segmentation.anatomy
    column_reasons = tuple(f.code.value for f in anatomy.column_failures)
    found: dict[int, VertebraFinding] = {}
    for i, (label, bbox) in enumerate(in_view):
        name = VERTEBRAE[label - 1]
        z0, z1 = bbox[0], bbox[3] - 1
        per_slice = np.interp(np.arange(z0, z1 + 1), z_positions[i], slice_scores[i])
        probability = float(probs[i])
        vouched = anatomy.vouched(name)
        above = probability >= vertebra_threshold
        found[label] = VertebraFinding(
            vertebra=name, in_view=True, probability=probability,
            suspected=above and vouched, slice_range=(z0, z1), bbox=bbox,
            key_slices=_key_slices(per_slice, z0, KEY_SLICES),
            slice_scores=tuple(float(v) for v in per_slice),
            plausible=vouched,
            plausibility_reasons=column_reasons + tuple(
                f.code.value for f in anatomy.level_failures(name)),
            above_threshold=above)
    vertebrae = [found.get(i + 1) or VertebraFinding(vertebra=name, in_view=False,
                                                      probability=None, suspected=False)
                 for i, name in enumerate(VERTEBRAE)]
    if not in_view:
        warnings.append(NO_VERTEBRA_IN_VIEW)
    patient_probability = _aggregate(probs, manifest.patient_aggregation)
    vouched_probs = np.array([probs[i] for i, (label, _) in enumerate(in_view)
                              if found[label].plausible], dtype=np.float32)
    # The patient-level flag, like every flag, comes only from levels the gate vouched for.
    patient_suspected = (bool(len(vouched_probs))
                         and _aggregate(vouched_probs, manifest.patient_aggregation)
                         >= patient_threshold)
    model_patient_suspected = bool(in_view) and patient_probability >= patient_threshold
    if patient_suspected or any(v.suspected for v in vertebrae):
        result = AnalysisResult.FRACTURE_SUSPECTED
    elif anatomy.failures or not in_view:
        result = AnalysisResult.INCONCLUSIVE
    else:
        result = AnalysisResult.NO_FRACTURE_FOUND
    findings = Findings(
        series_instance_uid=volume.series_instance_uid,
        model_name=manifest.name,
        model_version=manifest.version,
        vertebrae=vertebrae,
        patient_probability=patient_probability,
        patient_suspected=patient_suspected,
        vertebra_threshold=float(vertebra_threshold),
        patient_threshold=float(patient_threshold),
        label_map=label_map,
        execution_provider=runtime.provider,
        stage_durations=durations,
        warnings=warnings,
        source_fingerprint=instances_fingerprint(volume.sop_instance_uids),
        result=result,
        anatomy=anatomy.as_dict(),
        model_patient_suspected=model_patient_suspected,
    )
    logger.info("series %s: %s, in view %s, suspected %s, gate %s, patient p=%.3f (%s), "
                "stages %s", volume.series_instance_uid, result.value, findings.in_view,
                findings.suspected_vertebrae, anatomy.reason_codes or "passed",
                patient_probability, runtime.provider,
                {k: round(v, 3) for k, v in durations.items()})
    return findings


def _aggregate(probabilities: np.ndarray, how: str) -> float:
    """Patient-level probability from per-vertebra ones (0 when there are none)."""
    if not len(probabilities):
        return 0.0
    if how == "noisy_or":
        return float(1.0 - np.prod(1.0 - probabilities.astype(np.float64)))
    return float(probabilities.max())


def analyze_paths(paths: Sequence[Path], settings: Settings,
                  runtime: ModelRuntime | None = None) -> tuple[Volume, Findings]:
    """Load a series from its files and analyse it (the worker's one call into inference).

    Raises ``service.imaging.qc.VolumeError`` for a series that cannot be loaded,
    ``ManifestError`` / ``ModelIntegrityError`` for an unusable model.
    """
    from service.imaging.volume import load_series

    runtime = runtime or get_runtime(settings)
    started = time.perf_counter()
    volume = load_series(paths, settings)
    load_seconds = time.perf_counter() - started
    return volume, run_pipeline(volume, runtime, settings, load_seconds=load_seconds)
