"""Synthetic cervical-spine CT phantoms with fractures and mimics, written as DICOM.

No real patient CT can be downloaded here, so the project makes its own test and training
data. Public API (stable; other packages and the model code depend on it):

* :class:`PhantomOptions`, :func:`random_options` - what to generate;
* :func:`generate_phantom` -> :class:`Phantom` - HU volume (int16, z/y/x, z ascending =
  inferior to superior), vertebra labels (uint8: 1..7 = C1..C7, 8+ = T1...), geometry
  (spacing (dz, dy, dx) mm, ``origin`` = LPS mm of voxel (0, 0, 0)), and ground truth
  (:class:`FractureTruth`, :class:`MimicTruth`, ``vertebra_fractured``, ``patient_fractured``);
* :class:`WriterOptions`, :func:`write_series`, :func:`write_study` - DICOM series/study;
* :func:`write_rsna_layout` - the RSNA 2022 competition layout (see ``rsna`` for the NIfTI
  orientation quirk, reproduced exactly).

Runtime dependencies: numpy and scipy for the phantom; pydicom, highdicom, python-gdcm
(JPEG Lossless encoding), nibabel for the writers. Everything here is synthetic: never
present results on these phantoms as clinical ones.
"""

from service.synthetic.dicom_writer import (
    DESCRIPTION_VARIANTS,
    MultiFrame,
    TransferSyntax,
    WriterOptions,
    WrittenSeries,
    instance_number_of,
    soft_kernel_volume,
    study_uid,
    write_series,
    write_study,
)
from service.synthetic.options import (
    FRACTURE_LEVELS,
    LABEL_OF,
    MIMIC_LEVELS,
    THORACIC_NAMES,
    VERTEBRA_NAMES,
    FractureSpec,
    FractureTruth,
    FractureType,
    Kernel,
    MimicSpec,
    MimicTruth,
    MimicType,
    PatientInfo,
    PhantomOptions,
    random_options,
)
from service.synthetic.phantom import Phantom, generate_phantom
from service.synthetic.rsna import nifti_affine, write_rsna_layout

__all__ = [
    "DESCRIPTION_VARIANTS",
    "FRACTURE_LEVELS",
    "LABEL_OF",
    "MIMIC_LEVELS",
    "THORACIC_NAMES",
    "VERTEBRA_NAMES",
    "FractureSpec",
    "FractureTruth",
    "FractureType",
    "Kernel",
    "MimicSpec",
    "MimicTruth",
    "MimicType",
    "MultiFrame",
    "PatientInfo",
    "Phantom",
    "PhantomOptions",
    "TransferSyntax",
    "WriterOptions",
    "WrittenSeries",
    "generate_phantom",
    "instance_number_of",
    "nifti_affine",
    "random_options",
    "soft_kernel_volume",
    "study_uid",
    "write_rsna_layout",
    "write_series",
    "write_study",
]
