"""Evaluate the served model (ONNX Runtime, the worker's own pipeline) on an RSNA-layout dataset.

Every study goes through exactly what the worker runs: ``load_volume`` on its DICOM files,
then ``service.inference.pipeline.run_pipeline``. A study that cannot be loaded counts as
*not processed* (reported with its reason, as the clinical literature reports the studies a
product could not process) and is left out of the accuracy figures.

Outputs (``write_report``): ``report.json`` (every figure with its 95 % interval),
``report.md`` (the tables), ``roc.png`` (patient and per-vertebra ROC curves with the
operating point) and ``studies.csv`` (one row per study, for audit).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.config import Settings
from service.evaluation import metrics
from service.evaluation.rsna import RsnaDataset, RsnaStudy, segmentation_on_volume
from service.findings import VERTEBRAE, Findings
from service.inference.runtime import ModelRuntime, get_runtime

logger = logging.getLogger(__name__)

SYNTHETIC_NOTE = ("Figures on synthetic phantoms: they measure the software against its own "
                  "generator, not clinical performance.")
REFERENCE = {"sensitivity": 0.76, "specificity": 0.97,
             "source": "published clinical cohort of the commercial product (see DESIGN.md)"}


@dataclass
class StudyResult:
    uid: str
    labels: np.ndarray | None
    """(8,) patient_overall, C1..C7 reference labels; None when the study has none."""
    probabilities: np.ndarray
    """(8,) patient, then C1..C7 (0 for a vertebra not in view)."""
    in_view: list[bool]
    suspected: list[bool]
    patient_suspected: bool
    dice: dict[str, float | None] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)
    mimics: list[tuple[str, str | None]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    result: str | None = None
    """FRACTURE_SUSPECTED / NO_FRACTURE_FOUND / INCONCLUSIVE (``service.outcomes``)."""
    inconclusive_reasons: list[str] = field(default_factory=list)
    model_patient_suspected: bool | None = None
    """The classifier alone at the patient threshold, before the anatomical gate."""


def _probabilities(findings: Findings) -> np.ndarray:
    vertebrae = [v.probability if v.probability is not None else 0.0 for v in findings.vertebrae]
    return np.array([findings.patient_probability, *vertebrae], dtype=float)


def evaluate_study(study: RsnaStudy, runtime: ModelRuntime, settings: Settings) -> StudyResult:
    from service.imaging.qc import VolumeError
    from service.imaging.volume import load_volume
    from service.inference.pipeline import run_pipeline

    labels = study.labels.as_vector() if study.labels is not None else None
    mimics = [(m.type, m.vertebra) for m in study.lesions if m.kind == "mimic"]
    started = time.perf_counter()
    try:
        volume = load_volume(study.dicom_paths())
    except VolumeError as exc:
        return StudyResult(uid=study.study_instance_uid, labels=labels,
                           probabilities=np.zeros(8), in_view=[False] * 7,
                           suspected=[False] * 7, patient_suspected=False, mimics=mimics,
                           error=f"{exc.reason.value}: {exc.detail}")
    load_s = time.perf_counter() - started
    findings = run_pipeline(volume, runtime, settings, load_seconds=load_s)
    reference = (segmentation_on_volume(study.segmentation, volume.affine, volume.shape)
                 if study.segmentation is not None else None)
    return study_result(study.study_instance_uid, labels, findings, reference, mimics)


def study_result(uid: str, labels: np.ndarray | None, findings: Findings,
                 reference: np.ndarray | None,
                 mimics: list[tuple[str, str | None]]) -> StudyResult:
    """One study's row from its findings (and reference label map on the volume grid)."""
    dice: dict[str, float | None] = {}
    if reference is not None and findings.label_map is not None:
        for i, name in enumerate(VERTEBRAE):
            dice[name] = metrics.dice(reference, findings.label_map, i + 1)
    return StudyResult(
        uid=uid, labels=labels, probabilities=_probabilities(findings),
        in_view=[v.in_view for v in findings.vertebrae],
        suspected=[v.suspected for v in findings.vertebrae],
        patient_suspected=findings.patient_suspected, dice=dice,
        durations=dict(findings.stage_durations), mimics=mimics,
        warnings=list(findings.warnings), result=findings.result.value,
        inconclusive_reasons=findings.inconclusive_reasons,
        model_patient_suspected=findings.model_patient_suspected)


def evaluate_dataset(root: Path, settings: Settings, *, runtime: ModelRuntime | None = None,
                     limit: int | None = None, progress: bool = True) -> list[StudyResult]:
    """Run the pipeline on every study of the dataset (the first ``limit`` by UID)."""
    dataset = RsnaDataset(root)
    runtime = runtime or get_runtime(settings)
    studies = list(dataset)
    if limit is not None:
        studies = studies[:limit]
    results = []
    for study in tqdm(studies, desc="evaluate", unit="study", disable=not progress):
        results.append(evaluate_study(study, runtime, settings))
    return results


def choose_thresholds(results: Sequence[StudyResult], min_sensitivity: float = 0.95,
                      ) -> dict[str, float]:
    """Validation operating point: patient sensitivity >= target with the best specificity.

    The vertebra threshold equals the patient threshold: with max aggregation a flagged study
    then always names at least one suspected vertebra, and a suspected vertebra always flags
    its study.
    """
    done = [r for r in results if r.error is None and r.labels is not None]
    y = np.array([r.labels[0] for r in done if r.labels is not None])
    p = np.array([r.probabilities[0] for r in done])
    threshold, sens, spec = metrics.choose_threshold(y, p, min_sensitivity)
    return {"patient": threshold, "vertebra": threshold, "sensitivity": sens,
            "specificity": spec, "studies": float(len(done))}


def _median(values: list[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarize(results: Sequence[StudyResult], *, patient_threshold: float,
              vertebra_threshold: float, model: dict[str, Any] | None = None,
              dataset: str | None = None, synthetic: bool = True) -> dict[str, Any]:
    """Every figure of the report as JSON-able data."""
    done = [r for r in results if r.error is None and r.labels is not None]
    failed = [r for r in results if r.error is not None]
    y = np.array([r.labels for r in done if r.labels is not None]).reshape(-1, 8)
    p = np.array([r.probabilities for r in done]).reshape(-1, 8)
    summary: dict[str, Any] = {
        "dataset": dataset,
        "synthetic": synthetic,
        "note": SYNTHETIC_NOTE if synthetic else None,
        "model": model or {},
        "studies": len(results),
        "processed": len(done),
        "not_processed": [{"uid": r.uid, "reason": r.error} for r in failed],
        "positives": int(y[:, 0].sum()) if len(y) else 0,
        "thresholds": {"patient": patient_threshold, "vertebra": vertebra_threshold},
        "reference_product": REFERENCE,
    }
    if not len(done):
        return summary
    summary["rsna_weighted_log_loss"] = metrics.rsna_weighted_log_loss(y, p)
    constant = np.tile(y.mean(axis=0).clip(1e-3, 1 - 1e-3), (len(y), 1))
    summary["rsna_weighted_log_loss_constant_prevalence"] = metrics.rsna_weighted_log_loss(
        y, constant)
    patient = metrics.binary_report(y[:, 0], p[:, 0], patient_threshold)
    summary["patient"] = {**patient.as_dict(), "auc": metrics.auc(y[:, 0], p[:, 0]).as_dict()}
    summary["per_vertebra_auc"] = {name: metrics.auc(y[:, i + 1], p[:, i + 1]).as_dict()
                                   for i, name in enumerate(VERTEBRAE)}
    vy = y[:, 1:].ravel()
    vp = p[:, 1:].ravel()
    summary["vertebra"] = {**metrics.binary_report(vy, vp, vertebra_threshold).as_dict(),
                           "auc": metrics.auc(vy, vp).as_dict()}
    dice: dict[str, Any] = {}
    for name in VERTEBRAE:
        values = [r.dice[name] for r in done if r.dice.get(name) is not None]
        dice[name] = metrics.bootstrap_interval(np.array(values, dtype=float)).as_dict() | {
            "studies": len(values)}
    all_dice = [v for r in done for v in r.dice.values() if v is not None]
    dice["mean"] = metrics.bootstrap_interval(np.array(all_dice, dtype=float)).as_dict()
    summary["segmentation_dice"] = dice
    summary["gate"] = gate_summary(done, patient_threshold)
    summary["mimics"] = _mimic_false_positives(done)
    summary["warnings"] = dict(sorted(Counter(w for r in done for w in set(r.warnings))
                                      .items()))
    stages = sorted({k for r in done for k in r.durations})
    summary["stage_seconds_median"] = {k: _median([r.durations[k] for r in done
                                                   if k in r.durations]) for k in stages}
    summary["total_seconds_median"] = _median([sum(r.durations.values()) for r in done])
    return summary


def _binary(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    c = metrics.Confusion.from_arrays(labels, predicted)
    return {"confusion": {"tp": c.tp, "fp": c.fp, "tn": c.tn, "fn": c.fn},
            "sensitivity": metrics.wilson_interval(c.tp, c.tp + c.fn).as_dict(),
            "specificity": metrics.wilson_interval(c.tn, c.tn + c.fp).as_dict()}


def gate_summary(done: Sequence[StudyResult], patient_threshold: float) -> dict[str, Any]:
    """The anatomical gate's effect: INCONCLUSIVE counted apart, the answers both ways.

    ``model_alone``: the classifier at the patient threshold with no gate (the figures
    before the gate existed). ``inconclusive_as_negative``: only FRACTURE_SUSPECTED counts
    as positive (what the worklist flags). ``inconclusive_excluded``: the same on the
    studies with a conclusive answer only.
    """
    labelled = [r for r in done if r.labels is not None]
    y = np.array([int(r.labels[0]) for r in labelled if r.labels is not None], dtype=int)
    model = np.array([r.model_patient_suspected if r.model_patient_suspected is not None
                      else r.probabilities[0] >= patient_threshold for r in labelled])
    flagged = np.array([r.result == "FRACTURE_SUSPECTED" if r.result is not None
                        else r.patient_suspected for r in labelled])
    inconclusive = np.array([r.result == "INCONCLUSIVE" for r in labelled])
    reasons = Counter(code for r in labelled for code in r.inconclusive_reasons
                      if r.result == "INCONCLUSIVE")
    return {
        "inconclusive": metrics.wilson_interval(int(inconclusive.sum()), len(labelled)).as_dict(),
        "inconclusive_positives": int((inconclusive & (y == 1)).sum()),
        "inconclusive_negatives": int((inconclusive & (y == 0)).sum()),
        "model_alone": _binary(y, model),
        "inconclusive_as_negative": _binary(y, flagged),
        "inconclusive_excluded": _binary(y[~inconclusive], flagged[~inconclusive]),
        "reasons": dict(reasons.most_common()),
    }


def _mimic_false_positives(done: Sequence[StudyResult]) -> dict[str, Any]:
    """False positives among mimics, by mimic type, at study and at vertebra level."""
    out: dict[str, Any] = {}
    types = sorted({t for r in done for t, _ in r.mimics})
    for mimic in types:
        studies = [r for r in done if any(t == mimic for t, _ in r.mimics)]
        negative = [r for r in studies if r.labels is not None and r.labels[0] == 0]
        vertebra_cases = 0
        vertebra_fp = 0
        for r in studies:
            assert r.labels is not None
            for t, level in r.mimics:
                if t != mimic or level not in VERTEBRAE:
                    continue
                i = VERTEBRAE.index(level)
                if r.labels[i + 1] == 0:
                    vertebra_cases += 1
                    vertebra_fp += int(r.suspected[i])
        out[mimic] = {
            "studies": len(studies),
            "negative_studies": len(negative),
            "patient_false_positives": sum(int(r.patient_suspected) for r in negative),
            "unfractured_vertebrae_with_mimic": vertebra_cases,
            "vertebra_false_positives": vertebra_fp,
        }
    clean = [r for r in done if not r.mimics and r.labels is not None and r.labels[0] == 0]
    out["_no_mimic_negative_studies"] = {
        "studies": len(clean),
        "patient_false_positives": sum(int(r.patient_suspected) for r in clean),
    }
    return out


# --------------------------------------------------------------------------- writing


def _fmt(e: dict[str, Any], percent: bool = True) -> str:
    est = metrics.Estimate(e.get("value"), e.get("low"), e.get("high"), e.get("numerator"),
                           e.get("denominator"))
    return est.format(percent)


def render_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Evaluation report", ""]
    if summary.get("synthetic"):
        lines += [f"> **{SYNTHETIC_NOTE}**", ""]
    model = summary.get("model") or {}
    lines += [f"- Dataset: `{summary.get('dataset')}`",
              f"- Model: {model.get('model')} {model.get('version')} "
              f"(execution provider {model.get('execution_provider')})",
              f"- Studies: {summary['studies']}, processed {summary['processed']}, "
              f"not processed {len(summary['not_processed'])}; "
              f"fracture-positive {summary.get('positives')}",
              f"- Thresholds: patient {summary['thresholds']['patient']:.4f}, "
              f"vertebra {summary['thresholds']['vertebra']:.4f}", ""]
    if "patient" not in summary:
        return "\n".join(lines + ["No study could be processed.", ""])
    pt = summary["patient"]
    ref = summary["reference_product"]
    lines += ["## Patient level (95 % CI)", "",
              "| metric | this model | reference product (clinical) |", "|---|---|---|",
              f"| sensitivity | {_fmt(pt['sensitivity'])} | {ref['sensitivity'] * 100:.0f} % |",
              f"| specificity | {_fmt(pt['specificity'])} | {ref['specificity'] * 100:.0f} % |",
              f"| PPV | {_fmt(pt['ppv'])} | |",
              f"| NPV | {_fmt(pt['npv'])} | |",
              f"| accuracy | {_fmt(pt['accuracy'])} | |",
              f"| Cohen's kappa | {_fmt(pt['kappa'], percent=False)} | |",
              f"| AUC | {_fmt(pt['auc'], percent=False)} | |", "",
              f"Confusion: {pt['confusion']}", "",
              f"RSNA 2022 weighted log loss: **{summary['rsna_weighted_log_loss']:.4f}** "
              f"(constant prediction at this set's prevalence: "
              f"{summary['rsna_weighted_log_loss_constant_prevalence']:.4f}; lower is better)",
              "", "## Per vertebra", "",
              "| vertebra | AUC (95 % CI) [positives/n] | Dice (95 % CI) |", "|---|---|---|"]
    for name in VERTEBRAE:
        lines.append(f"| {name} | {_fmt(summary['per_vertebra_auc'][name], percent=False)} | "
                     f"{_fmt(summary['segmentation_dice'][name], percent=False)} |")
    gate = summary.get("gate")
    if gate:
        lines += ["## Anatomical plausibility gate (patient level, 95 % CI)", "",
                  f"INCONCLUSIVE (analysed, neither flagged nor cleared): "
                  f"{_fmt(gate['inconclusive'])} ({gate['inconclusive_positives']} "
                  f"fracture-positive, {gate['inconclusive_negatives']} negative)", "",
                  "| answer counted as | sensitivity | specificity |", "|---|---|---|"]
        for key, title in (("model_alone", "classifier alone, no gate (before)"),
                           ("inconclusive_as_negative", "flag only; INCONCLUSIVE as negative"),
                           ("inconclusive_excluded", "INCONCLUSIVE excluded")):
            row = gate[key]
            lines.append(f"| {title} | {_fmt(row['sensitivity'])} | "
                         f"{_fmt(row['specificity'])} |")
        if gate["reasons"]:
            lines += ["", "Failed rules on INCONCLUSIVE studies: " + ", ".join(
                f"{code} {count}" for code, count in gate["reasons"].items())]
        lines.append("")
    vt = summary["vertebra"]
    lines += ["", f"Pooled vertebra level at threshold: sensitivity {_fmt(vt['sensitivity'])}, "
              f"specificity {_fmt(vt['specificity'])}, AUC {_fmt(vt['auc'], percent=False)}; "
              f"mean Dice {_fmt(summary['segmentation_dice']['mean'], percent=False)}", "",
              "## False positives on mimics", "",
              "| mimic | studies | negative studies flagged | unfractured vertebrae with "
              "mimic flagged |", "|---|---|---|---|"]
    for name, row in summary["mimics"].items():
        if name.startswith("_"):
            continue
        lines.append(f"| {name} | {row['studies']} | {row['patient_false_positives']}/"
                     f"{row['negative_studies']} | {row['vertebra_false_positives']}/"
                     f"{row['unfractured_vertebrae_with_mimic']} |")
    clean = summary["mimics"].get("_no_mimic_negative_studies")
    if clean:
        lines.append(f"| (no mimic) | {clean['studies']} | {clean['patient_false_positives']}/"
                     f"{clean['studies']} | |")
    if summary.get("warnings"):
        lines += ["", "## Warnings (studies)", ""]
        lines += [f"- {code}: {count}" for code, count in summary["warnings"].items()]
    lines += ["", "## Time per study (median, seconds)", ""]
    for stage, seconds in summary["stage_seconds_median"].items():
        lines.append(f"- {stage}: {seconds:.3f}")
    lines.append(f"- total: {summary['total_seconds_median']:.3f}")
    if summary["not_processed"]:
        lines += ["", "## Not processed", ""]
        lines += [f"- `{r['uid']}`: {r['reason']}" for r in summary["not_processed"]]
    return "\n".join(lines) + "\n"


def render_roc(results: Sequence[StudyResult], path: Path, *, patient_threshold: float) -> None:
    """Patient-level ROC (thick) and per-vertebra ROC curves, drawn with Pillow."""
    from PIL import Image, ImageDraw

    done = [r for r in results if r.error is None and r.labels is not None]
    size, margin = 640, 70
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    plot = size - 2 * margin

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return margin + fpr * plot, size - margin - tpr * plot

    for tick in np.linspace(0, 1, 6):
        draw.line([xy(tick, 0), xy(tick, 1)], fill=(230, 230, 230))
        draw.line([xy(0, tick), xy(1, tick)], fill=(230, 230, 230))
        draw.text((xy(tick, 0)[0] - 8, size - margin + 6), f"{tick:.1f}", fill="black")
        draw.text((margin - 30, xy(0, tick)[1] - 6), f"{tick:.1f}", fill="black")
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(180, 180, 180))
    draw.text((size / 2 - 60, size - margin + 24), "1 - specificity (FPR)", fill="black")
    draw.text((8, margin - 30), "sensitivity (TPR)", fill="black")
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
               (140, 86, 75), (227, 119, 194)]
    legend_y = size - margin - 10 - 14 * 8
    if done:
        y = np.array([r.labels for r in done if r.labels is not None])
        p = np.array([r.probabilities for r in done])
        for i, name in enumerate(VERTEBRAE):
            if 0 < y[:, i + 1].sum() < len(y):
                fpr, tpr, _ = metrics.roc_curve(y[:, i + 1], p[:, i + 1])
                draw.line([xy(a, b) for a, b in zip(fpr, tpr, strict=True)], fill=palette[i],
                          width=1)
                draw.text((size - margin - 90, legend_y + 14 * (i + 1)), name, fill=palette[i])
        if 0 < y[:, 0].sum() < len(y):
            fpr, tpr, _ = metrics.roc_curve(y[:, 0], p[:, 0])
            draw.line([xy(a, b) for a, b in zip(fpr, tpr, strict=True)], fill="black", width=3)
            pred = p[:, 0] >= patient_threshold
            sens = float((pred & (y[:, 0] == 1)).sum() / max(1, (y[:, 0] == 1).sum()))
            spec = float((~pred & (y[:, 0] == 0)).sum() / max(1, (y[:, 0] == 0).sum()))
            cx, cy = xy(1 - spec, sens)
            draw.ellipse([cx - 6, cy - 6, cx + 6, cy + 6], outline="red", width=3)
            draw.text((size - margin - 90, legend_y), "patient", fill="black")
    draw.text((margin, 12), "ROC (synthetic data)" if done else "ROC: no data", fill="black")
    img.save(path)


def write_report(summary: dict[str, Any], results: Sequence[StudyResult], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "roc.png", out / "studies.csv"]
    paths[0].write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    paths[1].write_text(render_markdown(summary))
    render_roc(results, paths[2], patient_threshold=summary["thresholds"]["patient"])
    with open(paths[3], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["StudyInstanceUID", "error", "patient_label", "patient_probability",
                         "patient_suspected", *[f"{v}_label" for v in VERTEBRAE],
                         *[f"{v}_probability" for v in VERTEBRAE], "mimics", "warnings",
                         "seconds", "result", "inconclusive_reasons"])
        for r in results:
            labels = r.labels if r.labels is not None else np.full(8, np.nan)
            writer.writerow([r.uid, r.error or "", _num(labels[0]), f"{r.probabilities[0]:.5f}",
                             int(r.patient_suspected), *[_num(v) for v in labels[1:]],
                             *[f"{v:.5f}" for v in r.probabilities[1:]],
                             ";".join(f"{t}:{lv or ''}" for t, lv in r.mimics),
                             ";".join(r.warnings),
                             f"{sum(r.durations.values()):.3f}", r.result or "",
                             ";".join(r.inconclusive_reasons)])
    return paths


def _num(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else str(int(value))


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")
