"""Write a phantom as the DICOM a CT scanner / PACS would send.

``write_series`` writes one CT Image Storage series (one file per slice, or one Enhanced
/ Legacy Converted Enhanced CT multi-frame instance); ``write_study`` writes the study
around it (localizer, a second soft-tissue-kernel series, a non-CT series). The options
reproduce what real archives contain and what the ingest side has to cope with: every
lossless transfer syntax, shuffled delivery, duplicates, missing slices, gantry tilt,
missing ImagePositionPatient, description variants.

Geometry: axial slices, ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]`` (rows run to the
patient's left, columns posteriorly), ImagePositionPatient of phantom slice ``k`` =
``phantom.slice_position(k)`` (LPS mm, centre of the first pixel). InstanceNumber 1 is the
*most superior* slice (``instance_order='head_first'``, as in most RSNA 2022 studies) or the
most inferior (``'feet_first'``). With a gantry tilt ``t`` the column direction becomes
``(0, cos t, sin t)`` and each image is resampled from the phantom on that tilted plane,
so the anatomy stays where it is in patient space (the stack is sheared, as on a real
tilted acquisition).

Pixel data: HU are stored as unsigned 12-bit values with RescaleIntercept -1024 (default)
or as signed 16-bit values with intercept 0 (``signed_pixels=True``).

UIDs are derived from the phantom seed (``2.25.`` UUID-style roots, or ``uid_prefix``), so
writing the same phantom twice gives the same UIDs.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import logging
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
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

logger = logging.getLogger(__name__)

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


@dataclass
class WrittenSeries:
    series_instance_uid: str
    modality: str
    description: str
    role: str
    """'ct' (the analysable series), 'soft', 'localizer', 'non_ct'."""
    paths: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def deterministic_uid(prefix: str | None, *sources: object) -> str:
    """A UID that depends only on ``sources``: ``2.25.<128-bit hash>`` when ``prefix`` is
    None (pydicom's generate_uid ignores its entropy sources without a prefix)."""
    text = "|".join(str(s) for s in sources)
    if prefix is None:
        digest = hashlib.sha256(text.encode()).digest()[:16]
        return f"2.25.{int.from_bytes(digest, 'big')}"
    return str(generate_uid(prefix=prefix, entropy_srcs=[text]))


def _uid(phantom: Phantom, options: WriterOptions, *parts: object) -> str:
    return deterministic_uid(options.uid_prefix, f"cspine-synthetic-{phantom.options.seed}",
                             *parts)


def study_uid(phantom: Phantom, options: WriterOptions | None = None) -> str:
    """Study Instance UID the writer uses for ``phantom`` (deterministic)."""
    options = options or WriterOptions()
    return options.study_instance_uid or _uid(phantom, options, "study")


def _descriptions(phantom: Phantom, options: WriterOptions) -> Descriptions:
    index = options.description_variant
    if index is None:
        index = random.Random(phantom.options.seed * 7 + 3).randrange(len(DESCRIPTION_VARIANTS))
    return DESCRIPTION_VARIANTS[index % len(DESCRIPTION_VARIANTS)]


def _study_datetime(phantom: Phantom) -> dt.datetime:
    rng = random.Random(phantom.options.seed * 13 + 1)
    day = dt.date(2021, 1, 1) + dt.timedelta(days=rng.randrange(4 * 365))
    return dt.datetime.combine(day, dt.time(rng.randrange(24), rng.randrange(60),
                                            rng.randrange(60)))


def _ds(value: float) -> str:
    """DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def _stored(hu: np.ndarray, options: WriterOptions) -> tuple[np.ndarray, int]:
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


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _common(phantom: Phantom, options: WriterOptions, descriptions: Descriptions,
            modality: str = "CT") -> Dataset:
    """Patient, General Study, General Equipment and SOP Common attributes."""
    p = phantom.patient
    when = _study_datetime(phantom)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = p.patient_name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = "CSPINE-SYNTHETIC"
    birth = when.date().replace(day=1) - dt.timedelta(days=int(p.age_years * 365.25))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.PatientAge = f"{p.age_years:03d}Y"
    ds.PatientWeight = _ds(p.weight_kg)
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


def _ct_acquisition(ds: Dataset, phantom: Phantom, kernel: str, options: WriterOptions) -> None:
    """CT Image module acquisition attributes (identical for every slice)."""
    rng = random.Random(phantom.options.seed * 31 + 5)
    ds.KVP = _ds(rng.choice([100.0, 120.0, 120.0, 140.0]))
    ds.DataCollectionDiameter = "500"
    fov = phantom.spacing[2] * phantom.shape[2]
    ds.ReconstructionDiameter = _ds(fov)
    ds.DistanceSourceToDetector = "1085.6"
    ds.DistanceSourceToPatient = "595"
    ds.GantryDetectorTilt = _ds(options.gantry_tilt_deg)
    ds.TableHeight = _ds(rng.uniform(120, 180))
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
    ds.CTDIPhantomTypeCodeSequence = DicomSequence([_code("113690", "DCM",
                                                          "IEC Head Dosimetry Phantom")])
    ds.PatientPosition = "HFS"


def _tilted_volume(phantom: Phantom, tilt_deg: float) -> np.ndarray:
    """Resample the phantom on planes tilted by ``tilt_deg`` about the x axis: row r of
    slice k lies at y = y0 + r*dy*cos t, z = z_k + r*dy*sin t (bilinear in y and z)."""
    t = np.radians(tilt_deg)
    nz, ny, nx = phantom.shape
    dz, dy, _ = phantom.spacing
    rows = np.arange(ny, dtype=np.float64)
    yf = rows * np.cos(t)
    zf_off = rows * dy * np.sin(t) / dz
    out = np.empty(phantom.hu.shape, dtype=np.int16)
    y0 = np.clip(np.floor(yf).astype(int), 0, ny - 1)
    y1 = np.clip(y0 + 1, 0, ny - 1)
    wy = (yf - np.floor(yf)).astype(np.float32)[:, None]
    src = phantom.hu
    for k in range(nz):
        zf = k + zf_off
        z0 = np.clip(np.floor(zf).astype(int), 0, nz - 1)
        z1 = np.clip(z0 + 1, 0, nz - 1)
        wz = (zf - np.floor(zf)).astype(np.float32)[:, None]
        a = src[z0, y0].astype(np.float32) * (1 - wy) + src[z0, y1] * wy
        b = src[z1, y0].astype(np.float32) * (1 - wy) + src[z1, y1] * wy
        slab = a * (1 - wz) + b * wz
        outside = (zf < 0) | (zf > nz - 1)
        slab[outside] = -1024
        out[k] = np.rint(slab).astype(np.int16)
    return out


def _kept_slices(phantom: Phantom, options: WriterOptions) -> list[int]:
    nz = phantom.shape[0]
    keep = list(range(nz))
    if isinstance(options.missing_slices, int):
        count = options.missing_slices
        if count:
            rng = random.Random(phantom.options.seed * 17 + 11)
            interior = list(range(2, nz - 2))
            drop = set(rng.sample(interior, min(count, len(interior))))
            keep = [k for k in keep if k not in drop]
    else:
        drop = set(options.missing_slices)
        keep = [k for k in keep if k not in drop]
    return keep


def instance_number_of(phantom: Phantom, k: int, options: WriterOptions | None = None) -> int:
    """InstanceNumber the writer gives phantom slice ``k``."""
    options = options or WriterOptions()
    nz = phantom.shape[0]
    return nz - k if options.instance_order == "head_first" else k + 1


def _file_name(ds: Dataset, options: WriterOptions, rng: random.Random, used: set[str]) -> str:
    if options.shuffle:
        while True:
            name = f"{rng.getrandbits(64):016x}.dcm"
            if name not in used:
                return name
    if options.file_naming == "sop":
        return f"{ds.SOPInstanceUID}.dcm"
    return f"{int(ds.InstanceNumber)}.dcm"


def _save(ds: Dataset, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


# --------------------------------------------------------------------------- writers


def write_series(phantom: Phantom, out_dir: Path | str, options: WriterOptions | None = None,
                 *, kernel: str | None = None, series_description: str | None = None,
                 series_number: int | None = None, role: str = "ct",
                 hu: np.ndarray | None = None) -> list[Path]:
    """Write the phantom's CT series under ``out_dir`` and return the file paths in
    delivery order (shuffled when ``options.shuffle``).

    ``hu`` replaces the phantom's voxels (same shape), e.g. a soft-kernel rendering;
    ``kernel`` sets ConvolutionKernel (default: the phantom's). One file per slice, or one
    multi-frame file when ``options.multiframe`` is set.
    """
    options = options or WriterOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    descriptions = _descriptions(phantom, options)
    kernel_name = kernel or phantom.kernel
    description = series_description or descriptions.series
    number = series_number if series_number is not None else options.series_number
    series_uid = _uid(phantom, options, "series", role, kernel_name, options.multiframe,
                      options.gantry_tilt_deg)
    frame_uid = _uid(phantom, options, "frame-of-reference")
    volume = hu if hu is not None else phantom.hu
    if options.gantry_tilt_deg:
        shifted = Phantom(**{**phantom.__dict__, "hu": volume})
        volume = _tilted_volume(shifted, options.gantry_tilt_deg)
    if options.multiframe != MultiFrame.NONE:
        return [_write_multiframe(phantom, out, options, volume, series_uid, frame_uid,
                                  descriptions, description, number, kernel_name)]

    base = _common(phantom, options, descriptions)
    when = _study_datetime(phantom)
    acq = when + dt.timedelta(minutes=3)
    base.SOPClassUID = CTImageStorage
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = number
    base.SeriesDate = acq.strftime("%Y%m%d")
    base.SeriesTime = acq.strftime("%H%M%S")
    base.SeriesDescription = description
    base.ProtocolName = descriptions.protocol
    base.BodyPartExamined = descriptions.body_part
    base.FrameOfReferenceUID = frame_uid
    base.PositionReferenceIndicator = ""
    base.AcquisitionNumber = 1
    base.AcquisitionDate = acq.strftime("%Y%m%d")
    base.AcquisitionTime = acq.strftime("%H%M%S")
    base.AcquisitionDateTime = acq.strftime("%Y%m%d%H%M%S")
    base.ContentDate = acq.strftime("%Y%m%d")
    base.ContentTime = (acq + dt.timedelta(seconds=40)).strftime("%H%M%S")
    base.SliceThickness = _ds(phantom.slice_thickness)
    base.SpacingBetweenSlices = _ds(phantom.spacing[0])
    _ct_acquisition(base, phantom, kernel_name, options)
    t = np.radians(options.gantry_tilt_deg)
    base.ImageOrientationPatient = [1, 0, 0, 0, _ds(float(np.cos(t))), _ds(float(np.sin(t)))]
    base.PixelSpacing = [_ds(phantom.spacing[1]), _ds(phantom.spacing[2])]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = phantom.shape[1], phantom.shape[2]
    base.BitsAllocated = 16
    bits = 16 if options.signed_pixels else 12
    base.BitsStored = bits
    base.HighBit = bits - 1
    base.PixelRepresentation = 1 if options.signed_pixels else 0
    base.RescaleSlope = "1"
    base.RescaleType = "HU"
    base.WindowCenter = ["500", "40"] if kernel_name == "BONE" else ["40", "500"]
    base.WindowWidth = ["2000", "400"] if kernel_name == "BONE" else ["400", "2000"]
    base.WindowCenterWidthExplanation = (["BONE", "SOFT TISSUE"] if kernel_name == "BONE"
                                         else ["SOFT TISSUE", "BONE"])
    base.BurnedInAnnotation = "NO"
    base.LossyImageCompression = "00"
    base.PatientOrientation = ["L", "P"]

    kept = _kept_slices(phantom, options)
    rng = random.Random(phantom.options.seed * 101 + 7)
    no_ipp = set(rng.sample(kept, min(options.missing_ipp, len(kept)))) \
        if options.missing_ipp else set()
    syntax = options.transfer_syntax
    paths: list[Path] = []
    used: set[str] = set()
    datasets: list[Dataset] = []
    for k in kept:
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = _uid(phantom, options, "instance", series_uid, k)
        ds.InstanceNumber = instance_number_of(phantom, k, options)
        x, y, z = phantom.slice_position(k)
        if k not in no_ipp:
            ds.ImagePositionPatient = [_ds(x), _ds(y), _ds(z)]
        ds.SliceLocation = _ds(z)
        stored, intercept = _stored(volume[k], options)
        ds.RescaleIntercept = str(intercept)
        ds.SmallestImagePixelValue = int(stored.min())
        ds.LargestImagePixelValue = int(stored.max())
        if syntax.compressed:
            ds.PixelData = encapsulate(encode_frames([stored], syntax, bits,
                                                     options.signed_pixels))
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = stored.tobytes()
            ds["PixelData"].VR = "OW"
        ds.file_meta = _file_meta(CTImageStorage, ds.SOPInstanceUID, syntax.uid)
        datasets.append(ds)
    order = list(range(len(datasets)))
    if options.shuffle:
        rng.shuffle(order)
    dup = set(rng.sample(order, min(options.duplicates, len(order)))) if options.duplicates \
        else set()
    for i in order:
        ds = datasets[i]
        name = _file_name(ds, options, rng, used)
        used.add(name)
        path = out / name
        _save(ds, path)
        paths.append(path)
        if i in dup:
            dup_path = out / f"dup_{name}"
            _save(ds, dup_path)
            paths.append(dup_path)
    logger.info("wrote %d instances of series %s (%s)", len(paths), series_uid[-12:],
                syntax.value)
    return paths


def _write_multiframe(phantom: Phantom, out: Path, options: WriterOptions, volume: np.ndarray,
                      series_uid: str, frame_uid: str, descriptions: Descriptions,
                      description: str, number: int, kernel: str) -> Path:
    from service.synthetic.enhanced import build_enhanced_ct, build_legacy_converted

    kept = _kept_slices(phantom, options)
    if options.instance_order == "head_first":
        kept = kept[::-1]
    common = _common(phantom, options, descriptions)
    if options.multiframe == MultiFrame.ENHANCED:
        ds = build_enhanced_ct(phantom, options, volume, kept, common, series_uid, frame_uid,
                               description, number, kernel,
                               _uid(phantom, options, "enhanced", series_uid))
    else:
        single = Path(tempfile.mkdtemp(prefix="cspine-legacy-"))
        try:
            plain = WriterOptions(**{**options.__dict__, "multiframe": MultiFrame.NONE,
                                     "transfer_syntax": TransferSyntax.EXPLICIT_VR_LE,
                                     "shuffle": False, "duplicates": 0, "missing_ipp": 0,
                                     "gantry_tilt_deg": 0.0})
            paths = write_series(phantom, single, plain, kernel=kernel,
                                 series_description=description, series_number=number,
                                 hu=volume)
            ds = build_legacy_converted([dcmread(p) for p in paths], series_uid, number,
                                        _uid(phantom, options, "legacy", series_uid),
                                        options.transfer_syntax.uid)
        finally:
            for p in single.glob("*"):
                p.unlink()
            single.rmdir()
    path = out / f"{ds.SOPInstanceUID}.dcm"
    _save(ds, path)
    return path


def write_study(phantom: Phantom, out_dir: Path | str, options: WriterOptions | None = None
                ) -> list[WrittenSeries]:
    """Write the CT series plus the extra series ``options`` asks for, each in its own
    sub-directory named after its role ('ct', 'soft', 'localizer', 'non_ct')."""
    options = options or WriterOptions()
    out = Path(out_dir)
    descriptions = _descriptions(phantom, options)
    written: list[WrittenSeries] = []
    paths = write_series(phantom, out / "ct", options)
    written.append(WrittenSeries(_series_uid_of(paths[0]), "CT", descriptions.series, "ct",
                                 paths))
    if options.soft_kernel_series:
        soft = soft_kernel_volume(phantom)
        soft_opts = WriterOptions(**{**options.__dict__, "duplicates": 0, "missing_ipp": 0,
                                     "missing_slices": 0, "multiframe": MultiFrame.NONE})
        desc = descriptions.series.replace("BONE", "SOFT").replace("Bone", "Soft") \
            if "one" in descriptions.series.lower() else descriptions.series + " SOFT"
        sp = write_series(phantom, out / "soft", soft_opts, kernel="SOFT",
                          series_description=desc, series_number=options.series_number + 1,
                          role="soft", hu=soft)
        written.append(WrittenSeries(_series_uid_of(sp[0]), "CT", desc, "soft", sp))
    if options.localizer:
        from service.synthetic.extra_series import write_localizer

        lp = write_localizer(phantom, out / "localizer", options)
        written.append(WrittenSeries(_series_uid_of(lp), "CT", "Topogram 0.6 T20s",
                                     "localizer", [lp]))
    if options.non_ct_series:
        from service.synthetic.extra_series import write_dose_report

        npath = write_dose_report(phantom, out / "non_ct", options)
        written.append(WrittenSeries(_series_uid_of(npath), "OT", "Dose Report", "non_ct",
                                     [npath]))
    return written


def _series_uid_of(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
               .SeriesInstanceUID)


def soft_kernel_volume(phantom: Phantom) -> np.ndarray:
    """The same acquisition reconstructed with a soft-tissue kernel: an in-plane Gaussian
    (sigma 0.55 mm) that blurs edges and lowers the bone-kernel noise about fourfold."""
    from scipy.ndimage import gaussian_filter

    sigma_px = 0.55 / phantom.spacing[1]
    out = np.empty_like(phantom.hu)
    for k in range(phantom.shape[0]):
        out[k] = np.rint(gaussian_filter(phantom.hu[k].astype(np.float32), sigma_px))
    return out


def dataset_sequence(items: list[Dataset]) -> DicomSequence:
    return DicomSequence(items)
