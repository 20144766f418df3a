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
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
)

from service.synthetic.dicom_base import (
    DESCRIPTION_VARIANTS,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    Descriptions,
    MultiFrame,
    TransferSyntax,
    WriterOptions,
    common_attributes,
    ct_acquisition,
    descriptions_for,
    deterministic_uid,
    ds_string,
    encode_frames,
    make_file_meta,
    phantom_uid,
    save_dataset,
    stored_values,
    study_datetime,
    study_uid,
)
from service.synthetic.enhanced import build_enhanced_ct, build_legacy_converted
from service.synthetic.extra_series import write_dose_report, write_localizer
from service.synthetic.phantom import Phantom

__all__ = ["DESCRIPTION_VARIANTS", "IMPLEMENTATION_CLASS_UID", "IMPLEMENTATION_VERSION",
           "MultiFrame", "TransferSyntax", "WriterOptions", "WrittenSeries", "deterministic_uid",
           "encode_frames", "instance_number_of", "soft_kernel_volume", "study_uid",
           "write_series", "write_study"]

logger = logging.getLogger(__name__)

@dataclass
class WrittenSeries:
    series_instance_uid: str
    modality: str
    description: str
    role: str
    """'ct' (the analysable series), 'soft', 'localizer', 'non_ct'."""
    paths: list[Path] = field(default_factory=list)


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
    descriptions = descriptions_for(phantom, options)
    kernel_name = kernel or phantom.kernel
    description = series_description or descriptions.series
    number = series_number if series_number is not None else options.series_number
    series_uid = phantom_uid(phantom, options, "series", role, kernel_name, options.multiframe,
                      options.gantry_tilt_deg)
    frame_uid = phantom_uid(phantom, options, "frame-of-reference")
    volume = hu if hu is not None else phantom.hu
    if options.gantry_tilt_deg:
        shifted = Phantom(**{**phantom.__dict__, "hu": volume})
        volume = _tilted_volume(shifted, options.gantry_tilt_deg)
    if options.multiframe != MultiFrame.NONE:
        return [_write_multiframe(phantom, out, options, volume, series_uid, frame_uid,
                                  descriptions, description, number, kernel_name)]

    base = common_attributes(phantom, options, descriptions)
    when = study_datetime(phantom)
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
    base.SliceThickness = ds_string(phantom.slice_thickness)
    base.SpacingBetweenSlices = ds_string(phantom.spacing[0])
    ct_acquisition(base, phantom, kernel_name, options)
    t = np.radians(options.gantry_tilt_deg)
    base.ImageOrientationPatient = [1, 0, 0, 0, ds_string(float(np.cos(t))),
                                    ds_string(float(np.sin(t)))]
    base.PixelSpacing = [ds_string(phantom.spacing[1]), ds_string(phantom.spacing[2])]
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
        ds.SOPInstanceUID = phantom_uid(phantom, options, "instance", series_uid, k)
        ds.InstanceNumber = instance_number_of(phantom, k, options)
        x, y, z = phantom.slice_position(k)
        if k not in no_ipp:
            ds.ImagePositionPatient = [ds_string(x), ds_string(y), ds_string(z)]
        ds.SliceLocation = ds_string(z)
        stored, intercept = stored_values(volume[k], options)
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
        ds.file_meta = make_file_meta(CTImageStorage, ds.SOPInstanceUID, syntax.uid)
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
        save_dataset(ds, path)
        paths.append(path)
        if i in dup:
            dup_path = out / f"dup_{name}"
            save_dataset(ds, dup_path)
            paths.append(dup_path)
    logger.info("wrote %d instances of series %s (%s)", len(paths), series_uid[-12:],
                syntax.value)
    return paths


def _write_multiframe(phantom: Phantom, out: Path, options: WriterOptions, volume: np.ndarray,
                      series_uid: str, frame_uid: str, descriptions: Descriptions,
                      description: str, number: int, kernel: str) -> Path:
    kept = _kept_slices(phantom, options)
    if options.instance_order == "head_first":
        kept = kept[::-1]
    common = common_attributes(phantom, options, descriptions)
    if options.multiframe == MultiFrame.ENHANCED:
        ds = build_enhanced_ct(phantom, options, volume, kept, common, series_uid, frame_uid,
                               description, number, kernel,
                               phantom_uid(phantom, options, "enhanced", series_uid))
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
                                        phantom_uid(phantom, options, "legacy", series_uid),
                                        options.transfer_syntax.uid)
        finally:
            for p in single.glob("*"):
                p.unlink()
            single.rmdir()
    path = out / f"{ds.SOPInstanceUID}.dcm"
    save_dataset(ds, path)
    return path


def write_study(phantom: Phantom, out_dir: Path | str, options: WriterOptions | None = None
                ) -> list[WrittenSeries]:
    """Write the CT series plus the extra series ``options`` asks for, each in its own
    sub-directory named after its role ('ct', 'soft', 'localizer', 'non_ct')."""
    options = options or WriterOptions()
    out = Path(out_dir)
    descriptions = descriptions_for(phantom, options)
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
        lp = write_localizer(phantom, out / "localizer", options)
        written.append(WrittenSeries(_series_uid_of(lp), "CT", "Topogram 0.6 T20s",
                                     "localizer", [lp]))
    if options.non_ct_series:
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
