"""Multi-frame CT: Enhanced CT Image Storage (built here, functional group by functional
group, as a scanner writes it) and Legacy Converted Enhanced CT (built by highdicom).

Frame order: the frames follow ``kept`` (phantom z indices in the order given by the
caller), each frame's PlanePositionSequence holds its ImagePositionPatient (LPS mm), and
InStackPositionNumber counts 1..n in that order within stack "1".
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

import numpy as np
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, EnhancedCTImageStorage

from service.synthetic.dicom_base import (
    IMPLEMENTATION_CLASS_UID,
    WriterOptions,
    ct_acquisition,
    descriptions_for,
    deterministic_uid,
    ds_string,
    encode_frames,
    make_file_meta,
    stored_values,
    study_datetime,
)

if TYPE_CHECKING:
    from service.synthetic.phantom import Phantom

logger = logging.getLogger(__name__)


def _item(**kwargs: object) -> Dataset:
    ds = Dataset()
    for key, value in kwargs.items():
        setattr(ds, key, value)
    return ds


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def build_enhanced_ct(phantom: Phantom, options: WriterOptions, volume: np.ndarray,
                      kept: list[int], common: Dataset, series_uid: str, frame_uid: str,
                      description: str, number: int, kernel: str, sop_uid: str) -> Dataset:
    descriptions = descriptions_for(phantom, options)
    when = study_datetime(phantom) + dt.timedelta(minutes=3)
    acq = Dataset()
    ct_acquisition(acq, phantom, kernel, options)
    ds = common
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = description
    ds.ProtocolName = descriptions.protocol
    ds.BodyPartExamined = descriptions.body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S")
    ds.AcquisitionDuration = 4.5
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ContentQualification = "PRODUCT"
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = phantom.shape[1], phantom.shape[2]
    ds.BitsAllocated = 16
    bits = 16 if options.signed_pixels else 12
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if options.signed_pixels else 0
    ds.NumberOfFrames = len(kept)

    dim_uid = deterministic_uid(options.uid_prefix, sop_uid, "dimension")
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=dim_uid))
    ds.DimensionOrganizationType = "3D"
    ds.DimensionIndexSequence = _seq(
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=Tag(0x0020, 0x9056),
              FunctionalGroupPointer=Tag(0x0020, 0x9111), DimensionDescriptionLabel="Stack ID"),
        _item(DimensionOrganizationUID=dim_uid, DimensionIndexPointer=Tag(0x0020, 0x9057),
              FunctionalGroupPointer=Tag(0x0020, 0x9111),
              DimensionDescriptionLabel="In-Stack Position Number"))

    stored_frames = [stored_values(volume[k], options)[0] for k in kept]
    intercept = stored_values(volume[kept[0]], options)[1]
    t = np.radians(options.gantry_tilt_deg)
    anatomy = _item(AnatomicRegionSequence=_seq(_item(
        CodeValue="122494005", CodingSchemeDesignator="SCT", CodeMeaning="Cervical spine")),
        FrameLaterality="U")
    shared = _item(
        PixelMeasuresSequence=_seq(_item(
            PixelSpacing=[ds_string(phantom.spacing[1]), ds_string(phantom.spacing[2])],
            SliceThickness=ds_string(phantom.slice_thickness),
            SpacingBetweenSlices=ds_string(phantom.spacing[0]))),
        PlaneOrientationSequence=_seq(_item(
            ImageOrientationPatient=[1, 0, 0, 0, ds_string(float(np.cos(t))),
                                     ds_string(float(np.sin(t)))])),
        FrameAnatomySequence=_seq(anatomy),
        PixelValueTransformationSequence=_seq(_item(
            RescaleIntercept=str(intercept), RescaleSlope="1", RescaleType="HU")),
        FrameVOILUTSequence=_seq(_item(WindowCenter="500" if kernel == "BONE" else "40",
                                       WindowWidth="2000" if kernel == "BONE" else "400")),
        CTImageFrameTypeSequence=_seq(_item(
            FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"], PixelPresentation="MONOCHROME",
            VolumetricProperties="VOLUME", VolumeBasedCalculationTechnique="NONE")),
        CTAcquisitionTypeSequence=_seq(_item(AcquisitionType="SPIRAL", ConstantVolumeFlag="NO",
                                             FluoroscopyFlag="NO")),
        CTAcquisitionDetailsSequence=_seq(_item(
            DataCollectionDiameter=acq.DataCollectionDiameter, RevolutionTime=acq.RevolutionTime,
            SingleCollimationWidth=acq.SingleCollimationWidth,
            TotalCollimationWidth=acq.TotalCollimationWidth, TableHeight=acq.TableHeight,
            GantryDetectorTilt=acq.GantryDetectorTilt, RotationDirection="CW")),
        CTTableDynamicsSequence=_seq(_item(TableSpeed=39.7, TableFeedPerRotation=20.6,
                                           SpiralPitchFactor=acq.SpiralPitchFactor)),
        CTGeometrySequence=_seq(_item(DistanceSourceToDetector=acq.DistanceSourceToDetector,
                                      DistanceSourceToDataCollectionCenter=595.0)),
        CTReconstructionSequence=_seq(_item(
            ReconstructionAlgorithm="FILTER_BACK_PROJ", ConvolutionKernel=kernel,
            ConvolutionKernelGroup="BONE" if kernel == "BONE" else "SOFT_TISSUE",
            ReconstructionDiameter=acq.ReconstructionDiameter,
            ReconstructionPixelSpacing=[float(phantom.spacing[1]), float(phantom.spacing[2])],
            ReconstructionAngle=360.0, ImageFilter="SHARP" if kernel == "BONE" else "SMOOTH")),
        CTExposureSequence=_seq(_item(
            ExposureTimeInms=float(acq.ExposureTime),
            XRayTubeCurrentInmA=float(acq.XRayTubeCurrent),
            ExposureInmAs=float(acq.Exposure), ExposureModulationType="NONE",
            CTDIvol=acq.CTDIvol,
            CTDIPhantomTypeCodeSequence=acq.CTDIPhantomTypeCodeSequence)),
        CTXRayDetailsSequence=_seq(_item(KVP=acq.KVP, FocalSpots=acq.FocalSpots,
                                         FilterType=acq.FilterType, FilterMaterial="ALUMINUM")),
        IrradiationEventIdentificationSequence=_seq(_item(
            IrradiationEventUID=deterministic_uid(options.uid_prefix, sop_uid, "irradiation"))),
    )
    ds.SharedFunctionalGroupsSequence = _seq(shared)
    per_frame = []
    frame_time = when
    for i, k in enumerate(kept):
        x, y, z = phantom.slice_position(k)
        stamp = (frame_time + dt.timedelta(milliseconds=15 * i)).strftime("%Y%m%d%H%M%S.%f")
        per_frame.append(_item(
            FrameContentSequence=_seq(_item(
                FrameAcquisitionNumber=1, FrameReferenceDateTime=stamp,
                FrameAcquisitionDateTime=stamp, FrameAcquisitionDuration=15.0,
                StackID="1", InStackPositionNumber=i + 1, DimensionIndexValues=[1, i + 1])),
            PlanePositionSequence=_seq(_item(
                ImagePositionPatient=[ds_string(x), ds_string(y), ds_string(z)])),
            CTPositionSequence=_seq(_item(TablePosition=float(z),
                                          DataCollectionCenterPatient=[0.0, 0.0, float(z)],
                                          ReconstructionTargetCenterPatient=[0.0, 0.0, float(z)])),
        ))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    syntax = options.transfer_syntax
    if syntax.compressed:
        ds.PixelData = encapsulate(encode_frames(stored_frames, syntax, bits,
                                                 options.signed_pixels))
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = np.stack(stored_frames).tobytes()
        ds["PixelData"].VR = "OW"
    ds.file_meta = make_file_meta(EnhancedCTImageStorage, sop_uid, syntax.uid)
    return ds


def build_legacy_converted(datasets: list[Dataset], series_uid: str, number: int,
                           sop_uid: str, transfer_syntax: str) -> Dataset:
    """Legacy Converted Enhanced CT Image (highdicom) from single-frame CT datasets."""
    import highdicom as hd

    datasets = sorted(datasets, key=lambda d: int(d.InstanceNumber))
    image = hd.legacy.LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=series_uid, series_number=number,
        sop_instance_uid=sop_uid, instance_number=1, transfer_syntax_uid=transfer_syntax)
    image.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    return image
