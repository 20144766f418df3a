"""Small CT series written with pydicom, one knob per quirk the loader must handle.

Every series samples one analytic phantom, :func:`phantom_hu`, a function of the LPS position
in mm. Whatever the orientation, tilt, order or encoding of the files, a correct loader must
return a volume whose voxel ``(z, y, x)`` holds ``phantom_hu(volume.index_to_lps((z, y, x)))``,
which is what the tests check. Matrices are small (32 x 40, non-square so that a swapped
axis fails) so that the whole suite stays fast.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PhantomFn = Callable[[np.ndarray], np.ndarray]


def phantom_hu(points: np.ndarray) -> np.ndarray:
    """HU at LPS points (..., 3): air outside a 14 mm cylinder along z, soft tissue with a
    z gradient inside (so that slice order shows), and an 800 HU "bone" rod."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    hu = np.where(np.hypot(x, y) < 14.0, 40.0 + 2.0 * z, -1000.0)
    return np.where(np.hypot(x - 4.0, y + 3.0) < 3.5, 800.0, hu)


def smooth_phantom_hu(points: np.ndarray) -> np.ndarray:
    """A smooth field (no edges) for checking interpolation after resampling."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return 200.0 * np.sin(x / 9.0) + 150.0 * np.cos(y / 11.0) + 4.0 * z


@dataclass
class SeriesSpec:
    """Geometry and encoding of a synthetic series. Lengths in mm, LPS."""

    n_slices: int = 24
    rows: int = 32
    cols: int = 40
    pixel_spacing: tuple[float, float] = (0.8, 0.7)
    """(between rows, between columns) = (dy, dx)."""
    slice_spacing: float = 2.0
    """Table step between slices (equals the spacing along the normal when untilted)."""
    origin: tuple[float, float, float] = (-14.0, -12.8, -30.0)
    iop: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    tilt_deg: float = 0.0
    tilt_mode: str = "iop"
    """"iop": tilted image planes, table moving along z (Siemens/Philips style);
    "ipp": axial image planes, positions shifted in y per slice (sheared stack)."""
    slope: float | Sequence[float] = 1.0
    intercept: float | Sequence[float] = -1024.0
    signed: bool = False
    bits_stored: int = 16
    padding_value: int | None = None
    """Stored value written outside a 15 mm radius (Pixel Padding Value)."""
    transfer_syntax: UID = ExplicitVRLittleEndian
    phantom: PhantomFn = phantom_hu
    study_uid: str = field(default_factory=lambda: generate_uid())
    series_uid: str = field(default_factory=lambda: generate_uid())
    frame_of_reference_uid: str = field(default_factory=lambda: generate_uid())
    acquisition_date: str | None = "20240315"
    acquisition_time: str | None = "101500"
    timezone_offset: str | None = None

    def slopes(self) -> list[float]:
        return _per_slice(self.slope, self.n_slices)

    def intercepts(self) -> list[float]:
        return _per_slice(self.intercept, self.n_slices)

    def directions(self) -> tuple[np.ndarray, np.ndarray]:
        """(row_dir, col_dir) of the written images."""
        row = np.array(self.iop[:3], dtype=float)
        col = np.array(self.iop[3:], dtype=float)
        if self.tilt_deg and self.tilt_mode == "iop":
            t = np.radians(self.tilt_deg)
            col = np.array([0.0, np.cos(t), -np.sin(t)])
        return row, col

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice k (k = 0 is the first along the stack)."""
        origin = np.array(self.origin, dtype=float)
        row, col = self.directions()
        normal = np.cross(row, col)
        if self.tilt_deg and self.tilt_mode == "ipp":
            t = np.radians(self.tilt_deg)
            return origin + k * self.slice_spacing * np.array([0.0, np.tan(t), 1.0])
        if self.tilt_deg and self.tilt_mode == "iop":
            return origin + k * self.slice_spacing * np.array([0.0, 0.0, 1.0])
        return origin + k * self.slice_spacing * normal

    def pixel_points(self, k: int) -> np.ndarray:
        """LPS position (rows, cols, 3) of every pixel centre of slice k."""
        row, col = self.directions()
        dy, dx = self.pixel_spacing
        yy, xx = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        return (self.position(k) + yy[..., None] * dy * col + xx[..., None] * dx * row)

    def hu(self, k: int) -> np.ndarray:
        return np.asarray(self.phantom(self.pixel_points(k)))

    def stored(self, k: int) -> np.ndarray:
        """Stored pixel values of slice k (before rescale), in the pixel dtype."""
        slope, intercept = self.slopes()[k], self.intercepts()[k]
        values = np.rint((self.hu(k) - intercept) / slope)
        if self.padding_value is not None:
            outside = np.hypot(self.pixel_points(k)[..., 0], self.pixel_points(k)[..., 1]) > 15.0
            values[outside] = self.padding_value
        dtype = np.int16 if self.signed else np.uint16
        info = np.iinfo(dtype)
        if self.bits_stored < 16:
            low = -(1 << (self.bits_stored - 1)) if self.signed else 0
            high = (1 << (self.bits_stored - 1)) - 1 if self.signed else (1 << self.bits_stored) - 1
            values = np.clip(values, low, high)
        return np.clip(values, info.min, info.max).astype(dtype)


def _per_slice(value: float | Sequence[float], count: int) -> list[float]:
    if isinstance(value, int | float):
        return [float(value)] * count
    values = [float(v) for v in value]
    assert len(values) == count
    return values


def _ds(number: float) -> str:
    return f"{number:.6f}".rstrip("0").rstrip(".") if number != 0 else "0"


def _base_dataset(spec: SeriesSpec, sop_class: str, sop_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.Modality = "CT"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "PHANTOM-1"
    ds.StudyDate = "20240315"
    ds.StudyTime = "100000"
    ds.SeriesDate = "20240315"
    ds.SeriesTime = "101000"
    if spec.acquisition_date is not None:
        ds.AcquisitionDate = spec.acquisition_date
    if spec.acquisition_time is not None:
        ds.AcquisitionTime = spec.acquisition_time
    if spec.timezone_offset is not None:
        ds.TimezoneOffsetFromUTC = spec.timezone_offset
    ds.Rows = spec.rows
    ds.Columns = spec.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 1 if spec.signed else 0
    if spec.padding_value is not None:
        ds.PixelPaddingValue = spec.padding_value
    return ds


def make_slice(spec: SeriesSpec, k: int, *, sop_uid: str | None = None,
               instance_number: int | None = None) -> Dataset:
    """One single-frame CT Image Storage dataset for slice k of the spec (not yet encoded)."""
    ds = _base_dataset(spec, CTImageStorage, sop_uid or generate_uid())
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = instance_number if instance_number is not None else k + 1
    row, col = spec.directions()
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.ImagePositionPatient = [_ds(v) for v in spec.position(k)]
    ds.SliceLocation = _ds(float(spec.position(k)[2]))
    ds.PixelSpacing = [_ds(v) for v in spec.pixel_spacing]
    ds.SliceThickness = _ds(spec.slice_spacing)
    ds.RescaleSlope = _ds(spec.slopes()[k])
    ds.RescaleIntercept = _ds(spec.intercepts()[k])
    ds.RescaleType = "HU"
    if spec.tilt_deg:
        ds.GantryDetectorTilt = _ds(spec.tilt_deg)
    ds.PixelData = spec.stored(k).tobytes()
    return ds


def save(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    """Write with the wanted transfer syntax (compressing with pydicom's encoders)."""
    ds = copy.deepcopy(ds)
    if transfer_syntax.is_encapsulated:
        ds.compress(transfer_syntax)
    elif not transfer_syntax.is_little_endian:
        # Native big-endian files hold big-endian 16-bit words.
        ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").byteswap().tobytes()
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(directory: Path, spec: SeriesSpec, *, order: Sequence[int] | None = None,
                 mutate: Callable[[int, Dataset], None] | None = None) -> list[Path]:
    """Write one file per slice; ``order`` lists slice indices in the order files are named
    (a shuffled arrival), ``mutate(k, ds)`` edits slice k's dataset before it is written."""
    directory.mkdir(parents=True, exist_ok=True)
    indices = list(order) if order is not None else list(range(spec.n_slices))
    paths = []
    for n, k in enumerate(indices):
        ds = make_slice(spec, k)
        if mutate is not None:
            mutate(k, ds)
        paths.append(save(ds, directory / f"IM{n:04d}.dcm", spec.transfer_syntax))
    return paths


def write_enhanced_ct(directory: Path, spec: SeriesSpec, *,
                      frame_order: Sequence[int] | None = None,
                      per_frame_rescale: bool = False) -> Path:
    """One Enhanced CT Image Storage instance holding every slice as a frame.

    Geometry and rescale live in the functional groups (orientation and pixel measures
    shared; position per frame; rescale shared unless ``per_frame_rescale``). Frames are
    written in ``frame_order`` (default: stack order)."""
    directory.mkdir(parents=True, exist_ok=True)
    order = list(frame_order) if frame_order is not None else list(range(spec.n_slices))
    ds = _base_dataset(spec, EnhancedCTImageStorage, generate_uid())
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(order)
    ds.ContentDate = "20240315"
    ds.ContentTime = "101600"
    if spec.acquisition_date and spec.acquisition_time:
        ds.AcquisitionDateTime = spec.acquisition_date + spec.acquisition_time
    row, col = spec.directions()
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = [_ds(v) for v in spec.pixel_spacing]
    measures.SliceThickness = _ds(spec.slice_spacing)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    frame_type = Dataset()
    frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    shared.CTImageFrameTypeSequence = DicomSequence([frame_type])
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = DicomSequence([_rescale(spec, 0)])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in order:
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [_ds(v) for v in spec.position(k)]
        item.PlanePositionSequence = DicomSequence([position])
        content = Dataset()
        content.InStackPositionNumber = int(k) + 1
        item.FrameContentSequence = DicomSequence([content])
        if per_frame_rescale:
            item.PixelValueTransformationSequence = DicomSequence([_rescale(spec, k)])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack([spec.stored(k) for k in order]).tobytes()
    return save(ds, directory / "enhanced.dcm", spec.transfer_syntax)


def _rescale(spec: SeriesSpec, k: int) -> Dataset:
    item = Dataset()
    item.RescaleSlope = _ds(spec.slopes()[k])
    item.RescaleIntercept = _ds(spec.intercepts()[k])
    item.RescaleType = "HU"
    return item


def write_localizer(directory: Path, spec: SeriesSpec, name: str = "scout.dcm") -> Path:
    """A coronal scout in the same series, flagged LOCALIZER in Image Type."""
    scout_spec = replace(spec, n_slices=1, iop=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), tilt_deg=0.0)
    ds = make_slice(scout_spec, 0, instance_number=999)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    directory.mkdir(parents=True, exist_ok=True)
    return save(ds, directory / name, spec.transfer_syntax)


def expected_hu(volume_affine: np.ndarray, shape: tuple[int, int, int],
                phantom: PhantomFn = phantom_hu) -> np.ndarray:
    """What a correct volume with this affine and shape must contain."""
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    index = np.stack([zz, yy, xx], axis=-1).astype(float)
    points = index @ volume_affine[:3, :3].T + volume_affine[:3, 3]
    return np.asarray(phantom(points))


@pytest.fixture
def series_dir(tmp_path: Path) -> Path:
    return tmp_path / "series"
