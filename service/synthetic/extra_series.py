"""The other series a cervical-spine CT study contains: the lateral localizer (scout) and a
non-CT 'dose report' screen capture. Ingest must recognise both as not analysable.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from service.synthetic.dicom_base import (
    WriterOptions,
    common_attributes,
    ct_acquisition,
    descriptions_for,
    ds_string,
    encode_frames,
    make_file_meta,
    phantom_uid,
    save_dataset,
    study_datetime,
)
from service.synthetic.phantom import Phantom

logger = logging.getLogger(__name__)


def localizer_image(phantom: Phantom) -> np.ndarray:
    """Lateral projection (rows: head to feet, columns: anterior to posterior) as 12-bit
    stored values: line integrals of attenuation along x, like a topogram."""
    mu = (phantom.hu.astype(np.float32) + 1000.0).clip(0, None) * np.float32(0.019 / 1000.0)
    line = mu.sum(axis=2) * np.float32(phantom.spacing[2])  # (z, y), dimensionless
    img = (line / max(float(line.max()), 1e-6) * 3000.0).clip(0, 4095)
    return np.ascontiguousarray(img[::-1].astype(np.uint16))


def write_localizer(phantom: Phantom, out_dir: Path, options: WriterOptions) -> Path:
    """One lateral localizer image, CT Image Storage with ImageType ...\\LOCALIZER."""
    out_dir.mkdir(parents=True, exist_ok=True)
    descriptions = descriptions_for(phantom, options)
    ds = common_attributes(phantom, options, descriptions)
    when = study_datetime(phantom) + dt.timedelta(minutes=1)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = phantom_uid(phantom, options, "localizer-image")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesInstanceUID = phantom_uid(phantom, options, "localizer-series")
    ds.SeriesNumber = 1
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = "Topogram 0.6 T20s"
    ds.ProtocolName = descriptions.protocol
    ds.BodyPartExamined = descriptions.body_part
    ds.FrameOfReferenceUID = phantom_uid(phantom, options, "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceNumber = 1
    ct_acquisition(ds, phantom, "SOFT", options)
    ds.ScanOptions = "SURVIEW"
    img = localizer_image(phantom)
    nz = phantom.shape[0]
    x0, y0, _ = phantom.origin
    top = phantom.slice_position(nz - 1)[2]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [ds_string(0.0), ds_string(y0), ds_string(top)]
    ds.PixelSpacing = [ds_string(phantom.spacing[0]), ds_string(phantom.spacing[1])]
    ds.SliceThickness = ds_string(0.6)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "1500"
    ds.WindowWidth = "3000"
    ds.BurnedInAnnotation = "NO"
    syntax = options.transfer_syntax
    if syntax.compressed:
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate(encode_frames([img], syntax, 12, False))
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = img.tobytes()
        ds["PixelData"].VR = "OW"
    ds.file_meta = make_file_meta(CTImageStorage, ds.SOPInstanceUID, syntax.uid)
    path = out_dir / "1.dcm"
    save_dataset(ds, path)
    return path


def _dose_page(phantom: Phantom) -> np.ndarray:
    """A grey 'screen capture' with bars standing in for the dose table's text."""
    rng = np.random.default_rng([phantom.options.seed, 77])
    img = np.full((384, 512), 24, dtype=np.uint8)
    img[20:44, 20:300] = 200
    for row in range(70, 360, 26):
        for col in (20, 160, 300, 400):
            width = int(rng.integers(30, 90))
            img[row:row + 12, col:col + width] = 170
    return img


def write_dose_report(phantom: Phantom, out_dir: Path, options: WriterOptions) -> Path:
    """A Secondary Capture image (modality OT) in the same study: not a CT image."""
    import highdicom as hd

    out_dir.mkdir(parents=True, exist_ok=True)
    descriptions = descriptions_for(phantom, options)
    common = common_attributes(phantom, options, descriptions, modality="OT")
    when = study_datetime(phantom) + dt.timedelta(minutes=6)
    sc = hd.sc.SCImage(
        pixel_array=_dose_page(phantom),
        photometric_interpretation=hd.PhotometricInterpretationValues.MONOCHROME2,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=common.StudyInstanceUID,
        series_instance_uid=phantom_uid(phantom, options, "dose-series"),
        series_number=999,
        sop_instance_uid=phantom_uid(phantom, options, "dose-image"),
        instance_number=1,
        manufacturer=common.Manufacturer,
        patient_id=common.PatientID,
        patient_name=common.PatientName,
        patient_birth_date=common.PatientBirthDate,
        patient_sex=common.PatientSex,
        accession_number=common.AccessionNumber,
        study_id=common.StudyID,
        study_date=common.StudyDate,
        study_time=common.StudyTime,
        referring_physician_name=common.ReferringPhysicianName,
        patient_orientation=("L", "P"),
    )
    sc.SeriesDescription = "Dose Report"
    sc.Laterality = ""
    sc.ContentDate = when.strftime("%Y%m%d")  # type: ignore[assignment]
    sc.ContentTime = when.strftime("%H%M%S")  # type: ignore[assignment]
    sc.file_meta = copy.copy(sc.file_meta)
    sc.file_meta.ImplementationClassUID = make_file_meta(
        SecondaryCaptureImageStorage, sc.SOPInstanceUID, sc.file_meta.TransferSyntaxUID
    ).ImplementationClassUID
    path = out_dir / "1.dcm"
    save_dataset(sc, path)
    return path
