"""Small CT series written with pydicom for the ingest tests and the ingest benchmark.

Deliberately independent of ``service.synthetic`` (which renders anatomy): these tests need
many instances fast and full control of the header (orientation, tilt, kernel, image type),
not realistic pixels. Pixel values are a deterministic ramp plus the slice index, int16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)


@dataclass
class SeriesSpec:
    slices: int = 30
    rows: int = 64
    columns: int = 64
    thickness_mm: float = 1.0
    spacing_mm: float | None = None
    """Distance between slice positions; defaults to the thickness."""
    description: str = "C-SPINE BONE 1.0"
    body_part: str | None = "CSPINE"
    kernel: str = "BONE"
    modality: str = "CT"
    sop_class_uid: str = CTImageStorage
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL")
    orientation: Sequence[float] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    gantry_tilt_deg: float | None = 0.0
    images_in_acquisition: int | None = None
    skip_positions: Sequence[int] = ()
    """Slice indices left out (missing slices)."""
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    series_number: int = 2
    study_description: str = "CT CERVICAL SPINE"


def ct_dataset(spec: SeriesSpec, index: int, *, sop_uid: str | None = None,
               with_pixels: bool = True) -> Dataset:
    spacing = spec.spacing_mm or spec.thickness_mm
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(spec.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = spec.sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.ImageType = list(spec.image_type)
    ds.Modality = spec.modality
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Synthetic^Test"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = f"1016{index % 60:02d}"
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.description
    if spec.body_part is not None:
        ds.BodyPartExamined = spec.body_part
    ds.ConvolutionKernel = spec.kernel
    ds.SeriesNumber = spec.series_number
    ds.InstanceNumber = index + 1
    if spec.images_in_acquisition is not None:
        ds.ImagesInAcquisition = spec.images_in_acquisition
    ds.SliceThickness = spec.thickness_mm
    if spec.gantry_tilt_deg is not None:
        ds.GantryDetectorTilt = spec.gantry_tilt_deg
    ds.ImageOrientationPatient = list(spec.orientation)
    row, col = np.array(spec.orientation[:3]), np.array(spec.orientation[3:])
    normal = np.cross(row, col)
    position = -index * spacing * normal
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.SliceLocation = float(position[2])
    ds.Rows = spec.rows
    ds.Columns = spec.columns
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    if with_pixels:
        ramp = (np.arange(spec.rows * spec.columns, dtype=np.int32) % 2000).astype(np.int16)
        ds.PixelData = (ramp.reshape(spec.rows, spec.columns) + np.int16(index)).tobytes()
    return ds


@dataclass
class WrittenSeries:
    spec: SeriesSpec
    paths: list[Path]
    sop_uids: list[str]


def write_series(out_dir: Path, spec: SeriesSpec | None = None) -> WrittenSeries:
    """Write one file per slice as ``<out_dir>/<index>.dcm`` (Explicit VR Little Endian)."""
    spec = spec or SeriesSpec()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, uids = [], []
    for index in range(spec.slices):
        if index in spec.skip_positions:
            continue
        ds = ct_dataset(spec, index)
        path = out_dir / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return WrittenSeries(spec, paths, uids)
