"""Readers for the RSNA 2022 Cervical Spine Fracture Detection layout (torch-free).

The layout, as published by the competition and as ``service.synthetic`` writes it::

    DATASET_DIR/
      train.csv                    StudyInstanceUID, patient_overall, C1..C7 (0/1)
      train_bounding_boxes.csv     StudyInstanceUID, x, y, width, height, slice_number (optional)
      train_images/<StudyUID>/<slice_number>.dcm
      segmentations/<StudyUID>.nii[.gz]   (optional; a subset of studies in the real data)

Segmentation labels: 1..7 = C1..C7, 8..19 = T1..T12, 0 background.

The competition's NIfTI files are not stored in the DICOM slice order (the voxel axes are
permuted and flipped relative to the ``(z, y, x)`` array of the sorted series). We never
guess that permutation: :func:`segmentation_on_volume` maps each NIfTI voxel through the NIfTI
header (voxel -> RAS mm), RAS -> LPS, and the inverse of the volume's affine
(LPS mm -> (z, y, x) index). When that map is a signed permutation on the same grid (the usual
case) the labels are moved exactly by transposes and flips; otherwise they are resampled with
nearest-neighbour interpolation.

Both ``models`` (training) and ``service.evaluation`` (``triage evaluate``) read data through
this module, so a site trains and evaluates on the same view of its data.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.findings import VERTEBRAE

logger = logging.getLogger(__name__)

LABELS_CSV = "train.csv"
BOXES_CSV = "train_bounding_boxes.csv"
LESIONS_CSV = "synthetic_lesions.csv"
"""Not part of the RSNA layout: the synthetic writer's list of every fracture and mimic."""
IMAGES_DIR = "train_images"
SEGMENTATIONS_DIR = "segmentations"
THORACIC_LABEL_MIN = 8
"""RSNA label values 8..19 are T1..T12."""

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class LayoutError(ValueError):
    """The directory does not follow the RSNA layout, or a file in it is inconsistent."""


@dataclass(frozen=True)
class StudyLabels:
    study_instance_uid: str
    patient_overall: int
    vertebrae: tuple[int, ...]
    """0/1 per C1..C7."""

    def as_vector(self) -> np.ndarray:
        """(8,) float: patient_overall then C1..C7 (the RSNA metric's column order)."""
        return np.array([self.patient_overall, *self.vertebrae], dtype=float)


@dataclass(frozen=True)
class SliceBox:
    """A fracture box drawn on one axial slice, in pixels of that DICOM image."""

    slice_number: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Lesion:
    """A ground-truth lesion of a synthetic study: a fracture or a mimic (not a fracture)."""

    kind: str
    """"fracture" or "mimic"."""
    type: str
    vertebra: str | None


@dataclass
class RsnaStudy:
    study_instance_uid: str
    image_dir: Path
    labels: StudyLabels | None
    segmentation: Path | None
    boxes: list[SliceBox] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)
    """Extra columns of train.csv, if any."""
    lesions: list[Lesion] = field(default_factory=list)
    """Synthetic ground truth (empty for real data)."""

    def dicom_paths(self) -> list[Path]:
        return study_dicom_paths(self.image_dir)


def _as_flag(value: str, column: str, uid: str) -> int:
    try:
        number = int(float(value))
    except ValueError as exc:
        raise LayoutError(f"{LABELS_CSV}: {column}={value!r} for {uid} is not 0/1") from exc
    if number not in (0, 1):
        raise LayoutError(f"{LABELS_CSV}: {column}={value!r} for {uid} is not 0/1")
    return number


def read_labels(path: Path) -> tuple[dict[str, StudyLabels], dict[str, dict[str, str]]]:
    """train.csv -> labels per study UID, and the extra (non-label) columns per study."""
    labels: dict[str, StudyLabels] = {}
    extras: dict[str, dict[str, str]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        needed = {"StudyInstanceUID", "patient_overall", *VERTEBRAE}
        missing = needed - set(reader.fieldnames or [])
        if missing:
            raise LayoutError(f"{path}: missing columns {sorted(missing)}")
        for row in reader:
            uid = row["StudyInstanceUID"].strip()
            labels[uid] = StudyLabels(
                study_instance_uid=uid,
                patient_overall=_as_flag(row["patient_overall"], "patient_overall", uid),
                vertebrae=tuple(_as_flag(row[v], v, uid) for v in VERTEBRAE),
            )
            extras[uid] = {k: v for k, v in row.items() if k not in needed and k is not None}
    return labels, extras


def read_boxes(path: Path) -> dict[str, list[SliceBox]]:
    boxes: dict[str, list[SliceBox]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            boxes.setdefault(row["StudyInstanceUID"].strip(), []).append(SliceBox(
                slice_number=int(float(row["slice_number"])), x=float(row["x"]),
                y=float(row["y"]), width=float(row["width"]), height=float(row["height"])))
    return boxes


def read_lesions(path: Path) -> dict[str, list[Lesion]]:
    lesions: dict[str, list[Lesion]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            lesions.setdefault(row["StudyInstanceUID"].strip(), []).append(Lesion(
                kind=row["kind"].strip(), type=row["type"].strip(),
                vertebra=(row.get("vertebra") or "").strip() or None))
    return lesions


def study_dicom_paths(image_dir: Path) -> list[Path]:
    """The study's DICOM files, ordered by the slice number in their names."""
    paths = [p for p in Path(image_dir).iterdir() if p.is_file() and p.suffix == ".dcm"]

    def key(p: Path) -> tuple[int, str]:
        return (int(p.stem), p.name) if p.stem.isdigit() else (1 << 30, p.name)

    return sorted(paths, key=key)


class RsnaDataset:
    """One RSNA-layout directory. Studies without images are skipped with a warning."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        labels_path = self.root / LABELS_CSV
        if not labels_path.is_file():
            raise LayoutError(f"{self.root}: no {LABELS_CSV} (not an RSNA-layout directory)")
        self.labels, self.extras = read_labels(labels_path)
        boxes_path = self.root / BOXES_CSV
        self.boxes = read_boxes(boxes_path) if boxes_path.is_file() else {}
        lesions_path = self.root / LESIONS_CSV
        self.lesions = read_lesions(lesions_path) if lesions_path.is_file() else {}

    def segmentation_path(self, uid: str) -> Path | None:
        for suffix in (".nii", ".nii.gz"):
            path = self.root / SEGMENTATIONS_DIR / f"{uid}{suffix}"
            if path.is_file():
                return path
        return None

    def study(self, uid: str) -> RsnaStudy:
        return RsnaStudy(
            study_instance_uid=uid,
            image_dir=self.root / IMAGES_DIR / uid,
            labels=self.labels.get(uid),
            segmentation=self.segmentation_path(uid),
            boxes=list(self.boxes.get(uid, [])),
            extra=dict(self.extras.get(uid, {})),
            lesions=list(self.lesions.get(uid, [])),
        )

    def uids(self) -> list[str]:
        return sorted(self.labels)

    def __iter__(self) -> Iterator[RsnaStudy]:
        for uid in self.uids():
            study = self.study(uid)
            if not study.image_dir.is_dir():
                logger.warning("study %s listed in %s has no image directory; skipped",
                               uid, LABELS_CSV)
                continue
            yield study

    def __len__(self) -> int:
        return len(self.labels)


def nifti_to_volume_index(nifti_affine: np.ndarray, volume_affine: np.ndarray) -> np.ndarray:
    """4x4 map from a NIfTI voxel index (i, j, k, 1) to a volume index (z, y, x, 1).

    ``nifti_affine`` is the NIfTI header's voxel -> RAS mm transform (``img.affine``);
    ``volume_affine`` is ``Volume.affine``, (z, y, x, 1) -> LPS mm.
    """
    return np.linalg.inv(np.asarray(volume_affine, float)) @ LPS_FROM_RAS @ np.asarray(
        nifti_affine, float)


def _signed_permutation(matrix: np.ndarray, tol: float = 1e-3) -> list[tuple[int, int]] | None:
    """For a 3x3 matrix that is a signed permutation, (source axis, sign) per target axis."""
    out: list[tuple[int, int]] = []
    used: set[int] = set()
    for row in matrix:
        j = int(np.argmax(np.abs(row)))
        if abs(abs(row[j]) - 1.0) > tol or np.sum(np.abs(row) > tol) != 1 or j in used:
            return None
        used.add(j)
        out.append((j, 1 if row[j] > 0 else -1))
    return out


def map_labels_to_volume(labels: np.ndarray, nifti_affine: np.ndarray,
                         volume_affine: np.ndarray, volume_shape: tuple[int, int, int],
                         ) -> np.ndarray:
    """Label array in NIfTI voxel order -> uint8 (z, y, x) on the volume grid.

    Exact (transpose + flip + integer shift) when the grids coincide up to axis order and
    direction; nearest-neighbour resampling otherwise. Voxels outside the NIfTI are 0.
    Raises :class:`LayoutError` when the two do not overlap at all (wrong file, or a header
    that does not describe the same patient space).
    """
    data = np.asarray(labels)
    if data.ndim != 3:
        raise LayoutError(f"segmentation must be 3D, got shape {data.shape}")
    m = nifti_to_volume_index(nifti_affine, volume_affine)
    perm = _signed_permutation(m[:3, :3])
    shift = m[:3, 3]
    out = np.zeros(volume_shape, dtype=np.uint8)
    if perm is not None and np.allclose(shift, np.round(shift), atol=1e-2):
        # target[t] = sign_t * source[axis_t] + shift_t
        moved = np.transpose(data, [axis for axis, _ in perm])
        flips = tuple(t for t, (_, sign) in enumerate(perm) if sign < 0)
        if flips:
            moved = np.flip(moved, axis=flips)
        start = []
        for t, (axis, sign) in enumerate(perm):
            n = data.shape[axis]
            # Index 0 of the flipped axis is source index n-1, at target sign*(n-1)+shift.
            start.append(int(round(shift[t] + (-(n - 1) if sign < 0 else 0))))
        src_slices, dst_slices = [], []
        for t in range(3):
            lo, hi = start[t], start[t] + moved.shape[t]
            dlo, dhi = max(lo, 0), min(hi, volume_shape[t])
            if dlo >= dhi:
                raise LayoutError("segmentation does not overlap the series (check the NIfTI "
                                  "header and that it belongs to this study)")
            src_slices.append(slice(dlo - lo, dhi - lo))
            dst_slices.append(slice(dlo, dhi))
        out[tuple(dst_slices)] = moved[tuple(src_slices)]
        if moved.shape != tuple(volume_shape) or any(start):
            logger.info("segmentation grid %s placed at offset %s in volume %s", moved.shape,
                        start, volume_shape)
        return out
    from scipy import ndimage

    inverse = np.linalg.inv(m)
    resampled = ndimage.affine_transform(data.astype(np.uint8), inverse[:3, :3],
                                         offset=inverse[:3, 3], output_shape=volume_shape,
                                         order=0, mode="constant", cval=0)
    if not resampled.any() and data.any():
        raise LayoutError("segmentation does not overlap the series (check the NIfTI header)")
    logger.info("segmentation resampled (grids differ beyond axis order)")
    return resampled.astype(np.uint8)


def segmentation_on_volume(path: Path, volume_affine: np.ndarray,
                           volume_shape: tuple[int, int, int]) -> np.ndarray:
    """Read a NIfTI segmentation and map it onto the volume grid (see module docstring)."""
    import nibabel as nib

    image = nib.load(str(path))
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise LayoutError(f"{path}: not a NIfTI image ({type(image).__name__})")
    data = np.asarray(image.dataobj)
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    labels = np.rint(data).astype(np.int32)
    if labels.min() < 0 or labels.max() > 255:
        raise LayoutError(f"{path}: label values outside 0..255")
    return map_labels_to_volume(labels.astype(np.uint8), image.affine, volume_affine,
                                volume_shape)


def cervical_and_thoracic(labels: np.ndarray) -> np.ndarray:
    """RSNA labels -> model classes: 0 background, 1..7 C1..C7, 8 any thoracic level."""
    out = np.asarray(labels).astype(np.uint8).copy()
    out[out >= THORACIC_LABEL_MIN] = THORACIC_LABEL_MIN
    return out


def slice_number_to_z(paths: list[Path], sop_instance_uids: list[str]) -> dict[int, int]:
    """Map the RSNA slice numbers (file names) to z indices of the sorted volume.

    Bounding boxes are given per slice number; the volume is sorted along the slice normal,
    which may run in either direction relative to the numbering.
    """
    from pydicom import dcmread

    z_of_uid = {uid: z for z, uid in enumerate(sop_instance_uids)}
    out: dict[int, int] = {}
    for path in paths:
        if not path.stem.isdigit():
            continue
        uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                  .SOPInstanceUID)
        if uid in z_of_uid:
            out[int(path.stem)] = z_of_uid[uid]
    return out
