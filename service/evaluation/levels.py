"""Vertebral level identification against a reference read on real scans.

The model labels C1..C7 (label map values 1..7, see ``service.findings``). On a
real scan there is no mask to compare with, only the levels a reader identified
(``real_reference.json``: body centres and endplate centres in patient coordinates). This
module measures whether each predicted level sits where the reference says that level is.

Coordinates are DICOM patient coordinates (LPS, mm: x to the patient's left, y posterior,
z superior), obtained from a label map on the volume grid through ``Volume.affine``.

Centres of a predicted level (:func:`predicted_centres`):

``mass``
    the centre of mass of all its voxels. The model's mask holds the whole vertebra, so this
    point lies behind the body, near the spinal canal (about 10-20 mm posterior to the body
    centre on a cervical vertebra).
``body``
    the centre of its anterior part: the voxels within the front :data:`BODY_FRACTION` of the
    mask's anterior-posterior extent (1st to 99th percentile of y), i.e. the vertebral body
    with little of the pedicles. It assumes a patient lying roughly square to the scanner
    (y = anterior-posterior), which holds for supine neck and chest CT. C1 has no body: its
    ``body`` centre is its centre of mass, like the reference C1 centre (centre of the ring).

Matching (:func:`match_levels`) uses the ``body`` centre by default. For every reference
level that the model could name (C1..C7):

``exact``       a predicted level of that name exists and its centre is nearer to this
                reference level's centre than to any other reference level's;
``off_by_one``  it exists but is nearest to a neighbouring reference level;
``worse``       it exists but is nearest to a level two or more away, or it is near no
                level: further from its nearest reference centre than that reference
                level is from its own nearest neighbour (e.g. a "C1" inside the skull,
                although the reference C1 is the nearest level): ``nearest_reference`` is
                then None;
``missing``     the model did not label that level.

Reference levels the model cannot name (T1..., L...) take part only as "other levels": a
predicted C7 whose centre is nearest to T1 is off by one. The centre error is the distance
in mm between the predicted centre and this reference level's centre. Pooled figures:
fraction exact, median centre error (over levels that were predicted).

numpy only (no torch, no model runtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from service.findings import VERTEBRAE

if TYPE_CHECKING:
    from service.findings import Findings
    from service.imaging.volume import Volume

logger = logging.getLogger(__name__)

REFERENCE_RESOURCE = "real_reference.json"
"""The packaged reference (``service/evaluation/real_reference.json``)."""
SPINE_ORDER: tuple[str, ...] = (
    VERTEBRAE + tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6)))
"""Level names from the skull down; the index difference of two names is their distance."""
BODY_FRACTION = 0.35
"""Front fraction of a level's anterior-posterior extent taken as its body."""
MIN_BODY_VOXELS = 20
"""Below this many voxels in the front part, the body centre falls back to the centre of
mass."""

EXACT, OFF_BY_ONE, WORSE, MISSING = "exact", "off_by_one", "worse", "missing"
OUTCOMES: tuple[str, ...] = (EXACT, OFF_BY_ONE, WORSE, MISSING)


class LevelReferenceError(LookupError):
    """No reference entry for a volume, or one that does not describe these pixels."""


# --------------------------------------------------------------------------- reference


def pixel_sha256(hu: np.ndarray) -> str:
    """The reference's pixel hash: sha256 of the sorted volume's HU values as little-endian
    int16, C order (z, y, x), no header (``Volume.hu`` from ``load_series``; a float volume
    is rounded to the nearest integer first)."""
    values = np.asarray(hu)
    if values.dtype != np.int16:
        values = np.rint(values).astype(np.int16)
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<i2").tobytes()).hexdigest()


def load_reference(path: Path | None = None) -> dict[str, Any]:
    """The reference document (the packaged one unless ``path`` names another)."""
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("service.evaluation").joinpath(REFERENCE_RESOURCE).read_text(
            encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


def reference_for(volume: Volume, reference: dict[str, Any] | None = None, *,
                  verify_pixels: bool = True) -> dict[str, Any]:
    """The reference entry of this volume, found by Series Instance UID.

    Raises :class:`LevelReferenceError` when the series has no entry, or when its pixels do not
    hash to the entry's ``pixel_sha256`` (a different or altered series under the same UID:
    the levels read on one scan say nothing about another).
    """
    document = reference if reference is not None else load_reference()
    scans = document.get("scans", {})
    entry = scans.get(volume.series_instance_uid)
    if entry is None:
        raise LevelReferenceError(
            f"series {volume.series_instance_uid} has no entry in the level reference "
            f"(entries: {', '.join(e.get('name', uid) for uid, e in scans.items()) or 'none'})")
    if verify_pixels:
        digest = pixel_sha256(volume.hu)
        if digest != entry["pixel_sha256"]:
            raise LevelReferenceError(
                f"series {volume.series_instance_uid} ({entry.get('name')}): pixel data "
                f"sha256 {digest[:16]}... does not match the reference's "
                f"{str(entry['pixel_sha256'])[:16]}...; the levels were read on other pixels")
    return dict(entry)


# --------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class PredictedLevel:
    name: str
    voxels: int
    mass_lps: tuple[float, float, float]
    """Centre of mass of all the level's voxels (LPS mm)."""
    body_lps: tuple[float, float, float]
    """Centre of the level's anterior part (LPS mm); see the module docstring."""

    def centre(self, kind: str) -> np.ndarray:
        if kind not in ("body", "mass"):
            raise ValueError(f"centre kind must be 'body' or 'mass', not {kind!r}")
        return np.asarray(self.body_lps if kind == "body" else self.mass_lps, dtype=np.float64)


def predicted_centres(label_map: np.ndarray, affine: np.ndarray,
                      names: tuple[str, ...] = VERTEBRAE) -> dict[str, PredictedLevel]:
    """Centres of each labelled level of a (z, y, x) label map (value ``i + 1`` is
    ``names[i]``; 0 background), mapped to LPS mm through the 4x4 ``affine`` of
    (z, y, x, 1) voxel indices."""
    labels = np.asarray(label_map)
    out: dict[str, PredictedLevel] = {}
    for value, name in enumerate(names, start=1):
        index = np.argwhere(labels == value)
        if index.size == 0:
            continue
        points = index.astype(np.float64) @ affine[:3, :3].T + affine[:3, 3]
        mass = points.mean(axis=0)
        body = mass
        if name != "C1":
            y = points[:, 1]
            front, back = np.percentile(y, [1.0, 99.0])
            part = points[y <= front + BODY_FRACTION * (back - front)]
            if len(part) >= MIN_BODY_VOXELS:
                body = part.mean(axis=0)
        out[name] = PredictedLevel(
            name=name, voxels=int(len(points)),
            mass_lps=(float(mass[0]), float(mass[1]), float(mass[2])),
            body_lps=(float(body[0]), float(body[1]), float(body[2])))
    return out


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class LevelResult:
    name: str
    outcome: str
    """One of :data:`OUTCOMES`."""
    nearest_reference: str | None
    """The reference level nearest to the predicted centre (None when missing, or when the
    centre is near no reference level)."""
    centre_error_mm: float | None
    """Distance from the predicted centre to this level's reference centre."""
    reference_centre_lps: tuple[float, float, float]
    predicted_centre_lps: tuple[float, float, float] | None
    cut: str | None = None
    """The reference says the scan cuts this level ("top" / "bottom")."""


@dataclass
class LevelReport:
    """Level identification of one scan against its reference entry."""

    scan: str
    series_instance_uid: str
    centre: str
    """Which predicted centre was matched ("body" or "mass")."""
    levels: list[LevelResult]
    predicted: dict[str, PredictedLevel]
    extra: dict[str, str | None] = field(default_factory=dict)
    """Predicted levels the reference does not list (e.g. C1 on a scan that starts at C3),
    with the reference level nearest to each (None: near none of them)."""

    @property
    def counts(self) -> dict[str, int]:
        return {k: sum(1 for r in self.levels if r.outcome == k) for k in OUTCOMES}

    @property
    def fraction_exact(self) -> float | None:
        return (self.counts[EXACT] / len(self.levels)) if self.levels else None

    @property
    def median_centre_error_mm(self) -> float | None:
        errors = [r.centre_error_mm for r in self.levels if r.centre_error_mm is not None]
        return float(np.median(errors)) if errors else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "scan": self.scan,
            "series_instance_uid": self.series_instance_uid,
            "centre": self.centre,
            "counts": self.counts,
            "fraction_exact": self.fraction_exact,
            "median_centre_error_mm": self.median_centre_error_mm,
            "levels": [asdict(r) for r in self.levels],
            "predicted": {k: asdict(v) for k, v in self.predicted.items()},
            "extra": dict(self.extra),
        }


def _order(name: str) -> int:
    try:
        return SPINE_ORDER.index(name)
    except ValueError as exc:
        raise ValueError(f"unknown level name {name!r}") from exc


def match_levels(predicted: dict[str, PredictedLevel], reference_levels: list[dict[str, Any]],
                 *, centre: str = "body",
                 ) -> tuple[list[LevelResult], dict[str, str | None]]:
    """Score every reference level the model can name; also return the predicted levels that
    the reference does not list, each with its nearest reference level."""
    if not reference_levels:
        raise ValueError("the reference entry lists no levels")
    ref_names = [str(lv["name"]) for lv in reference_levels]
    ref_centres = np.array([lv["centre_lps"] for lv in reference_levels], dtype=np.float64)
    between = np.linalg.norm(ref_centres[:, None, :] - ref_centres[None, :, :], axis=2)
    np.fill_diagonal(between, np.inf)
    # How far from a reference centre a point may lie and still be "at" that level.
    reach = between.min(axis=1) if len(ref_centres) > 1 else np.full(1, np.inf)

    def nearest(point: np.ndarray) -> str | None:
        distances = np.linalg.norm(ref_centres - point, axis=1)
        k = int(np.argmin(distances))
        return ref_names[k] if distances[k] <= reach[k] else None

    results: list[LevelResult] = []
    for lv, ref_centre in zip(reference_levels, ref_centres, strict=True):
        name = str(lv["name"])
        if name not in VERTEBRAE:
            continue
        ref_tuple = (float(ref_centre[0]), float(ref_centre[1]), float(ref_centre[2]))
        guess = predicted.get(name)
        if guess is None:
            results.append(LevelResult(name, MISSING, None, None, ref_tuple, None,
                                       lv.get("cut")))
            continue
        point = guess.centre(centre)
        closest = nearest(point)
        distance = abs(_order(closest) - _order(name)) if closest is not None else None
        outcome = (WORSE if distance is None or distance > 1
                   else EXACT if distance == 0 else OFF_BY_ONE)
        results.append(LevelResult(
            name, outcome, closest, float(np.linalg.norm(point - ref_centre)), ref_tuple,
            (float(point[0]), float(point[1]), float(point[2])), lv.get("cut")))
    extra = {name: nearest(p.centre(centre)) for name, p in predicted.items()
             if name not in ref_names}
    return results, extra


def evaluate_levels(volume: Volume, findings: Findings, entry: dict[str, Any], *,
                    centre: str = "body") -> LevelReport:
    """Level identification of one analysed series against its reference ``entry``
    (from :func:`reference_for`). A findings without a label map counts every level as
    missing."""
    if findings.label_map is not None and findings.label_map.shape != volume.shape:
        raise ValueError(f"label map {findings.label_map.shape} is not on the volume grid "
                         f"{volume.shape}")
    predicted = ({} if findings.label_map is None
                 else predicted_centres(findings.label_map, volume.affine))
    levels, extra = match_levels(predicted, list(entry["levels"]), centre=centre)
    return LevelReport(scan=str(entry.get("name", volume.series_instance_uid)),
                       series_instance_uid=volume.series_instance_uid, centre=centre,
                       levels=levels, predicted=predicted, extra=extra)


def pool(reports: list[LevelReport]) -> dict[str, Any]:
    """Pooled counts, fraction exact and median centre error over several scans."""
    results = [r for report in reports for r in report.levels]
    counts = {k: sum(1 for r in results if r.outcome == k) for k in OUTCOMES}
    errors = [r.centre_error_mm for r in results if r.centre_error_mm is not None]
    return {
        "scans": len(reports),
        "levels": len(results),
        "counts": counts,
        "fraction_exact": counts[EXACT] / len(results) if results else None,
        "median_centre_error_mm": float(np.median(errors)) if errors else None,
    }
