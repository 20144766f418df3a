"""What the model says about one series: the contract between inference and results.

A low module (numpy and ``service.outcomes`` only) so that the results, the worklist policy
and the web app read findings without importing the model side (``service.inference``).

Coordinates: every index is into the sorted ``Volume`` array, order (z, y, x), where z is
the slice index after sorting along the slice normal (see ``service.imaging.volume``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.outcomes import AnalysisResult, failure_codes

VERTEBRAE: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
"""Label value ``i + 1`` in a label map is ``VERTEBRAE[i]``; 0 is background."""


@dataclass(frozen=True)
class VertebraFinding:
    vertebra: str
    in_view: bool
    probability: float | None
    """Fracture probability in [0, 1]; None when the vertebra is not in view."""
    suspected: bool
    """Above the vertebra threshold *and* vouched for by the anatomical gate: only such a
    vertebra raises a flag."""
    slice_range: tuple[int, int] | None = None
    """Inclusive first and last z index where the vertebra was segmented."""
    bbox: tuple[int, int, int, int, int, int] | None = None
    """Voxel box (z0, y0, x0, z1, y1, x1), end-exclusive."""
    key_slices: tuple[int, ...] = ()
    """z indices with the highest per-slice fracture scores (for key images)."""
    slice_scores: tuple[float, ...] = ()
    plausible: bool | None = None
    """The level passed the anatomical gate in a sound column (None when not in view)."""
    plausibility_reasons: tuple[str, ...] = ()
    """Codes of the gate's rules this level (or its column) failed."""
    above_threshold: bool = False
    """Probability at or above the vertebra threshold (whatever the gate said)."""


@dataclass
class Findings:
    series_instance_uid: str
    model_name: str
    model_version: str
    vertebrae: list[VertebraFinding]
    patient_probability: float
    patient_suspected: bool
    vertebra_threshold: float
    patient_threshold: float
    label_map: np.ndarray | None = None
    """uint8 (z, y, x) at the volume's resolution: 0 background, 1..7 = C1..C7."""
    execution_provider: str | None = None
    stage_durations: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    source_fingerprint: str = ""
    """Digest of the SOP Instance UIDs the model saw (:func:`instances_fingerprint`)."""
    result: AnalysisResult = AnalysisResult.NO_FRACTURE_FOUND
    """The answer: a flag only from vouched levels; INCONCLUSIVE when the gate failed and
    nothing vouched for was flagged."""
    anatomy: dict[str, object] = field(default_factory=dict)
    """The gate's report (``AnatomyReport.as_dict()``): failures, per-level measures."""
    model_patient_suspected: bool = False
    """What the classifier alone would have said at the patient threshold (before the
    gate): kept for evaluation and for the audit trail, never for flagging."""

    @property
    def inconclusive_reasons(self) -> list[str]:
        """The failed rules (``LEVELS_OUT_OF_ORDER``, ``LEVEL_EXTENT_OUT_OF_RANGE:C5``...)."""
        return failure_codes(self.anatomy)

    @property
    def inconclusive_text(self) -> list[str]:
        """One English sentence per failed rule (for the SR, HL7 and the dashboard)."""
        failures = self.anatomy.get("failures", []) if self.anatomy else []
        return [(f"{f['code']} ({f['level']}: {f['detail']})" if f.get("level")
                 else f"{f['code']} ({f['detail']})")
                for f in (failures if isinstance(failures, list) else [])]

    @property
    def uid_source(self) -> str:
        """What result UIDs derive from: the series *and* the instances analysed.

        A re-run on the same instances reproduces its result UIDs (the PACS replaces, never
        duplicates); a series re-analysed after more instances arrived gets new ones, since
        DICOM forbids one SOP Instance UID for two different contents.
        """
        if not self.source_fingerprint:
            return self.series_instance_uid
        return f"{self.series_instance_uid}/{self.source_fingerprint}"

    @property
    def suspected_vertebrae(self) -> list[str]:
        return [v.vertebra for v in self.vertebrae if v.suspected]

    @property
    def in_view(self) -> list[str]:
        return [v.vertebra for v in self.vertebrae if v.in_view]


def instances_fingerprint(sop_instance_uids: Iterable[str]) -> str:
    """Order-independent digest (16 hex digits) of a set of SOP Instance UIDs."""
    digest = hashlib.sha256("\n".join(sorted(set(sop_instance_uids))).encode())
    return digest.hexdigest()[:16]
