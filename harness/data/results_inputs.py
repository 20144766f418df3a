"""Inputs for the results tests, built here: a small synthetic CT series (pydicom), the
matching ``Volume``, a label map with vertebra blobs and a ``Findings`` object.

Synthetic, not clinical: the "vertebrae" are boxes and the probabilities are made up.
Used by the results, export and worklist tests and by ``bench/results.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from service.findings import VERTEBRAE, Findings, VertebraFinding
from service.imaging.volume import Volume

PIXEL_SPACING_MM = 0.8
SLICE_SPACING_MM = 1.0


@dataclass
class SyntheticCase:
    datasets: list[Dataset]
    """Full CT instances (with pixel data), in z order."""
    volume: Volume
    findings: Findings


def make_ct_series(n_slices: int = 40, rows: int = 64, cols: int = 64, *,
                   study_uid: str | None = None, with_pixels: bool = True,
                   patient_id: str = "SYNTH-001") -> list[Dataset]:
    """Axial CT slices, z ascending (feet to head in LPS +z), IOP [1,0,0,0,1,0]."""
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    rng = np.random.default_rng(7)
    out: list[Dataset] = []
    for i in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Modality = "CT"
        ds.Manufacturer = "SYNTHETIC"
        ds.PatientID, ds.PatientName = patient_id, "SYNTHETIC^PHANTOM"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyDate, ds.StudyTime = "20240101", "120000"
        ds.SeriesDate, ds.SeriesTime = "20240101", "120100"
        ds.ContentDate, ds.ContentTime = "20240101", "120100"
        ds.AcquisitionDate, ds.AcquisitionTime = "20240101", "120030"
        ds.AccessionNumber, ds.StudyID = "ACC0001", "1"
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber, ds.InstanceNumber = 2, i + 1
        ds.AcquisitionNumber = 1
        ds.BodyPartExamined = "CSPINE"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-cols * PIXEL_SPACING_MM / 2, -rows * PIXEL_SPACING_MM / 2,
                                   -200.0 + i * SLICE_SPACING_MM]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.SliceThickness = SLICE_SPACING_MM
        ds.PixelSpacing = [PIXEL_SPACING_MM, PIXEL_SPACING_MM]
        ds.KVP = 120
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 400, 1800
        if with_pixels:
            ds.PixelData = (rng.integers(0, 100, (rows, cols)).astype(np.int16)
                            + 1000).tobytes()
        out.append(ds)
    return out


def stripped(ds: Dataset) -> Dataset:
    copy = Dataset()
    copy.file_meta = ds.file_meta
    for elem in ds:
        if elem.keyword != "PixelData":
            copy.add(elem)
    return copy


def volume_from(datasets: list[Dataset]) -> Volume:
    first = datasets[0]
    rows, cols = int(first.Rows), int(first.Columns)
    if "PixelData" in first:
        hu = np.stack([np.frombuffer(ds.PixelData, np.int16).reshape(rows, cols) - 1024
                       for ds in datasets]).astype(np.int16)
    else:
        hu = np.zeros((len(datasets), rows, cols), np.int16)
    affine = np.eye(4)
    affine[:3, 0] = [0, 0, SLICE_SPACING_MM]
    affine[:3, 1] = [0, PIXEL_SPACING_MM, 0]
    affine[:3, 2] = [PIXEL_SPACING_MM, 0, 0]
    affine[:3, 3] = [float(v) for v in first.ImagePositionPatient]
    return Volume(
        hu=hu,
        spacing=(SLICE_SPACING_MM, PIXEL_SPACING_MM, PIXEL_SPACING_MM),
        affine=affine,
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        frame_numbers=[None] * len(datasets),
        headers=[stripped(ds) for ds in datasets],
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        acquired_at=datetime(2024, 1, 1, 12, 0, 30, tzinfo=UTC),
    )


def make_findings(volume: Volume, *, suspected: dict[str, float] | None = None,
                  in_view: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6"),
                  with_label_map: bool = True, model_version: str = "1.0.0") -> Findings:
    """Vertebrae stacked along z (C1 at the top = highest z), one box-shaped blob each.

    ``suspected`` maps vertebra -> fracture probability (>= 0.5 means suspected); the others
    in view get 0.05.
    """
    suspected = suspected or {}
    n, rows, cols = volume.shape
    label_map = np.zeros((n, rows, cols), np.uint8)
    height = max(2, n // (len(VERTEBRAE) + 1))
    findings: list[VertebraFinding] = []
    for i, name in enumerate(VERTEBRAE):
        if name not in in_view:
            findings.append(VertebraFinding(vertebra=name, in_view=False, probability=None,
                                            suspected=False))
            continue
        z1 = n - 1 - i * height
        z0 = z1 - height + 2
        y0, y1, x0, x1 = rows // 3, 2 * rows // 3, cols // 3, 2 * cols // 3
        label_map[z0:z1 + 1, y0:y1, x0:x1] = i + 1
        p = suspected.get(name, 0.05)
        mid = (z0 + z1) // 2
        findings.append(VertebraFinding(
            vertebra=name, in_view=True, probability=p, suspected=p >= 0.5,
            slice_range=(z0, z1), bbox=(z0, y0, x0, z1 + 1, y1, x1),
            key_slices=(mid, mid + 1) if p >= 0.5 else (mid,),
        ))
    patient_p = max([f.probability for f in findings if f.probability is not None], default=0.0)
    return Findings(
        series_instance_uid=volume.series_instance_uid,
        model_name="cspine-synthetic", model_version=model_version,
        vertebrae=findings, patient_probability=patient_p,
        patient_suspected=patient_p >= 0.5, vertebra_threshold=0.5, patient_threshold=0.5,
        label_map=label_map if with_label_map else None,
    )


def make_case(n_slices: int = 40, rows: int = 64, cols: int = 64, *,
              suspected: dict[str, float] | None = None, **kwargs: object) -> SyntheticCase:
    datasets = make_ct_series(n_slices, rows, cols)
    volume = volume_from(datasets)
    return SyntheticCase(datasets=datasets, volume=volume,
                         findings=make_findings(volume, suspected=suspected, **kwargs))  # type: ignore[arg-type]


def write_series(datasets: list[Dataset], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"CT{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
