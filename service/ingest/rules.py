"""Qualification: is a complete series an analyzable cervical-spine CT, and if several in a
study are, which one is analyzed.

Every decision carries a stable :class:`SeriesReason` (shown on the dashboard and counted in
turnaround statistics) and a human sentence. Geometry is read in the DICOM patient coordinate
system (LPS, millimetres): the slice normal is the cross product of the row and column
direction cosines of Image Orientation (Patient), and a slice's position along the stack is
the dot product of its Image Position (Patient) with that normal.

The rules themselves (keywords, tolerances, SOP classes, bone kernels) live in a YAML file:
the packaged ``rules.yaml`` unless ``TRIAGE_RULES_FILE`` names another.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml
from pydicom.dataset import Dataset

from service.config import Settings
from service.imaging.geometry import slice_normal
from service.ingest.header import number, text
from service.outcomes import SeriesReason

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuleSet:
    modalities: frozenset[str]
    sop_classes: frozenset[str]
    keyword_fields: tuple[str, ...]
    cervical_keywords: tuple[str, ...]
    exclude_keywords: tuple[str, ...]
    skip_derived: bool
    axial_tolerance_deg: float
    max_gantry_tilt_deg: float
    orientation_consistency_deg: float
    max_gap_factor: float
    max_slice_thickness_mm: float
    min_slices: int
    bone_kernel_patterns: tuple[re.Pattern[str], ...]
    source: str = "packaged"
    analyze_undescribed: bool = True
    """A series with every keyword field empty (many planning and older scanners' series) is
    analyzed and the anatomy decides, rather than refused for want of a word: the sender
    routed it to a cervical-spine service, and a missing header is not a missing neck."""
    partial_coverage_keywords: tuple[str, ...] = ()
    """Descriptions of fields of view that often hold part of the cervical spine (chest,
    trauma pan-scan, head-and-neck): such a series qualifies, and the anatomy the model finds
    decides (out of scope: ``NO_CERVICAL_SPINE`` / ``TOO_LITTLE_CERVICAL_SPINE``; implausible
    levels: INCONCLUSIVE), instead of a header word refusing it."""

    @classmethod
    def from_mapping(cls, data: dict[str, Any], settings: Settings,
                     source: str = "packaged") -> RuleSet:
        def words(key: str) -> tuple[str, ...]:
            return tuple(_normalise(str(v)) for v in data.get(key) or [])

        return cls(
            modalities=frozenset(str(m).upper() for m in data.get("modalities") or ["CT"]),
            sop_classes=frozenset(str(u) for u in data.get("sop_classes") or []),
            keyword_fields=tuple(str(f) for f in data.get("keyword_fields") or []),
            cervical_keywords=words("cervical_keywords"),
            exclude_keywords=words("exclude_keywords"),
            skip_derived=bool(data.get("skip_derived", True)),
            axial_tolerance_deg=float(data.get("axial_tolerance_deg", 10.0)),
            max_gantry_tilt_deg=float(data.get("max_gantry_tilt_deg", 0.5)),
            orientation_consistency_deg=float(data.get("orientation_consistency_deg", 1.0)),
            max_gap_factor=float(data.get("max_gap_factor", 1.6)),
            max_slice_thickness_mm=float(data.get("max_slice_thickness_mm",
                                                  settings.max_slice_thickness_mm)),
            min_slices=int(data.get("min_slices", settings.min_slices)),
            bone_kernel_patterns=tuple(re.compile(str(p), re.IGNORECASE)
                                       for p in data.get("bone_kernel_patterns") or []),
            source=source,
            partial_coverage_keywords=words("partial_coverage_keywords"),
            analyze_undescribed=bool(data.get("analyze_undescribed", True)),
        )


def load_rules(settings: Settings) -> RuleSet:
    """The rules in force: ``settings.rules_file`` or the packaged ``rules.yaml``."""
    if settings.rules_file is not None:
        raw = settings.rules_file.read_text(encoding="utf-8")
        source = str(settings.rules_file)
    else:
        raw = resources.files("service.ingest").joinpath("rules.yaml").read_text("utf-8")
        source = "packaged"
    data = yaml.safe_load(raw) or {}
    if not isinstance(data, dict):
        raise ValueError(f"rules file {source}: expected a mapping at the top level")
    return RuleSet.from_mapping(data, settings, source)


def _normalise(value: str) -> str:
    return " ".join(re.sub(r"[^A-Z0-9]+", " ", value.upper()).split())


def _keyword_hit(haystack: str, keywords: Iterable[str]) -> str | None:
    padded = " " + haystack
    for keyword in keywords:
        if keyword and (" " + keyword) in padded:
            return keyword
    return None


# --- per-image geometry -----------------------------------------------------------------------

Vector = tuple[float, float, float]


@dataclass(frozen=True)
class SliceInfo:
    """What the rules need from one image (one frame of a multi-frame instance)."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    image_type: tuple[str, ...]
    orientation: tuple[float, ...] | None
    position: Vector | None
    thickness_mm: float | None
    rows: int | None
    columns: int | None
    pixel_spacing: tuple[float, float] | None
    gantry_tilt_deg: float | None
    kernel: str | None

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def is_derived(self) -> bool:
        """A reformat or capture, not an acquired axial stack.

        SECONDARY images are always derived. DERIVED\\PRIMARY is derived only when it is not
        AXIAL: scanners mark axial reconstructions DERIVED\\PRIMARY\\AXIAL (an extended
        field-of-view or iterative recon, as on the real Siemens chest series), while their
        reformats are DERIVED\\PRIMARY\\MPR / REFORMATTED or DERIVED\\SECONDARY.
        """
        values = [v.upper() for v in self.image_type]
        if len(values) > 1 and values[1] == "SECONDARY":
            return True
        if values and values[0] == "DERIVED":
            return not (len(values) > 2 and values[1] == "PRIMARY" and values[2] == "AXIAL")
        return False


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else None


def _first_item(ds: Dataset, *path: str) -> Dataset | None:
    current: Dataset | None = ds
    for keyword in path:
        if current is None:
            return None
        sequence = current.get(keyword)
        if not sequence:
            return None
        current = sequence[0]
    return current


def _vector(value: Any) -> Vector | None:
    numbers = _floats(value, 3)
    return (numbers[0], numbers[1], numbers[2]) if numbers else None


def _pair(value: Any) -> tuple[float, float] | None:
    numbers = _floats(value, 2)
    return (numbers[0], numbers[1]) if numbers else None


def slices_from_dataset(ds: Dataset) -> list[SliceInfo]:
    """One :class:`SliceInfo` per image: per frame for enhanced multi-frame CT."""
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    sop_instance_uid = text(ds, "SOPInstanceUID") or ""
    sop_class_uid = text(ds, "SOPClassUID") or ""
    modality = (text(ds, "Modality") or "").upper() or None
    rows = int(ds.Rows) if "Rows" in ds else None
    columns = int(ds.Columns) if "Columns" in ds else None
    tilt = number(ds, "GantryDetectorTilt")
    kernel = text(ds, "ConvolutionKernel")

    def make(orientation: tuple[float, ...] | None, position: Vector | None,
             thickness: float | None, spacing: tuple[float, float] | None,
             frame_kernel: str | None) -> SliceInfo:
        return SliceInfo(sop_instance_uid=sop_instance_uid, sop_class_uid=sop_class_uid,
                         modality=modality, image_type=image_type, orientation=orientation,
                         position=position, thickness_mm=thickness, rows=rows, columns=columns,
                         pixel_spacing=spacing, gantry_tilt_deg=tilt, kernel=frame_kernel)

    frames = ds.get("PerFrameFunctionalGroupsSequence")
    if not frames:
        return [make(_floats(ds.get("ImageOrientationPatient"), 6),
                     _vector(ds.get("ImagePositionPatient")), number(ds, "SliceThickness"),
                     _pair(ds.get("PixelSpacing")), kernel)]
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    out = []
    for frame in frames:
        def pick(seq: str, frame: Dataset = frame) -> Dataset | None:
            found = _first_item(frame, seq)
            if found is None and shared is not None:
                found = _first_item(shared, seq)
            return found

        orientation_item = pick("PlaneOrientationSequence")
        position_item = pick("PlanePositionSequence")
        measures = pick("PixelMeasuresSequence")
        reconstruction = pick("CTReconstructionSequence")
        frame_kernel = kernel
        if reconstruction is not None:
            frame_kernel = text(reconstruction, "ConvolutionKernel") or kernel
        out.append(make(
            _floats(orientation_item.get("ImageOrientationPatient"), 6)
            if orientation_item else None,
            _vector(position_item.get("ImagePositionPatient")) if position_item else None,
            number(measures, "SliceThickness") if measures else None,
            _pair(measures.get("PixelSpacing")) if measures else None,
            frame_kernel))
    return out


def _normal(orientation: Sequence[float]) -> Vector:
    """:func:`service.imaging.geometry.slice_normal` as a plain tuple. A degenerate
    orientation gives the zero vector: 90 degrees from every direction, so refused as
    MIXED_ORIENTATION (or NOT_AXIAL)."""
    normal = slice_normal(tuple(orientation))
    if normal is None:
        return 0.0, 0.0, 0.0
    return float(normal[0]), float(normal[1]), float(normal[2])


def _dot(a: Vector, b: Vector) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _angle_deg(a: Vector, b: Vector) -> float:
    dot = abs(a[0] * b[0] + a[1] * b[1] + a[2] * b[2])
    return math.degrees(math.acos(max(-1.0, min(1.0, dot))))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# --- the decision -----------------------------------------------------------------------------

@dataclass
class Decision:
    qualified: bool
    reason: SeriesReason
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)

    def detail_json(self) -> str:
        """What ``Series.qualification_detail`` stores: the sentence and the measured values."""
        return json.dumps({"detail": self.detail, "metrics": self.metrics}, sort_keys=True,
                          default=str)


def _refuse(reason: SeriesReason, detail: str, metrics: dict[str, Any]) -> Decision:
    return Decision(False, reason, detail, metrics)


def evaluate(datasets: Sequence[Dataset], rules: RuleSet, *, unreadable: int = 0,
             conflicting: int = 0) -> Decision:
    """Decide on one complete series from its instances' headers (pixel data not needed).

    ``conflicting``: SOP Instance UIDs of the series received with different content (kept
    side by side in the spool); any makes a cervical CT series not analyzable, since
    nothing says which copy is the right one.
    """
    metrics: dict[str, Any] = {"instances": len(datasets), "unreadable": unreadable,
                               "conflicting_duplicates": conflicting, "rules": rules.source}
    if not datasets:
        return _refuse(SeriesReason.NO_READABLE_IMAGES, "no readable instance in the series",
                       metrics)
    first = datasets[0]
    modality = (text(first, "Modality") or "").upper()
    metrics["modality"] = modality or None
    if modality not in rules.modalities:
        return _refuse(SeriesReason.NOT_CT, f"modality {modality or 'absent'} is not "
                       f"{'/'.join(sorted(rules.modalities))}", metrics)
    slices = [s for ds in datasets for s in slices_from_dataset(ds)]
    unsupported = sorted({s.sop_class_uid for s in slices} - rules.sop_classes)
    if unsupported:
        metrics["sop_classes"] = unsupported
        return _refuse(SeriesReason.UNSUPPORTED_SOP_CLASS,
                       f"SOP class {', '.join(unsupported)} is not a CT image the model reads",
                       metrics)
    localizers = [s for s in slices if s.is_localizer]
    slices = [s for s in slices if not s.is_localizer]
    metrics["localizers_skipped"] = len(localizers)
    if not slices:
        return _refuse(SeriesReason.LOCALIZER, "only localizer (scout) images", metrics)
    if rules.skip_derived:
        derived = [s for s in slices if s.is_derived]
        slices = [s for s in slices if not s.is_derived]
        metrics["derived_skipped"] = len(derived)
        if not slices:
            return _refuse(SeriesReason.DERIVED_IMAGE,
                           "only derived or secondary images (reformats, captures)", metrics)

    described = " | ".join(filter(None, (text(first, f) for f in rules.keyword_fields)))
    haystack = _normalise(described)
    excluded = _keyword_hit(haystack, rules.exclude_keywords)
    if excluded:
        metrics["excluded_keyword"] = excluded
        return _refuse(SeriesReason.EXCLUDED_DESCRIPTION,
                       f"description names a non-diagnostic stack ({excluded})", metrics)
    matched = _keyword_hit(haystack, rules.cervical_keywords)
    metrics["cervical_keyword"] = matched
    if not matched:
        partial = _keyword_hit(haystack, rules.partial_coverage_keywords)
        if partial:
            metrics["partial_coverage_keyword"] = partial
            matched = f"{partial} (may hold part of the cervical spine: the anatomy decides)"
        elif not haystack.strip() and rules.analyze_undescribed:
            metrics["undescribed"] = True
            matched = "none (no description: the anatomy decides)"
        else:
            return _refuse(SeriesReason.NOT_CERVICAL, "no cervical-spine keyword in "
                           f"{', '.join(rules.keyword_fields)}", metrics)

    if conflicting:
        return _refuse(SeriesReason.CONFLICTING_DUPLICATES,
                       f"{conflicting} SOP Instance UIDs received twice with different "
                       "content", metrics)
    if any(s.orientation is None or s.position is None for s in slices):
        return _refuse(SeriesReason.MISSING_GEOMETRY,
                       "Image Orientation/Position (Patient) missing on some images", metrics)
    normals = [_normal(s.orientation) for s in slices if s.orientation is not None]
    reference = normals[0]
    worst = max(_angle_deg(reference, n) for n in normals)
    metrics["orientation_spread_deg"] = round(worst, 3)
    if worst > rules.orientation_consistency_deg:
        return _refuse(SeriesReason.MIXED_ORIENTATION,
                       f"image orientations differ by up to {worst:.1f} deg", metrics)
    axial_angle = _angle_deg(reference, (0.0, 0.0, 1.0))
    metrics["axial_angle_deg"] = round(axial_angle, 3)
    tilts = [abs(s.gantry_tilt_deg) for s in slices if s.gantry_tilt_deg is not None]
    tilt = max(tilts) if tilts else 0.0
    metrics["gantry_tilt_deg"] = tilt
    if tilt > rules.max_gantry_tilt_deg:
        return _refuse(SeriesReason.GANTRY_TILT, f"gantry tilt {tilt:g} deg", metrics)
    if axial_angle > rules.axial_tolerance_deg:
        return _refuse(SeriesReason.NOT_AXIAL, f"slice normal {axial_angle:.1f} deg from the "
                       "feet-head axis: not an axial stack", metrics)

    positions = sorted(_dot(s.position, reference) for s in slices if s.position is not None)
    gaps = [b - a for a, b in zip(positions, positions[1:], strict=False)]
    thicknesses = [s.thickness_mm for s in slices if s.thickness_mm]
    spacing = _median(gaps) if gaps else None
    thickness = _median(thicknesses) if thicknesses else spacing
    metrics.update(slices=len(slices), thickness_mm=thickness,
                   spacing_mm=round(spacing, 4) if spacing is not None else None,
                   coverage_mm=round(positions[-1] - positions[0], 2))
    kernel = next((s.kernel for s in slices if s.kernel), None)
    metrics["kernel"] = kernel
    metrics["bone_kernel"] = bool(kernel and any(p.search(kernel)
                                                 for p in rules.bone_kernel_patterns))
    if thickness is not None and thickness > rules.max_slice_thickness_mm + 1e-6:
        return _refuse(SeriesReason.SLICE_TOO_THICK, f"slice thickness {thickness:g} mm > "
                       f"{rules.max_slice_thickness_mm:g} mm", metrics)
    if len(slices) < rules.min_slices:
        return _refuse(SeriesReason.TOO_FEW_SLICES,
                       f"{len(slices)} slices < {rules.min_slices}", metrics)
    shapes = {(s.rows, s.columns) for s in slices}
    spacings = {s.pixel_spacing for s in slices}
    if len(shapes) > 1 or len(spacings) > 1:
        return _refuse(SeriesReason.INCONSISTENT_GEOMETRY,
                       f"images differ in matrix {sorted(shapes, key=str)} or pixel spacing",
                       metrics)
    if spacing is not None:
        duplicates = sum(1 for g in gaps if g < 1e-3)
        if duplicates:
            metrics["duplicate_positions"] = duplicates
            return _refuse(SeriesReason.INCONSISTENT_GEOMETRY,
                           f"{duplicates} images share a slice position", metrics)
        largest = max(gaps)
        metrics["largest_gap_mm"] = round(largest, 3)
        if largest > rules.max_gap_factor * spacing:
            missing = sum(round(g / spacing) - 1 for g in gaps if g > rules.max_gap_factor
                          * spacing)
            metrics["missing_slices"] = missing
            return _refuse(SeriesReason.MISSING_SLICES, f"gap of {largest:.2f} mm in a stack "
                           f"spaced {spacing:.2f} mm: about {missing} slices missing", metrics)
    return Decision(True, SeriesReason.QUALIFIED,
                    f"axial CT, {len(slices)} slices of {thickness:g} mm, "
                    f"keyword {matched}" + (f", kernel {kernel}" if kernel else ""), metrics)


# --- choosing one series per study -----------------------------------------------------------

def preference_key(metrics: dict[str, Any]) -> tuple[int, float, int]:
    """Smaller is better: bone kernel first, then thinner slices, then more slices."""
    thickness = metrics.get("thickness_mm")
    return (0 if metrics.get("bone_kernel") else 1,
            float(thickness) if thickness is not None else 99.0,
            -int(metrics.get("slices") or 0))


def describe_preference(metrics: dict[str, Any]) -> str:
    parts = ["bone kernel" if metrics.get("bone_kernel") else "soft kernel"]
    if metrics.get("thickness_mm") is not None:
        parts.append(f"{metrics['thickness_mm']:g} mm")
    parts.append(f"{metrics.get('slices', 0)} slices")
    if metrics.get("kernel"):
        parts.append(f"kernel {metrics['kernel']}")
    return ", ".join(parts)


def metrics_from_detail(detail: str | None) -> dict[str, Any]:
    """Read back the metrics stored by :meth:`Decision.detail_json`."""
    if not detail:
        return {}
    try:
        data = json.loads(detail)
    except ValueError:
        return {}
    metrics = data.get("metrics") if isinstance(data, dict) else None
    return metrics if isinstance(metrics, dict) else {}

