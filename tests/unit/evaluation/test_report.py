"""Report assembly from per-study results (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.evaluation.report import StudyResult, choose_thresholds, summarize, write_report


def _result(uid: str, labels: list[int], probs: list[float], threshold: float = 0.5,
            mimics: list[tuple[str, str | None]] | None = None,
            error: str | None = None, warnings: list[str] | None = None) -> StudyResult:
    p = np.array(probs, dtype=float)
    return StudyResult(
        uid=uid, labels=np.array(labels, dtype=float), probabilities=p,
        in_view=[True] * 7, suspected=[bool(v >= threshold) for v in p[1:]],
        patient_suspected=bool(p[0] >= threshold),
        dice={"C1": 0.9, "C2": 0.8, "C3": None, "C4": 0.85, "C5": 0.8, "C6": 0.75, "C7": 0.7},
        durations={"load": 1.0, "preprocess": 0.5, "segmentation": 1.0, "classification": 0.2},
        mimics=mimics or [], error=error, warnings=warnings or [])


@pytest.fixture
def results() -> list[StudyResult]:
    rows = [
        # fractured C2, found
        _result("1", [1, 0, 1, 0, 0, 0, 0, 0], [0.9, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]),
        # fractured C6, missed
        _result("2", [1, 0, 0, 0, 0, 0, 1, 0], [0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.3, 0.1]),
        # negative with a nutrient foramen at C4 that fooled the model
        _result("3", [0, 0, 0, 0, 0, 0, 0, 0], [0.7, 0.1, 0.1, 0.1, 0.7, 0.1, 0.1, 0.1],
                mimics=[("nutrient_foramen", "C4")]),
        # negative with a nutrient foramen at C5, correctly negative
        _result("4", [0, 0, 0, 0, 0, 0, 0, 0], [0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.1, 0.1],
                mimics=[("nutrient_foramen", "C5"), ("shoulder_streak", None)]),
        # plain negative
        _result("5", [0, 0, 0, 0, 0, 0, 0, 0], [0.1] * 8,
                warnings=["LEVELS_OUT_OF_ORDER", "PARTIAL_VERTEBRA:C7"]),
        # could not be loaded
        _result("6", [1, 1, 0, 0, 0, 0, 0, 0], [0.0] * 8, error="MISSING_SLICES: gap",
                warnings=["LEVELS_OUT_OF_ORDER"]),
    ]
    return rows


def test_summary_counts_and_metrics(results: list[StudyResult]) -> None:
    s = summarize(results, patient_threshold=0.5, vertebra_threshold=0.5,
                  model={"model": "m", "version": "1"}, dataset="d")
    assert s["studies"] == 6 and s["processed"] == 5
    assert s["not_processed"] == [{"uid": "6", "reason": "MISSING_SLICES: gap"}]
    assert s["patient"]["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 1}
    assert s["patient"]["sensitivity"]["value"] == pytest.approx(0.5)
    assert s["patient"]["specificity"]["value"] == pytest.approx(2 / 3)
    for key in ("sensitivity", "specificity", "ppv", "npv", "kappa"):
        assert {"value", "low", "high"} <= set(s["patient"][key])
    assert s["per_vertebra_auc"]["C1"]["value"] is None  # no positive C1 among processed
    assert s["per_vertebra_auc"]["C2"]["value"] == pytest.approx(1.0)
    assert s["rsna_weighted_log_loss"] > 0
    assert s["segmentation_dice"]["C3"]["studies"] == 0
    assert s["segmentation_dice"]["C1"]["value"] == pytest.approx(0.9)
    nf = s["mimics"]["nutrient_foramen"]
    assert nf == {"studies": 2, "negative_studies": 2, "patient_false_positives": 1,
                  "unfractured_vertebrae_with_mimic": 2, "vertebra_false_positives": 1}
    assert s["mimics"]["shoulder_streak"]["unfractured_vertebrae_with_mimic"] == 0
    assert s["mimics"]["_no_mimic_negative_studies"] == {"studies": 1,
                                                         "patient_false_positives": 0}
    assert s["stage_seconds_median"]["load"] == 1.0
    # Per processed study (study 6 was not processed).
    assert s["warnings"] == {"LEVELS_OUT_OF_ORDER": 1, "PARTIAL_VERTEBRA:C7": 1}
    assert s["total_seconds_median"] == pytest.approx(2.7)


def test_written_report(results: list[StudyResult], tmp_path: Path) -> None:
    s = summarize(results, patient_threshold=0.5, vertebra_threshold=0.5, dataset="d")
    paths = write_report(s, results, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["patient"]["kappa"]["value"] == pytest.approx(s["patient"]["kappa"]["value"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "synthetic phantoms" in md and "| sensitivity |" in md and "nutrient_foramen" in md
    with Image.open(tmp_path / "out" / "roc.png") as img:
        assert img.size == (640, 640)
    rows = (tmp_path / "out" / "studies.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("StudyInstanceUID")
    assert rows[0].split(",")[-4:] == ["warnings", "seconds", "result", "inconclusive_reasons"]
    assert rows[5].split(",")[-4] == "LEVELS_OUT_OF_ORDER;PARTIAL_VERTEBRA:C7"
    assert "- LEVELS_OUT_OF_ORDER: 1" in md
    assert len(paths) == 4


def test_inconclusive_counted_apart_and_sensitivity_both_ways(tmp_path: Path) -> None:
    """Six studies: the classifier alone flags four; the gate makes two INCONCLUSIVE (one
    fractured, one not) and lets the other two flags stand."""
    def gated(uid: str, label: int, p: float, result: str,
              reasons: list[str] | None = None) -> StudyResult:
        r = _result(uid, [label] + [0] * 7, [p] + [0.1] * 7)
        r.result = result
        r.patient_suspected = result == "FRACTURE_SUSPECTED"
        r.model_patient_suspected = p >= 0.5
        r.inconclusive_reasons = reasons or []
        return r

    results = [
        gated("1", 1, 0.9, "FRACTURE_SUSPECTED"),
        gated("2", 1, 0.9, "INCONCLUSIVE", ["LEVELS_OUT_OF_ORDER"]),
        gated("3", 1, 0.2, "NO_FRACTURE_FOUND"),
        gated("4", 0, 0.9, "INCONCLUSIVE", ["LEVELS_OUT_OF_ORDER", "LEVEL_NOT_BONE:C3"]),
        gated("5", 0, 0.1, "NO_FRACTURE_FOUND"),
        gated("6", 0, 0.8, "FRACTURE_SUSPECTED"),
    ]
    gate = summarize(results, patient_threshold=0.5, vertebra_threshold=0.5)["gate"]
    assert gate["inconclusive"]["numerator"] == 2 and gate["inconclusive"]["denominator"] == 6
    assert (gate["inconclusive_positives"], gate["inconclusive_negatives"]) == (1, 1)
    alone = gate["model_alone"]
    assert alone["confusion"] == {"tp": 2, "fp": 2, "tn": 1, "fn": 1}
    as_negative = gate["inconclusive_as_negative"]
    assert as_negative["confusion"] == {"tp": 1, "fp": 1, "tn": 2, "fn": 2}
    assert as_negative["sensitivity"]["value"] == pytest.approx(1 / 3)
    excluded = gate["inconclusive_excluded"]
    assert excluded["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert gate["reasons"] == {"LEVELS_OUT_OF_ORDER": 2, "LEVEL_NOT_BONE:C3": 1}
    s = summarize(results, patient_threshold=0.5, vertebra_threshold=0.5)
    write_report(s, results, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "INCONCLUSIVE (analysed, neither flagged nor cleared): 33.3 %" in md
    assert "| INCONCLUSIVE excluded | 50.0 %" in md


def test_choose_thresholds_uses_processed_studies(results: list[StudyResult]) -> None:
    chosen = choose_thresholds(results, min_sensitivity=0.95)
    assert chosen["sensitivity"] == 1.0
    assert chosen["patient"] == chosen["vertebra"]
    assert 0.2 < chosen["patient"] <= 0.3  # below the missed case's 0.3, above 0.2
    assert chosen["studies"] == 5
