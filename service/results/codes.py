"""Every coded concept the result objects use, as named constants.

SNOMED CT (SCT) and DICOM (DCM) codes come from pydicom's code dictionary where it has them;
"Fracture" (SCT 72704001) is absent from it and is declared here. Keep literals out of the
builders: a reviewer checks codes against the standard in this one file.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.findings import VERTEBRAE

# --- anatomy (CID 7151 / CID 4) ---------------------------------------------------------------
C1_VERTEBRA: Code = codes.SCT.C1Vertebra  # 14806007
C2_VERTEBRA: Code = codes.SCT.C2Vertebra  # 39976000
C3_VERTEBRA: Code = codes.SCT.C3Vertebra  # 113205007
C4_VERTEBRA: Code = codes.SCT.C4Vertebra  # 5329002
C5_VERTEBRA: Code = codes.SCT.C5Vertebra  # 36978003
C6_VERTEBRA: Code = codes.SCT.C6Vertebra  # 36054005
C7_VERTEBRA: Code = codes.SCT.C7Vertebra  # 87391001
CERVICAL_SPINE: Code = codes.SCT.CervicalSpine  # 122494005

VERTEBRA_CODES: dict[str, Code] = dict(
    zip(
        VERTEBRAE,
        (C1_VERTEBRA, C2_VERTEBRA, C3_VERTEBRA, C4_VERTEBRA, C5_VERTEBRA, C6_VERTEBRA,
         C7_VERTEBRA),
        strict=True,
    )
)
"""Vertebra name of the Findings contract (``"C1"``..``"C7"``) -> SNOMED CT code."""

# --- findings and evaluations -------------------------------------------------------------------
FRACTURE: Code = Code("72704001", "SCT", "Fracture")
"""Finding type and qualitative-evaluation concept name (not in pydicom's dictionary)."""
PRESENT: Code = codes.SCT.Present  # 52101004
ABSENT: Code = codes.SCT.Absent  # 272519000
INDETERMINATE: Code = codes.SCT.Indeterminate  # 82334004
"""Fracture evaluation of an INCONCLUSIVE analysis: neither present nor absent."""
COMMENT: Code = codes.DCM.Comment  # DCM 121106
"""Text item naming each failed plausibility rule of an INCONCLUSIVE analysis."""
PROBABILITY: Code = codes.DCM.Probability  # DCM 122157
NO_UNITS: Code = codes.UCUM.NoUnits  # UCUM "1": a probability is dimensionless

# --- segmentation property categories (CID 7150) -----------------------------------------------
ANATOMICAL_STRUCTURE: Code = codes.cid7150.AnatomicalStructure  # SCT 91723000
MORPHOLOGICALLY_ABNORMAL_STRUCTURE: Code = codes.cid7150.MorphologicallyAbnormalStructure

# --- report framing -------------------------------------------------------------------------------
IMAGING_MEASUREMENT_REPORT: Code = codes.cid7021.ImagingMeasurementReport  # DCM 126000
CT_UNSPECIFIED_BODY_REGION: Code = codes.cid100.CTUnspecifiedBodyRegion  # LN 25045-6
"""Procedure reported (CID 100 has no cervical-spine CT procedure code)."""
ARTIFICIAL_INTELLIGENCE: Code = codes.cid7162.ArtificialIntelligence  # DCM 123110
"""Algorithm family (CID 7162) for the SEG's and SR's algorithm identification."""
DEVICE_OBSERVER: Code = codes.DCM.Device  # DCM 121007
KEY_IMAGE_DESCRIPTION: str = "Cervical spine fracture suspected (research software)"


def vertebra_code(vertebra: str) -> Code:
    """SNOMED CT code of a vertebra name from the Findings contract; KeyError on unknown names."""
    return VERTEBRA_CODES[vertebra]
