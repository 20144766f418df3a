"""``triage evaluate`` end to end: an RSNA-layout directory through the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main
from service.synthetic import (
    FractureSpec,
    FractureType,
    MimicSpec,
    MimicType,
    generate_phantom,
    random_options,
    write_rsna_layout,
)

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "cspine-v1"

pytestmark = pytest.mark.slow


def test_triage_evaluate_writes_the_report(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fractured = random_options(31, matrix=128)
    fractured.fractures = [FractureSpec(FractureType.BODY, "C6")]
    mimic = random_options(32, matrix=128)
    mimic.fractures = 0
    mimic.mimics = [MimicSpec(MimicType.NUTRIENT_FORAMEN, "C4")]
    # Two dataset directories (a test set generated in parallel chunks): one report.
    first, second = tmp_path / "rsna-a", tmp_path / "rsna-b"
    write_rsna_layout(first, [generate_phantom(fractured)])
    write_rsna_layout(second, [generate_phantom(mimic)])
    out = tmp_path / "report"
    code = main(["evaluate", str(first), str(second), "--out", str(out),
                 "--model-dir", str(MODEL_DIR), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["studies"] == 2 and printed["processed"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["synthetic"] is True
    assert report["dataset"] == f"{first},{second}"
    for key in ("sensitivity", "specificity", "ppv", "npv", "kappa"):
        assert {"value", "low", "high"} <= set(report["patient"][key])
    assert set(report["per_vertebra_auc"]) == {f"C{i}" for i in range(1, 8)}
    assert report["rsna_weighted_log_loss"] > 0
    assert report["mimics"]["nutrient_foramen"]["studies"] == 1
    assert report["segmentation_dice"]["C6"]["studies"] >= 1
    assert report["model"]["execution_provider"] == "CPUExecutionProvider"
    assert (out / "roc.png").stat().st_size > 0
    assert "Patient level" in (out / "report.md").read_text()
