"""How the pipeline turns the gate's report and the classifier's scores into the answer.

The segmentation and the classifier are stand-ins that return prescribed outputs (the real
sessions are exercised in ``test_pipeline.py``); everything between them is the served code:
label cleaning, the gate, the flag rule.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from service.config import Settings
from service.imaging.volume import Volume
from service.inference.manifest import load_manifest
from service.inference.pipeline import run_pipeline
from service.inference.runtime import ModelRuntime
from service.outcomes import AnalysisResult
from tests.unit.inference.conftest import MODEL_DIR
from tests.unit.inference.test_plausibility import LEVELS, SHAPE, SPACING, _box, column


class _Segmenter:
    """Answers every call with the one-hot of a fixed label map (padded like the input)."""

    provider = "CPUExecutionProvider"

    def __init__(self, labels: np.ndarray, classes: int) -> None:
        self.labels = labels
        self.classes = classes

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        z, y, w = x.shape[2:]
        padded = np.zeros((z, y, w), np.uint8)
        padded[:self.labels.shape[0], :self.labels.shape[1], :self.labels.shape[2]] = self.labels
        probabilities = np.zeros((1, self.classes, z, y, w), np.float32)
        for c in range(self.classes):
            probabilities[0, c] = padded == c
        return [probabilities]


class _Classifier:
    """Gives each vertebra crop a prescribed probability, in the order the crops come."""

    provider = "CPUExecutionProvider"

    def __init__(self, probabilities: list[float]) -> None:
        self.queue = probabilities

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        n, slices = batch.shape[0], batch.shape[1]
        p = np.array(self.queue[:n], np.float32)
        return [p, np.tile(p[:, None], (1, slices))]


def _run(labels: np.ndarray, hu: np.ndarray, probabilities: list[float]):  # type: ignore[no-untyped-def]
    manifest = load_manifest(MODEL_DIR)
    runtime = ModelRuntime(model_dir=MODEL_DIR, manifest=manifest,
                           seg=_Segmenter(labels, len(manifest.preprocessing.seg_classes)),  # type: ignore[arg-type]
                           frac=_Classifier(probabilities))  # type: ignore[arg-type]
    hu = np.where(hu > 0, hu, -1000).astype(np.float32)
    n = hu.shape[0]
    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])[[2, 1, 0, 3]]
    volume = Volume(hu=hu, spacing=SPACING, affine=affine,
                    sop_instance_uids=[f"1.2.3.{i}" for i in range(n)],
                    frame_numbers=[None] * n, headers=[], study_instance_uid="1.2.3",
                    series_instance_uid="1.2.3.4", frame_of_reference_uid=None,
                    acquired_at=datetime(2026, 1, 1, tzinfo=UTC))
    settings = Settings(model_dir=MODEL_DIR)
    return run_pipeline(volume, runtime, settings)


def test_the_affine_makes_z_the_head() -> None:
    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])[[2, 1, 0, 3]]
    # (z, y, x) -> LPS: z index along +S.
    np.testing.assert_allclose(affine[:3, :3] @ [1, 0, 0], [0, 0, 2.5])


def test_a_sound_column_flags_the_vertebra_above_threshold() -> None:
    labels, hu = column()
    findings = _run(labels, hu, [0.05, 0.05, 0.05, 0.05, 0.97, 0.05, 0.05])
    assert findings.result is AnalysisResult.FRACTURE_SUSPECTED
    assert findings.suspected_vertebrae == ["C5"]
    assert findings.patient_suspected and findings.inconclusive_reasons == []
    assert all(v.plausible for v in findings.vertebrae)


def test_a_sound_column_without_a_finding_is_no_fracture_found() -> None:
    labels, hu = column()
    findings = _run(labels, hu, [0.05] * 7)
    assert findings.result is AnalysisResult.NO_FRACTURE_FOUND
    assert findings.suspected_vertebrae == [] and not findings.patient_suspected


def test_out_of_order_is_inconclusive_never_stat_however_high_the_score() -> None:
    levels = dict(LEVELS)
    levels["C3"], levels["C5"] = LEVELS["C5"], LEVELS["C3"]
    labels, hu = column(levels)
    findings = _run(labels, hu, [0.99] * 7)
    assert findings.result is AnalysisResult.INCONCLUSIVE
    assert findings.suspected_vertebrae == [] and not findings.patient_suspected
    assert findings.model_patient_suspected  # the classifier alone would have said STAT
    assert "LEVELS_OUT_OF_ORDER" in findings.inconclusive_reasons
    assert all(v.above_threshold and v.plausible is False and
               "LEVELS_OUT_OF_ORDER" in v.plausibility_reasons
               for v in findings.vertebrae if v.in_view)


def test_a_failed_level_never_flags_but_a_vouched_one_still_does() -> None:
    labels, hu = column()
    # A second "C3" as large as the first beside the column: the served map keeps one,
    # the gate cannot say which is C3.
    _box(labels, hu, 3, 50.0, 67.5, 8.75, (60.0, 100.0))
    findings = _run(labels, hu, [0.05, 0.05, 0.99, 0.05, 0.05, 0.05, 0.05])
    assert findings.result is AnalysisResult.INCONCLUSIVE
    assert findings.inconclusive_reasons == ["LEVEL_FRAGMENTED:C3"]
    c3 = findings.vertebrae[2]
    assert c3.above_threshold and not c3.suspected and c3.plausible is False
    # C6 above threshold in the same sound column: flagged on C6 alone.
    findings = _run(labels, hu, [0.05, 0.05, 0.99, 0.05, 0.05, 0.97, 0.05])
    assert findings.result is AnalysisResult.FRACTURE_SUSPECTED
    assert findings.suspected_vertebrae == ["C6"]


def test_a_level_without_bone_leaves_a_gap_in_the_column() -> None:
    labels, hu = column()
    hu[labels == 3] = 40  # C3's mask holds soft tissue: not in view, the column has a gap
    findings = _run(labels, hu, [0.05, 0.05, 0.05, 0.05, 0.05, 0.97])
    assert "SEGMENTED_LEVEL_WITHOUT_BONE:C3" in findings.warnings
    assert findings.result is AnalysisResult.INCONCLUSIVE
    assert findings.inconclusive_reasons == ["LEVEL_SEQUENCE_GAP"]
    assert findings.suspected_vertebrae == []


@pytest.mark.parametrize("shape", [SHAPE])
def test_nothing_in_view_is_inconclusive(shape: tuple[int, int, int]) -> None:
    labels = np.zeros(shape, np.uint8)
    findings = _run(labels, np.zeros(shape, np.float32), [])
    assert findings.result is AnalysisResult.INCONCLUSIVE and findings.in_view == []
