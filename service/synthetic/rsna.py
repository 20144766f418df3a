"""Write phantoms in the layout of the RSNA 2022 Cervical Spine Fracture Detection data.

Layout under ``out_dir`` (the same files the competition distributed, so training code reads
synthetic and real data the same way)::

    train.csv                    StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7
    train_bounding_boxes.csv     StudyInstanceUID,x,y,width,height,slice_number
    train_images/<StudyInstanceUID>/<InstanceNumber>.dcm
    segmentations/<StudyInstanceUID>.nii
    synthetic_lesions.csv        (ours, not RSNA's) every fracture and mimic with its box

``slice_number`` in the bounding boxes is the InstanceNumber (= the file name) of the slice;
``x, y`` are the column and row of the box's top-left pixel, ``width, height`` in pixels.

Segmentations and the competition's orientation quirk, reproduced exactly:

* The DICOM files are numbered head first: ``1.dcm`` is the most superior slice (as in most
  RSNA studies; ``instance_order='feet_first'`` gives the reversed kind).
* The NIfTI array is stored as ``nifti[i, j, k]`` with ``i`` = DICOM column (towards the
  patient's left), ``j`` = *reversed* DICOM row (towards anterior), ``k`` = slice from
  inferior to superior. So for a head-first study, the array aligned with the DICOM files
  sorted by InstanceNumber is the well-known competition recipe
  ``seg = nib.load(p).get_fdata()[:, ::-1, ::-1].transpose(2, 1, 0)``
  (``seg[n - 1]`` belongs to ``n.dcm``); for a feet-first study it is
  ``[:, ::-1].transpose(2, 1, 0)``.
* The NIfTI header is *correct*: qform and sform (code 1, scanner) hold the affine from
  ``(i, j, k)`` to RAS mm, ``[[-dx, 0, 0, -x0], [0, dy, 0, -(y0 + (rows - 1) dy)],
  [0, 0, dz, z0], [0, 0, 0, 1]]`` where ``(x0, y0, z0)`` is the LPS ImagePositionPatient of
  the most inferior slice. ``nib.aff2axcodes`` gives ('L', 'A', 'S'), and mapping any voxel
  through the header lands on the LPS position (x, y negated) of the same DICOM pixel.
* Labels: uint8, 0 background, 1-7 = C1-C7, 8+ = T1, T2, T3.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from service.synthetic.dicom_writer import (
    WriterOptions,
    instance_number_of,
    study_uid,
    write_series,
)
from service.synthetic.options import VERTEBRA_NAMES, PhantomOptions
from service.synthetic.phantom import Phantom, generate_phantom

logger = logging.getLogger(__name__)

TRAIN_COLUMNS = ["StudyInstanceUID", "patient_overall", *VERTEBRA_NAMES]
BOX_COLUMNS = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
LESION_COLUMNS = ["StudyInstanceUID", "kind", "type", "vertebra", "z0", "y0", "x0", "z1", "y1",
                  "x1", "first_slice_number", "last_slice_number"]


def nifti_affine(phantom: Phantom) -> np.ndarray:
    """RAS affine of the competition-oriented segmentation array (see module docstring)."""
    dz, dy, dx = phantom.spacing
    x0, y0, z0 = phantom.origin
    ny = phantom.shape[1]
    return np.array([[-dx, 0.0, 0.0, -x0],
                     [0.0, dy, 0.0, -(y0 + (ny - 1) * dy)],
                     [0.0, 0.0, dz, z0],
                     [0.0, 0.0, 0.0, 1.0]])


def nifti_array(phantom: Phantom) -> np.ndarray:
    """``labels`` (z ascending, y, x) reoriented to the competition's (i, j, k) storage."""
    return np.ascontiguousarray(phantom.labels[:, ::-1, :].transpose(2, 1, 0))


def write_segmentation(phantom: Phantom, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(nifti_array(phantom).astype(np.uint8), nifti_affine(phantom))
    img.set_qform(nifti_affine(phantom), code=1)
    img.set_sform(nifti_affine(phantom), code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def slice_boxes(phantom: Phantom, options: WriterOptions) -> list[tuple[int, int, int, int, int]]:
    """(slice_number, x, y, width, height) of every fracture, one row per slice, from the
    fracture's per-slice extent (or its 3-D box when no per-slice extent is recorded)."""
    rows = []
    for f in phantom.fractures:
        per_slice = f.slice_boxes or tuple(
            (z, f.bbox[1], f.bbox[2], f.bbox[4], f.bbox[5]) for z in range(f.bbox[0], f.bbox[3]))
        for z, y0, x0, y1, x1 in per_slice:
            rows.append((instance_number_of(phantom, z, options), x0, y0, x1 - x0, y1 - y0))
    return sorted(rows)


@dataclass
class RsnaIndex:
    out_dir: Path
    studies: list[str] = field(default_factory=list)
    fractured: int = 0


def write_rsna_layout(out_dir: Path | str, cases: Iterable[PhantomOptions | Phantom], *,
                      writer_options: WriterOptions | None = None,
                      with_segmentation: bool = True, with_boxes: bool = True) -> RsnaIndex:
    """Generate (when given options) and write each case; returns what was written.

    Phantoms are generated one at a time and dropped after writing, so hundreds of studies
    fit in memory. The CSV files are rewritten as a whole at the end (append-safe
    re-runs: existing rows of other studies are kept).
    """
    out = Path(out_dir)
    (out / "train_images").mkdir(parents=True, exist_ok=True)
    (out / "segmentations").mkdir(exist_ok=True)
    options = writer_options or WriterOptions()
    options = replace(options, file_naming="instance", shuffle=False, duplicates=0)
    train_rows: dict[str, list[object]] = _read_rows(out / "train.csv")
    box_rows: dict[str, list[list[object]]] = _read_grouped(out / "train_bounding_boxes.csv")
    lesion_rows: dict[str, list[list[object]]] = _read_grouped(out / "synthetic_lesions.csv")
    index = RsnaIndex(out)
    for case in cases:
        phantom = case if isinstance(case, Phantom) else generate_phantom(case)
        uid = study_uid(phantom, options)
        series_dir = out / "train_images" / uid
        if series_dir.exists():
            for old in series_dir.glob("*.dcm"):
                old.unlink()
        write_series(phantom, series_dir, options)
        train_rows[uid] = [uid, int(phantom.patient_fractured),
                           *[int(phantom.vertebra_fractured[v]) for v in VERTEBRA_NAMES]]
        if with_segmentation:
            write_segmentation(phantom, out / "segmentations" / f"{uid}.nii")
        box_rows[uid] = [[uid, x, y, w, h, n] for n, x, y, w, h in slice_boxes(phantom, options)] \
            if with_boxes else []
        lesions: list[list[object]] = []
        for kind, items in (("fracture", phantom.fractures), ("mimic", phantom.mimics)):
            for item in items:
                b = item.bbox
                numbers = sorted(instance_number_of(phantom, z, options) for z in (b[0], b[3] - 1))
                lesions.append([uid, kind, item.type.value, item.vertebra or "", *b, *numbers])
        lesion_rows[uid] = lesions
        index.studies.append(uid)
        index.fractured += int(phantom.patient_fractured)
        logger.info("rsna layout: wrote study %s (fractured=%s)", uid[-12:],
                    phantom.patient_fractured)
    _write_csv(out / "train.csv", TRAIN_COLUMNS, list(train_rows.values()))
    _write_csv(out / "train_bounding_boxes.csv", BOX_COLUMNS,
               [r for rows in box_rows.values() for r in rows])
    _write_csv(out / "synthetic_lesions.csv", LESION_COLUMNS,
               [r for rows in lesion_rows.values() for r in rows])
    return index


def _read_rows(path: Path) -> dict[str, list[object]]:
    if not path.exists():
        return {}
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        return {row[0]: list(row) for row in reader if row}


def _read_grouped(path: Path) -> dict[str, list[list[object]]]:
    out: dict[str, list[list[object]]] = {}
    if not path.exists():
        return out
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader, None)
        for row in reader:
            if row:
                out.setdefault(row[0], []).append(list(row))
    return out


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)
