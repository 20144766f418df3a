"""The pieces every synthetic DICOM writer shares: options, UIDs, descriptions, the
Patient/Study/Equipment and CT acquisition attributes, pixel encoding.

``dicom_writer`` (single-frame series, studies), ``enhanced`` (multi-frame instances) and
``extra_series`` (localizer, dose report) all build on these; they lived in ``dicom_writer``,
which made the three modules import each other in a circle. Here, below all three, each
writer imports them and none imports another writer's internals.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from service.synthetic.phantom import Phantom

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1505.1"
IMPLEMENTATION_VERSION = "CSPINE_SYN_1"


class TransferSyntax(StrEnum):
    """Transfer syntaxes the writer can produce (all lossless)."""

    EXPLICIT_VR_LE = "explicit"
    IMPLICIT_VR_LE = "implicit"
    DEFLATED = "deflated"
    JPEG_LOSSLESS_SV1 = "jpeg-lossless"
    """Process 14, selection value 1 (1.2.840.10008.1.2.4.70), encoded with GDCM."""
    JPEG_LS_LOSSLESS = "jpeg-ls"
    JPEG_2000_LOSSLESS = "jpeg2000"
    RLE_LOSSLESS = "rle"

    @property
    def uid(self) -> str:
        return {
            "explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
            "deflated": DeflatedExplicitVRLittleEndian, "jpeg-lossless": JPEGLosslessSV1,
            "jpeg-ls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless, "rle": RLELossless,
        }[self.value]

    @property
    def compressed(self) -> bool:
        return self.value in ("jpeg-lossless", "jpeg-ls", "jpeg2000", "rle")


class MultiFrame(StrEnum):
    NONE = "none"
    ENHANCED = "enhanced"
    """Enhanced CT Image Storage (1.2.840.10008.5.1.4.1.1.2.1), all frames in one file."""
    LEGACY_CONVERTED = "legacy"
    """Legacy Converted Enhanced CT Image Storage, built by highdicom."""


@dataclass(frozen=True)
class Descriptions:
    study: str
    series: str
    protocol: str
    body_part: str


DESCRIPTION_VARIANTS: tuple[Descriptions, ...] = (
    Descriptions("CT CERVICAL SPINE W/O CONTRAST", "C-SPINE BONE 0.6", "CSPINE", "CSPINE"),
    Descriptions("C-SPINE W/O", "Bone 1.0 CE", "TRAUMA C-SPINE", "NECK"),
    Descriptions("CT CERVICAL SPINE", "AXIAL BONE", "C-Spine Routine", "CSPINE"),
    Descriptions("TRAUMA", "CSPINE BONE AX", "TRAUMA/CSPINE", "SPINE"),
    Descriptions("NECK", "Neck 1.0 Br64", "Neck", "NECK"),
    Descriptions("CT SPINE CERVICAL WO CONTRAST", "C SPINE AXIAL", "CSPINE", "CSPINE"),
    Descriptions("CSPINE", "CSPINE 1.25mm", "CSPINE", "CSPINE"),
)
"""Study/series descriptions, protocol names and BodyPartExamined seen in practice."""


@dataclass
class WriterOptions:
    """How to write a phantom. Defaults give a clean, valid single-frame series."""

    transfer_syntax: TransferSyntax = TransferSyntax.EXPLICIT_VR_LE
    shuffle: bool = False
    """Random file names and a random order of the returned paths (delivery order)."""
    duplicates: int = 0
    """Write this many instances a second time (same SOP Instance UID, another file)."""
    missing_slices: int | Sequence[int] = 0
    """Leave out this many interior slices (chosen from the seed) or these phantom z indices."""
    gantry_tilt_deg: float = 0.0
    missing_ipp: int = 0
    """Remove ImagePositionPatient from this many slices (SliceLocation stays)."""
    localizer: bool = False
    """``write_study``: add a lateral localizer (scout) series."""
    soft_kernel_series: bool = False
    """``write_study``: add a soft-tissue-kernel series of the same acquisition."""
    multiframe: MultiFrame = MultiFrame.NONE
    """Write the CT series as one multi-frame instance instead of one file per slice."""
    non_ct_series: bool = False
    """``write_study``: add a Secondary Capture 'dose report' series (modality OT)."""
    description_variant: int | None = None
    """Index into ``DESCRIPTION_VARIANTS``; None: chosen from the seed."""
    instance_order: str = "head_first"
    """'head_first': InstanceNumber 1 is the most superior slice; 'feet_first': inferior."""
    file_naming: str = "instance"
    """'instance': ``<InstanceNumber>.dcm`` (the RSNA layout); 'sop': ``<SOPInstanceUID>.dcm``."""
    signed_pixels: bool = False
    uid_prefix: str | None = None
    """UID root ending in '.', e.g. '1.2.826.0.1.3680043.10.1505.'; None: '2.25.' UUIDs."""
    series_number: int = 3
    study_instance_uid: str | None = None
    """Override the seed-derived Study Instance UID (e.g. to put phantoms in one study)."""
    station_name: str = "SYNCT01"


# --------------------------------------------------------------------------- helpers


def deterministic_uid(prefix: str | None, *sources: object) -> str:
    """A UID that depends only on ``sources``: ``2.25.<128-bit hash>`` when ``prefix`` is
    None (pydicom's generate_uid ignores its entropy sources without a prefix)."""
    text = "|".join(str(s) for s in sources)
    if prefix is None:
        digest = hashlib.sha256(text.encode()).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"
    return str(generate_uid(prefix=prefix, entropy_srcs=[text]))


def phantom_uid(phantom: Phantom, options: WriterOptions, *parts: object) -> str:
    return deterministic_uid(options.uid_prefix, f"cspine-synthetic-{phantom.options.seed}",
                             *parts)


def study_uid(phantom: Phantom, options: WriterOptions | None = None) -> str:
    """Study Instance UID the writer uses for ``phantom`` (deterministic)."""
    options = options or WriterOptions()
    return options.study_instance_uid or phantom_uid(phantom, options, "study")


def descriptions_for(phantom: Phantom, options: WriterOptions) -> Descriptions:
    index = options.description_variant
    if index is None:
        index = random.Random(phantom.options.seed * 7 + 3).randrange(len(DESCRIPTION_VARIANTS))
    return DESCRIPTION_VARIANTS[index % len(DESCRIPTION_VARIANTS)]


def study_datetime(phantom: Phantom) -> dt.datetime:
    rng = random.Random(phantom.options.seed * 13 + 1)
    day = dt.date(2021, 1, 1) + dt.timedelta(days=rng.randrange(4 * 365))
    return dt.datetime.combine(day, dt.time(rng.randrange(24), rng.randrange(60),
                                            rng.randrange(60)))


def ds_string(value: float) -> str:
    """DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def stored_values(hu: np.ndarray, options: WriterOptions) -> tuple[np.ndarray, int]:
    """Stored pixel values and the rescale intercept."""
    if options.signed_pixels:
        return hu.astype(np.int16, copy=False), 0
    return (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16), -1024


def _gdcm_jpeg_lossless(frame: np.ndarray, bits_stored: int, signed: bool) -> bytes:
    """Encode one frame as JPEG Lossless Process 14 SV1 with GDCM (pydicom has no encoder
    for it). GDCM only works on files, so this round-trips through a temporary file."""
    import gdcm  # python-gdcm, a runtime dependency

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4")
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = frame.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(frame).tobytes()
    with tempfile.TemporaryDirectory(prefix="cspine-jpeg-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        if not reader.Read():
            raise RuntimeError("GDCM could not read the temporary frame")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise RuntimeError("GDCM could not encode JPEG Lossless SV1")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(str(dst))
        if not writer.Write():
            raise RuntimeError("GDCM could not write the JPEG Lossless frame")
        encoded = dcmread(dst)
    from pydicom.encaps import generate_frames

    return next(generate_frames(encoded.PixelData, number_of_frames=1))


def encode_frames(frames: Sequence[np.ndarray], syntax: TransferSyntax, bits_stored: int,
                  signed: bool) -> list[bytes]:
    """Encode frames for a compressed transfer syntax (lossless; raises when the encoder
    package is missing, never falls back silently)."""
    if syntax == TransferSyntax.JPEG_LOSSLESS_SV1:
        return [_gdcm_jpeg_lossless(f, bits_stored, signed) for f in frames]
    from pydicom.pixels.encoders import (
        JPEG2000LosslessEncoder,
        JPEGLSLosslessEncoder,
        RLELosslessEncoder,
    )

    encoder = {TransferSyntax.RLE_LOSSLESS: RLELosslessEncoder,
               TransferSyntax.JPEG_LS_LOSSLESS: JPEGLSLosslessEncoder,
               TransferSyntax.JPEG_2000_LOSSLESS: JPEG2000LosslessEncoder}[syntax]
    if not encoder.is_available:
        raise RuntimeError(f"no encoder for {syntax.uid}: missing {encoder.missing_dependencies}")
    out = []
    for f in frames:
        out.append(encoder.encode(
            np.ascontiguousarray(f), rows=f.shape[0], columns=f.shape[1], samples_per_pixel=1,
            bits_allocated=16, bits_stored=bits_stored, pixel_representation=1 if signed else 0,
            photometric_interpretation="MONOCHROME2", number_of_frames=1))
    return out


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def make_file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def common_attributes(phantom: Phantom, options: WriterOptions, descriptions: Descriptions,
            modality: str = "CT") -> Dataset:
    """Patient, General Study, General Equipment and SOP Common attributes."""
    p = phantom.patient
    when = study_datetime(phantom)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = p.patient_name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = "CSPINE-SYNTHETIC"
    birth = when.date().replace(day=1) - dt.timedelta(days=int(p.age_years * 365.25))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age_years:03d}Y"
    ds.PatientWeight = ds_string(p.weight_kg)
    ds.PatientIdentityRemoved = "NO"
    ds.StudyInstanceUID = study_uid(phantom, options)
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = "SYNTHETIC^REFERRER"
    ds.StudyID = f"{phantom.options.seed % 100000:05d}"
    ds.AccessionNumber = p.accession_number
    ds.StudyDescription = descriptions.study
    ds.Manufacturer = "CSPINE-TRIAGE SYNTHETIC"
    ds.InstitutionName = "Synthetic Phantom Hospital"
    ds.StationName = options.station_name
    ds.ManufacturerModelName = "PhantomCT 64"
    ds.DeviceSerialNumber = "SYN0001"
    ds.SoftwareVersions = "cspine-synthetic 1"
    ds.Modality = modality
    ds.InstanceCreationDate = ds.StudyDate
    ds.InstanceCreationTime = ds.StudyTime
    return ds


def ct_acquisition(ds: Dataset, phantom: Phantom, kernel: str, options: WriterOptions) -> None:
    """CT Image module acquisition attributes (identical for every slice)."""
    rng = random.Random(phantom.options.seed * 31 + 5)
    ds.KVP = ds_string(rng.choice([100.0, 120.0, 120.0, 140.0]))
    ds.DataCollectionDiameter = "500"
    fov = phantom.spacing[2] * phantom.shape[2]
    ds.ReconstructionDiameter = ds_string(fov)
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = ds_string(options.gantry_tilt_deg)
    ds.TableHeight = ds_string(rng.uniform(120, 180))
    ds.RotationDirection = "CW"
    ds.ExposureTime = str(rng.choice([500, 600, 750, 1000]))
    ds.XRayTubeCurrent = str(rng.randrange(120, 400))
    ds.Exposure = str(rng.randrange(80, 300))
    ds.FilterType = "BODY FILTER"
    ds.GeneratorPower = str(rng.randrange(20, 60))
    ds.FocalSpots = "0.7"
    ds.ConvolutionKernel = kernel
    ds.ScanOptions = "HELICAL MODE"
    ds.RevolutionTime = float(rng.choice([0.5, 0.8, 1.0]))
    ds.SingleCollimationWidth = 0.625
    ds.TotalCollimationWidth = 40.0
    ds.SpiralPitchFactor = float(rng.choice([0.516, 0.531, 0.984]))
    ds.CTDIvol = round(rng.uniform(12, 30), 2)
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([code_item("113690", "DCM",
                                                          "IEC Head Dosimetry Phantom")])
    ds.PatientPosition = "HFS"


def save_dataset(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)
