"""A spooled series as a volume in Hounsfield units, with its geometry and provenance.

Contract used by inference (``hu``, spacing) and results (``headers``, ``sop_instance_uids``,
``affine``). Array order is (z, y, x): z is the slice index after sorting along the slice
normal (ascending projection of ImagePositionPatient on the normal of
ImageOrientationPatient), y the row, x the column. ``affine`` maps a homogeneous voxel index
``(z, y, x, 1)`` to patient coordinates in millimetres, DICOM LPS.

:func:`load_volume` turns the files of one series into a :class:`Volume` or raises
:class:`~service.imaging.qc.VolumeError` with a stable reason code. It reads every header
first (pixels deferred), decides sorting, duplicates and every quality check on headers
alone, and only then decodes pixels, one frame at a time, straight into one preallocated
array: peak memory is about the size of the volume (plus the same again when a gantry tilt
must be resampled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset

from service.imaging.geometry import (
    AIR_HU,
    STANDARD_AXIAL_IOP,
    StackShape,
    angle_deg,
    describe_stack,
    orthonormal_directions,
    regular_target_grid,
    resample_stack,
    stack_affine,
)
from service.imaging.qc import QcWarning, VolumeError
from service.imaging.source import (
    FrameDecoder,
    SourceFrame,
    SourceInstance,
    acquisition_datetime,
    frames_of,
    read_instance,
)
from service.outcomes import SeriesReason

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger(__name__)

ORIENTATION_TOLERANCE_DEG = 0.5
"""Slices whose row or column direction differ by more than this are inconsistent."""
PIXEL_SPACING_TOLERANCE = 1e-3
"""Relative difference of Pixel Spacing above which slices are inconsistent."""
POSITION_TOLERANCE_MM = 0.01
"""Slices closer than this along the normal (and in plane) are at the same position."""
MAX_INPLANE_SHIFT_PX = 0.5
"""A stack whose slices drift in plane by more than this (pixels) is resampled (gantry tilt)."""
MAX_SPACING_DEVIATION = 0.1
"""A stack whose slices sit further than this fraction of a spacing from a uniform grid is
resampled to uniform spacing."""
DEFAULT_MIN_SLICES = 20
DEFAULT_MAX_GANTRY_TILT_DEG = 30.0
DEFAULT_MAX_GAP_RATIO = 1.5
DEFAULT_MAX_OBLIQUITY_DEG = 45.0
DEFAULT_MAX_VOXELS = 1 << 30
"""Voxel limit of :func:`load_volume` when the caller gives none (``max_volume_voxels``)."""


@dataclass
class Volume:
    hu: np.ndarray
    """(z, y, x) Hounsfield units, int16 or float32."""
    spacing: tuple[float, float, float]
    """(z, y, x) voxel spacing in mm; z from IPP projections, never from SliceThickness."""
    affine: np.ndarray
    """4x4: (z, y, x, 1) voxel index -> LPS mm."""
    sop_instance_uids: list[str]
    """SOP Instance UID of the source of each z slice (for multi-frame: repeated per frame)."""
    frame_numbers: list[int | None]
    """1-based frame number within ``sop_instance_uids[z]`` for multi-frame sources, else None."""
    headers: list[Dataset]
    """One source dataset per distinct SOP instance, pixel data removed (for SR/SEG references)."""
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None
    acquired_at: datetime | None
    warnings: list[str] = field(default_factory=list)
    """Stable warning codes of recoveries made while loading (``QcWarning`` values, e.g.
    POSITIONS_FROM_SLICE_LOCATION)."""
    gantry_tilt_deg: float = 0.0
    """Measured angle between slice normal and table direction (0 for an untilted stack)."""
    resampled: bool = False
    """True when ``hu`` is not the source slice grid (gantry tilt or uneven spacing corrected):
    then ``sop_instance_uids[z]`` names the *nearest* source slice, and a label map must be
    resampled back to the source geometry (or written with its own plane positions) before
    it is stored against the source frames."""

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return int(z), int(y), int(x)

    @property
    def normal(self) -> np.ndarray:
        """Unit vector (LPS) of increasing z index."""
        step = self.affine[:3, 0]
        return np.asarray(step / np.linalg.norm(step))

    def index_to_lps(self, index: np.ndarray) -> np.ndarray:
        """(..., 3) voxel indices (z, y, x), fractional allowed -> (..., 3) LPS mm."""
        index = np.asarray(index, dtype=np.float64)
        return np.asarray(index @ self.affine[:3, :3].T + self.affine[:3, 3])

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) LPS mm -> (..., 3) fractional voxel indices (z, y, x)."""
        points = np.asarray(points, dtype=np.float64)
        return np.asarray(np.linalg.solve(self.affine[:3, :3], (points - self.affine[:3, 3]).T).T)


# --------------------------------------------------------------------------- public entry


def load_series(paths: Sequence[Path], settings: Settings) -> Volume:
    """:func:`load_volume` with the limits and site timezone from the service settings."""
    return load_volume(
        paths,
        max_gantry_tilt_deg=settings.max_gantry_tilt_deg,
        min_slices=settings.min_slices,
        default_timezone=site_timezone(settings.dicom_timezone),
        max_voxels=settings.max_volume_voxels,
    )


def site_timezone(name: str) -> tzinfo:
    """The tzinfo for an IANA name; "UTC" needs no timezone database (slim images lack one)."""
    if name.strip().upper() in ("UTC", "Z", "GMT", "ETC/UTC"):
        return UTC
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def load_volume(
    paths: Sequence[Path],
    *,
    max_gantry_tilt_deg: float = DEFAULT_MAX_GANTRY_TILT_DEG,
    min_slices: int = DEFAULT_MIN_SLICES,
    max_gap_ratio: float = DEFAULT_MAX_GAP_RATIO,
    max_obliquity_deg: float = DEFAULT_MAX_OBLIQUITY_DEG,
    default_timezone: tzinfo = UTC,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Load the instances of one series into a :class:`Volume`, or raise ``VolumeError``.

    The result does not depend on the order of ``paths`` nor on which of two identical
    duplicates is listed first. Recoveries (localizers dropped, positions recovered from
    Slice Location, gantry tilt resampled, ...) are recorded in ``Volume.warnings`` as
    :class:`~service.imaging.qc.QcWarning` values.

    ``max_gantry_tilt_deg``: tilts up to this are resampled to an axial grid, larger ones are
    refused. ``min_slices``: fewer distinct slices are refused. ``max_gap_ratio``: a gap
    larger than this times the median spacing means missing slices. ``max_obliquity_deg``:
    a slice normal further than this from the head-foot axis is not axial.
    ``default_timezone``: the timezone of naive DICOM dates and times.
    ``max_voxels``: a series of more slices x Rows x Columns is refused (``VOLUME_TOO_LARGE``)
    from its headers, before the volume is allocated; an encoded frame whose own header
    states another size than Rows x Columns is refused (``UNDECODABLE_PIXEL_DATA``) before it
    is decoded, so a small file cannot make the decoder allocate gigabytes.
    """
    if min_slices < 2:
        raise ValueError("min_slices must be at least 2 (spacing needs two slices)")
    started = time.perf_counter()
    loader = _Loader(
        max_gantry_tilt_deg=max_gantry_tilt_deg,
        min_slices=min_slices,
        max_gap_ratio=max_gap_ratio,
        max_obliquity_deg=max_obliquity_deg,
        default_timezone=default_timezone,
        max_voxels=max_voxels,
    )
    volume = loader.load([Path(p) for p in paths])
    logger.info(
        "series %s loaded: %s %s spacing=%s warnings=%s in %.2f s",
        volume.series_instance_uid, volume.shape, volume.hu.dtype,
        tuple(round(s, 3) for s in volume.spacing), volume.warnings,
        time.perf_counter() - started,
    )
    return volume


# --------------------------------------------------------------------------- implementation


@dataclass(eq=False)
class _Slot:
    """One z position of the output stack: the frame that fills it and its duplicates."""

    frame: SourceFrame
    position: np.ndarray
    sigma: float
    duplicates: list[SourceFrame] = field(default_factory=list)


class _Loader:
    def __init__(
        self,
        *,
        max_gantry_tilt_deg: float,
        min_slices: int,
        max_gap_ratio: float,
        max_obliquity_deg: float,
        default_timezone: tzinfo,
        max_voxels: int = DEFAULT_MAX_VOXELS,
    ) -> None:
        self.max_voxels = max_voxels
        self.max_tilt = max_gantry_tilt_deg
        self.min_slices = min_slices
        self.max_gap_ratio = max_gap_ratio
        self.max_obliquity = max_obliquity_deg
        self.default_timezone = default_timezone
        self.warnings: list[str] = []

    def warn(self, code: QcWarning, detail: str) -> None:
        logger.warning("%s: %s", code.value, detail)
        if code.value not in self.warnings:
            self.warnings.append(code.value)

    # -- the pipeline, in the order in which reasons are decided ------------------------

    def load(self, paths: list[Path]) -> Volume:
        instances = self._read(paths)
        frames = self._frames(instances)
        matrix = self._check_pixels_and_matrix(frames)
        row_dir, col_dir, normal = self._orientation(frames)
        pixel_spacing = self._pixel_spacing(frames, matrix)
        self._frame_of_reference(frames)
        positions = self._positions(frames, normal, row_dir, col_dir, pixel_spacing, matrix)
        slots = self._deduplicate(frames, positions, normal)
        self._check_count_and_gaps(slots)
        shape = self._check_tilt(slots, normal, row_dir, col_dir, pixel_spacing)

        hu = self._decode(slots, matrix)
        slot_positions = np.array([slot.position for slot in slots])
        source_index = np.arange(len(slots))
        resample_tilt = shape.max_inplane_shift_px > MAX_INPLANE_SHIFT_PX
        resample_spacing = shape.max_spacing_deviation > MAX_SPACING_DEVIATION
        if resample_tilt or resample_spacing:
            if resample_tilt:
                self.warn(QcWarning.GANTRY_TILT_RESAMPLED,
                          f"tilt {shape.tilt_deg:.2f} deg, in-plane drift "
                          f"{shape.max_inplane_shift_px:.1f} px: resampled to an axial grid")
            if resample_spacing:
                self.warn(QcWarning.IRREGULAR_SPACING_RESAMPLED,
                          f"slices up to {shape.max_spacing_deviation:.0%} of a spacing off a "
                          "uniform grid: resampled to uniform spacing")
            grid = regular_target_grid(slot_positions, normal, row_dir, col_dir, pixel_spacing,
                                       matrix, to_axial=resample_tilt)
            hu, source_index = resample_stack(hu, slot_positions, normal, row_dir, col_dir,
                                              pixel_spacing, grid)
            affine, spacing = grid.affine, grid.spacing
        else:
            sigma = np.array([slot.sigma for slot in slots])
            dz = float((sigma[-1] - sigma[0]) / (len(slots) - 1))
            spacing = (dz, pixel_spacing[0], pixel_spacing[1])
            affine = stack_affine(slot_positions[0], normal, row_dir, col_dir, spacing)

        used_instances: list[SourceInstance] = []
        seen: set[int] = set()
        for slot in slots:
            inst = slot.frame.instance
            if id(inst) not in seen:
                seen.add(id(inst))
                used_instances.append(inst)
        headers = [inst.header for inst in used_instances]
        first = slots[0].frame.instance
        return Volume(
            hu=hu,
            spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            affine=affine,
            sop_instance_uids=[slots[k].frame.sop_instance_uid for k in source_index],
            frame_numbers=[slots[k].frame.frame_number for k in source_index],
            headers=headers,
            study_instance_uid=first.study_instance_uid,
            series_instance_uid=first.series_instance_uid,
            frame_of_reference_uid=next(
                (i.frame_of_reference_uid for i in used_instances if i.frame_of_reference_uid),
                None,
            ),
            acquired_at=acquisition_datetime(headers, self.default_timezone),
            warnings=list(self.warnings),
            gantry_tilt_deg=round(shape.tilt_deg, 3),
            resampled=bool(resample_tilt or resample_spacing),
        )

    def _read(self, paths: list[Path]) -> list[SourceInstance]:
        unique = sorted(set(paths), key=str)
        readable: list[SourceInstance] = []
        unreadable = 0
        for path in unique:
            try:
                readable.append(read_instance(path))
            except Exception as exc:  # noqa: BLE001 - any parse failure means "not usable"
                unreadable += 1
                logger.warning("unreadable file %s: %s: %s", path.name, type(exc).__name__, exc)
        if not readable:
            raise VolumeError(SeriesReason.NO_READABLE_IMAGES,
                              f"none of {len(unique)} file(s) could be read as DICOM")
        if unreadable:
            self.warn(QcWarning.UNREADABLE_FILES_SKIPPED, f"{unreadable} file(s) not DICOM")
        images = [i for i in readable
                  if i.is_ct_image and (i.has_pixel_data or i.has_float_pixel_data)]
        skipped = len(readable) - len(images)
        if not images:
            classes = sorted({i.sop_class_uid or i.modality or "?" for i in readable})
            raise VolumeError(SeriesReason.NOT_CT,
                              f"{len(readable)} instance(s), none a CT image: {', '.join(classes)}")
        if skipped:
            self.warn(QcWarning.UNSUPPORTED_INSTANCES_SKIPPED,
                      f"{skipped} non-CT-image instance(s) ignored")
        series = sorted({i.series_instance_uid for i in images})
        studies = sorted({i.study_instance_uid for i in images})
        if len(series) > 1 or len(studies) > 1:
            raise VolumeError(SeriesReason.MIXED_SERIES,
                              f"{len(series)} series / {len(studies)} studies: {', '.join(series)}")
        return images

    def _frames(self, instances: list[SourceInstance]) -> list[SourceFrame]:
        frames = [frame for inst in instances for frame in frames_of(inst)]
        localizers = [f for f in frames if f.is_localizer]
        if localizers:
            self.warn(QcWarning.LOCALIZER_DROPPED, f"{len(localizers)} localizer image(s)")
            frames = [f for f in frames if not f.is_localizer]
        if not frames:
            raise VolumeError(SeriesReason.TOO_FEW_SLICES,
                              f"no slices left after dropping {len(localizers)} localizer(s)")
        frames.sort(key=lambda f: f.canonical_key)
        return frames

    def _check_pixels_and_matrix(self, frames: list[SourceFrame]) -> tuple[int, int]:
        for inst in _distinct_instances(frames):
            problem = _unsupported_pixels(inst)
            if problem:
                raise VolumeError(SeriesReason.UNSUPPORTED_PIXEL_FORMAT,
                                  f"SOP {inst.sop_instance_uid}: {problem}")
        matrices = sorted({(f.instance.rows or 0, f.instance.columns or 0) for f in frames})
        if len(matrices) > 1:
            listed = ", ".join(f"{r}x{c}" for r, c in matrices)
            raise VolumeError(SeriesReason.INCONSISTENT_MATRIX, f"matrices {listed}")
        self._check_size(len(frames), matrices[0], "frames")
        return matrices[0]

    def _check_size(self, slices: int, matrix: tuple[int, int], what: str) -> None:
        """Refuse a series whose declared size exceeds the voxel limit, before allocating.

        Checked on the frames as listed (early: no geometry work on a hostile series) and
        again on the distinct slices just before the volume is allocated.
        """
        voxels = slices * matrix[0] * matrix[1]
        if voxels > self.max_voxels:
            raise VolumeError(
                SeriesReason.VOLUME_TOO_LARGE,
                f"{slices} {what} of {matrix[0]}x{matrix[1]} = {voxels} voxels, above the "
                f"limit of {self.max_voxels}",
            )

    def _orientation(self, frames: list[SourceFrame]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with_iop = [f for f in frames if f.iop is not None
                    and orthonormal_directions(f.iop) is not None]
        if not with_iop:
            self.warn(QcWarning.ORIENTATION_ASSUMED_AXIAL,
                      "no Image Orientation (Patient) on any slice")
            reference = orthonormal_directions(STANDARD_AXIAL_IOP)
        else:
            assert with_iop[0].iop is not None
            reference = orthonormal_directions(with_iop[0].iop)
        assert reference is not None
        row_dir, col_dir, normal = reference
        distinct: dict[tuple[float, ...], SourceFrame] = {}
        for f in with_iop:
            assert f.iop is not None
            distinct.setdefault(tuple(np.round(f.iop, 6)), f)
        for iop_key, frame in distinct.items():
            dirs = orthonormal_directions(np.array(iop_key))
            assert dirs is not None
            worst = max(angle_deg(dirs[0], row_dir), angle_deg(dirs[1], col_dir))
            if worst > ORIENTATION_TOLERANCE_DEG:
                raise VolumeError(
                    SeriesReason.MIXED_ORIENTATION,
                    f"{frame.label()} is oriented {worst:.1f} deg from "
                    f"{with_iop[0].label()} ({len(distinct)} orientations)",
                )
        if with_iop and len(with_iop) < len(frames):
            self.warn(QcWarning.ORIENTATION_FROM_OTHER_SLICES,
                      f"{len(frames) - len(with_iop)} slice(s) without usable orientation")
        obliquity = angle_deg(np.abs(normal), np.array([0.0, 0.0, 1.0]))
        if obliquity > self.max_obliquity:
            axis = "LR" if abs(normal[0]) >= abs(normal[1]) else "AP"
            plane = "sagittal" if axis == "LR" else "coronal"
            raise VolumeError(
                SeriesReason.NOT_AXIAL,
                f"slice normal {np.round(normal, 3).tolist()} is {obliquity:.0f} deg from the "
                f"head-foot axis ({plane}-like; limit {self.max_obliquity:.0f} deg)",
            )
        return row_dir, col_dir, normal

    def _pixel_spacing(self, frames: list[SourceFrame], matrix: tuple[int, int]
                       ) -> tuple[float, float]:
        with_spacing = [f for f in frames if f.pixel_spacing is not None]
        if with_spacing:
            reference = with_spacing[0].pixel_spacing
            assert reference is not None
            for frame in with_spacing:
                assert frame.pixel_spacing is not None
                diff = max(abs(a - b) / b for a, b in zip(frame.pixel_spacing, reference,
                                                          strict=True))
                if diff > PIXEL_SPACING_TOLERANCE:
                    raise VolumeError(
                        SeriesReason.INCONSISTENT_PIXEL_SPACING,
                        f"{frame.label()} has {list(frame.pixel_spacing)} mm, "
                        f"{with_spacing[0].label()} has {list(reference)} mm",
                    )
            if len(with_spacing) < len(frames):
                self.warn(QcWarning.PIXEL_SPACING_RECOVERED,
                          f"{len(frames) - len(with_spacing)} slice(s) without Pixel Spacing "
                          "took it from the others")
            return reference
        diameters = sorted({f.reconstruction_diameter for f in frames if f.reconstruction_diameter})
        if len(diameters) == 1 and matrix[0] == matrix[1]:
            value = diameters[0] / matrix[1]
            self.warn(QcWarning.PIXEL_SPACING_RECOVERED,
                      f"Pixel Spacing from Reconstruction Diameter {diameters[0]} mm / {matrix[1]}")
            return (value, value)
        raise VolumeError(SeriesReason.MISSING_PIXEL_SPACING,
                          "no Pixel Spacing and no single Reconstruction Diameter")

    def _frame_of_reference(self, frames: list[SourceFrame]) -> None:
        uids = sorted({f.instance.frame_of_reference_uid for f in frames
                       if f.instance.frame_of_reference_uid})
        if len(uids) > 1:
            raise VolumeError(SeriesReason.INCONSISTENT_FRAME_OF_REFERENCE,
                              f"{len(uids)} frames of reference: {', '.join(uids)}")

    def _positions(
        self,
        frames: list[SourceFrame],
        normal: np.ndarray,
        row_dir: np.ndarray,
        col_dir: np.ndarray,
        pixel_spacing: tuple[float, float],
        matrix: tuple[int, int],
    ) -> list[np.ndarray]:
        """Image Position (Patient) of every frame, recovering absent ones where possible.

        Slice Location is a signed distance along the normal whose sign and origin are
        calibrated on the slices that have both; Instance Number is used only through a
        linear fit on slices whose position is known, and only if that fit is exact to a
        tenth of a spacing. With neither, the direction of the stack is unknowable: refuse.
        """
        known: dict[int, np.ndarray] = {id(f): f.ipp for f in frames if f.ipp is not None}
        if len(known) == len(frames):
            return [known[id(f)] for f in frames]
        missing = [f for f in frames if f.ipp is None]
        inplane = _mean_inplane_offset(known, normal, frames, row_dir, col_dir, pixel_spacing,
                                       matrix)
        sigma_known = {key: float(pos @ normal) for key, pos in known.items()}

        # Slice Location: sigma = a + b * location, b = +-1.
        calib = [(f.slice_location, sigma_known[id(f)]) for f in frames
                 if id(f) in sigma_known and f.slice_location is not None]
        if calib:
            pairs = np.array(calib)
            sign = 1.0 if len(calib) < 2 or np.corrcoef(pairs.T)[0, 1] >= 0 else -1.0
            if len(calib) < 2 and normal[2] < 0:
                sign = -1.0
            offset = float(np.median(pairs[:, 1] - sign * pairs[:, 0]))
        else:
            sign = 1.0 if normal[2] >= 0 else -1.0
            offset = 0.0
        from_location = [f for f in missing if f.slice_location is not None]
        for frame in from_location:
            assert frame.slice_location is not None
            sigma_known[id(frame)] = offset + sign * frame.slice_location
        if from_location:
            self.warn(QcWarning.POSITIONS_FROM_SLICE_LOCATION,
                      f"{len(from_location)} slice(s) positioned from Slice Location")

        # Instance Number: a linear fit on every slice whose position is now known.
        rest = [f for f in missing if id(f) not in sigma_known]
        if rest:
            fit = [(f.instance_number, sigma_known[id(f)]) for f in frames
                   if id(f) in sigma_known and f.instance_number is not None]
            usable = [f for f in rest if f.instance_number is not None]
            line = _fit_instance_numbers(fit)
            if line is None or len(usable) < len(rest):
                raise VolumeError(
                    SeriesReason.MISSING_POSITIONS,
                    f"{len(rest)} slice(s) without Image Position, Slice Location or a usable "
                    f"Instance Number fit ({len(fit)} calibration slice(s))",
                )
            intercept, slope = line
            for frame in usable:
                assert frame.instance_number is not None
                sigma_known[id(frame)] = intercept + slope * frame.instance_number
            self.warn(QcWarning.POSITIONS_FROM_INSTANCE_NUMBER,
                      f"{len(usable)} slice(s) positioned from Instance Number")
        return [known[id(f)] if id(f) in known else inplane + sigma_known[id(f)] * normal
                for f in frames]

    def _deduplicate(self, frames: list[SourceFrame], positions: list[np.ndarray],
                     normal: np.ndarray) -> list[_Slot]:
        by_uid: dict[tuple[str, int | None], tuple[SourceFrame, np.ndarray]] = {}
        for frame, pos in zip(frames, positions, strict=True):
            key = (frame.sop_instance_uid, frame.frame_index)
            if key in by_uid:
                other, other_pos = by_uid[key]
                if np.linalg.norm(pos - other_pos) > POSITION_TOLERANCE_MM:
                    raise VolumeError(
                        SeriesReason.CONFLICTING_DUPLICATES,
                        f"{frame.label()} appears twice at different positions "
                        f"{np.round(other_pos, 2).tolist()} and {np.round(pos, 2).tolist()}",
                    )
            else:
                by_uid[key] = (frame, pos)
        entries = sorted(
            ((float(pos @ normal), frame.canonical_key, frame, pos)
             for frame, pos in zip(frames, positions, strict=True)),
            key=lambda e: (e[0], e[1]),
        )
        slots: list[_Slot] = []
        for sigma, _, frame, pos in entries:
            if slots and sigma - slots[-1].sigma <= POSITION_TOLERANCE_MM:
                slot = slots[-1]
                if np.linalg.norm(pos - slot.position) > POSITION_TOLERANCE_MM:
                    raise VolumeError(
                        SeriesReason.CONFLICTING_DUPLICATES,
                        f"{frame.label()} and {slot.frame.label()} share slice position "
                        f"{sigma:.2f} mm but are displaced in plane",
                    )
                # Keep the canonical frame: the choice must not depend on arrival order.
                if frame.canonical_key < slot.frame.canonical_key:
                    slot.duplicates.append(slot.frame)
                    slot.frame, slot.position = frame, pos
                else:
                    slot.duplicates.append(frame)
            else:
                slots.append(_Slot(frame=frame, position=pos, sigma=sigma))
        return slots

    def _check_count_and_gaps(self, slots: list[_Slot]) -> None:
        if len(slots) < self.min_slices:
            raise VolumeError(SeriesReason.TOO_FEW_SLICES,
                              f"{len(slots)} distinct slice(s), at least {self.min_slices} needed")
        sigma = np.array([slot.sigma for slot in slots])
        steps = np.diff(sigma)
        median = float(np.median(steps))
        worst = int(np.argmax(steps))
        if steps[worst] > self.max_gap_ratio * median:
            missing = max(int(round(steps[worst] / median)) - 1, 1)
            raise VolumeError(
                SeriesReason.MISSING_SLICES,
                f"gap of {steps[worst]:.2f} mm between slices {worst} and {worst + 1} "
                f"(median spacing {median:.2f} mm, about {missing} slice(s) missing; "
                f"{int(np.sum(steps > self.max_gap_ratio * median))} gap(s) in all)",
            )

    def _check_tilt(self, slots: list[_Slot], normal: np.ndarray, row_dir: np.ndarray,
                    col_dir: np.ndarray, pixel_spacing: tuple[float, float]) -> StackShape:
        positions = np.array([slot.position for slot in slots])
        shape = describe_stack(positions, normal, row_dir, col_dir, pixel_spacing)
        declared = _declared_tilt(slots)
        if declared is not None and abs(declared - shape.tilt_deg) > 1.0:
            logger.info("Gantry/Detector Tilt says %.1f deg, geometry %.1f deg (geometry used)",
                        declared, shape.tilt_deg)
        if shape.tilt_deg > self.max_tilt and shape.max_inplane_shift_px > MAX_INPLANE_SHIFT_PX:
            raise VolumeError(
                SeriesReason.GANTRY_TILT,
                f"gantry tilt {shape.tilt_deg:.1f} deg exceeds the {self.max_tilt:.0f} deg limit",
            )
        return shape

    def _decode(self, slots: list[_Slot], matrix: tuple[int, int]) -> np.ndarray:
        """Decode every slot's frame into one preallocated (z, y, x) HU array.

        int16 when every slope and intercept is an integer (the usual CT case), else float32.
        Frames are decoded instance by instance in file order (a multi-frame file is read
        once, sequentially); duplicates are decoded afterwards and must equal the kept frame.
        """
        everything = [f for slot in slots for f in (slot.frame, *slot.duplicates)]
        integral = all(_is_integer(f.slope) and _is_integer(f.intercept) for f in everything)
        dtype = np.int16 if integral else np.float32
        self._check_size(len(slots), matrix, "slices")
        hu = np.empty((len(slots), *matrix), dtype=dtype)
        by_instance: dict[int, tuple[SourceInstance, dict[int, int]]] = {}
        for z, slot in enumerate(slots):
            inst = slot.frame.instance
            by_instance.setdefault(id(inst), (inst, {}))[1][slot.frame.frame_index or 0] = z
        frame_lookup = {(id(f.instance), f.frame_index or 0): f for f in everything}
        with FrameDecoder() as decoder:
            for inst, wanted in by_instance.values():
                for index, stored in _decode_frames(decoder, inst, list(wanted)):
                    z = wanted[index]
                    _to_hu(stored, frame_lookup[(id(inst), index)], hu[z])
            dropped = 0
            scratch = np.empty(matrix, dtype=dtype)
            for z, slot in enumerate(slots):
                for dup in slot.duplicates:
                    index = dup.frame_index or 0
                    for _, stored in _decode_frames(decoder, dup.instance, [index]):
                        _to_hu(stored, dup, scratch)
                    if not np.array_equal(scratch, hu[z]):
                        raise VolumeError(
                            SeriesReason.CONFLICTING_DUPLICATES,
                            f"{dup.label()} and {slot.frame.label()} share slice {z} "
                            "but their pixels differ",
                        )
                    dropped += 1
        if dropped:
            self.warn(QcWarning.DUPLICATE_SLICES_DROPPED, f"{dropped} identical duplicate(s)")
        return hu


def _decode_frames(
    decoder: FrameDecoder, inst: SourceInstance, indices: list[int]
) -> Iterator[tuple[int, np.ndarray]]:
    """``decoder.iter_frames`` with every failure turned into UNDECODABLE_PIXEL_DATA."""
    iterator = decoder.iter_frames(inst, sorted(indices))
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (VolumeError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - decoders raise anything from anywhere
            # Including what is no Exception: pylibjpeg-rle, in Rust, panics on a corrupt
            # run (one flipped bit in a segment) with pyo3's PanicException, a BaseException
            # that passed the worker's ``except Exception`` and ended the task uncaught.
            raise VolumeError(
                SeriesReason.UNDECODABLE_PIXEL_DATA,
                f"SOP {inst.sop_instance_uid} ({inst.transfer_syntax.name}): "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        yield item


def _to_hu(stored: np.ndarray, frame: SourceFrame, out: np.ndarray) -> None:
    """Rescale stored values of one frame into ``out`` (HU); padding becomes air."""
    if out.dtype == np.int16:
        wide = np.int64 if stored.dtype.itemsize >= 4 else np.int32
        values = stored.astype(wide)
        slope, intercept = int(round(frame.slope)), int(round(frame.intercept))
        if slope != 1:
            np.multiply(values, slope, out=values)
        if intercept:
            np.add(values, intercept, out=values)
        np.clip(values, np.iinfo(np.int16).min, np.iinfo(np.int16).max, out=values)
        out[...] = values
    else:
        np.multiply(stored, np.float32(frame.slope), out=out, casting="unsafe")
        out += np.float32(frame.intercept)
    padding = frame.instance.padding_range
    if padding is not None:
        low, high = padding
        mask = (stored >= low) & (stored <= high)
        out[mask] = AIR_HU


def _is_integer(value: float) -> bool:
    return abs(value - round(value)) < 1e-6


def _distinct_instances(frames: list[SourceFrame]) -> list[SourceInstance]:
    seen: dict[int, SourceInstance] = {}
    for frame in frames:
        seen.setdefault(id(frame.instance), frame.instance)
    return list(seen.values())


def _unsupported_pixels(inst: SourceInstance) -> str | None:
    if not inst.has_pixel_data:
        return "no integer Pixel Data element (float pixel data is not CT)"
    if inst.samples_per_pixel != 1:
        return f"{inst.samples_per_pixel} samples per pixel"
    if inst.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2"):
        return f"photometric interpretation {inst.photometric_interpretation or 'absent'}"
    if inst.bits_allocated not in (8, 16, 32):
        return f"{inst.bits_allocated} bits allocated"
    if not inst.rows or not inst.columns:
        return "no Rows/Columns"
    if inst.rows < 0 or inst.columns < 0:
        # Possible with a wrong VR (IS/LO "-1" where US belongs): np.empty would raise.
        return f"Rows/Columns {inst.rows}x{inst.columns}"
    return None


def _mean_inplane_offset(
    known: dict[int, np.ndarray],
    normal: np.ndarray,
    frames: list[SourceFrame],
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_spacing: tuple[float, float],
    matrix: tuple[int, int],
) -> np.ndarray:
    """In-plane part of the position for slices that have none: the others' mean, or a
    field of view centred on the patient axis when no slice has a position."""
    if known:
        stacked = np.array(list(known.values()))
        inplane = stacked - np.outer(stacked @ normal, normal)
        return np.asarray(inplane.mean(axis=0))
    rows, cols = matrix
    dy, dx = pixel_spacing
    return np.asarray(-((cols - 1) / 2.0) * dx * row_dir - ((rows - 1) / 2.0) * dy * col_dir)


def _fit_instance_numbers(
    pairs: Sequence[tuple[int | None, float]],
) -> tuple[float, float] | None:
    """sigma = intercept + slope * instance number, if the known slices obey it exactly."""
    clean = [(float(n), s) for n, s in pairs if n is not None]
    if len(clean) < 2 or len({n for n, _ in clean}) < 2:
        return None
    data = np.array(clean)
    slope, intercept = np.polyfit(data[:, 0], data[:, 1], 1)
    if abs(slope) < 1e-6:
        return None
    residual = np.abs(intercept + slope * data[:, 0] - data[:, 1]).max()
    if residual > 0.1 * abs(slope):
        return None
    return float(intercept), float(slope)


def _declared_tilt(slots: list[_Slot]) -> float | None:
    value = slots[0].frame.instance.header.get("GantryDetectorTilt")
    try:
        return abs(float(value)) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
