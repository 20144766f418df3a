"""``triage evaluate-real``: the served model on the real scans, scored against the levels
read on them (``real_reference.json``, see :mod:`service.evaluation.levels`).

The real scans are not part of the repository. They live in a data directory (default
``../shared/data`` beside the repository root, or ``--data DIR``), one folder per scan with
its DICOM files under ``ct/``. Every scan found there is loaded exactly as the worker loads
a series (``service.inference.pipeline.analyze_paths``), matched to its reference entry by
Series Instance UID and pixel hash, and reported: per scan and pooled, level identification
(exact / off by one / worse / missing), centre error in mm, the patient probability, the
suspected vertebrae and the findings' warnings.

These scans carry no fracture labels: the patient probability is reported, not scored. A
scan with no known fracture that gets flagged is worth a look, nothing more.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.evaluation.levels import (
    EXACT,
    MISSING,
    OFF_BY_ONE,
    WORSE,
    LevelReport,
    evaluate_levels,
    load_reference,
    pool,
    reference_for,
)
from service.evaluation.scans import SCAN_SUBDIR, find_scans

if TYPE_CHECKING:
    from service.config import Settings
    from service.inference.runtime import ModelRuntime

logger = logging.getLogger(__name__)

@dataclass
class ScanResult:
    name: str
    series_instance_uid: str | None = None
    levels: LevelReport | None = None
    patient_probability: float | None = None
    patient_suspected: bool | None = None
    patient_threshold: float | None = None
    model_patient_suspected: bool | None = None
    """What the classifier alone said at the patient threshold (before any anatomical gate),
    where the findings carry it."""
    result: str | None = None
    """The analysis answer where the findings carry one (fracture suspected / no fracture
    found / INCONCLUSIVE) and the failed plausibility rules behind an INCONCLUSIVE."""
    inconclusive_reasons: list[str] = field(default_factory=list)
    suspected_vertebrae: list[str] = field(default_factory=list)
    in_view: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None
    figure: str | None = None
    """File name of the drawn reformats with reference and predicted centres, if drawn."""
    error: str | None = None
    """Why the scan could not be evaluated (unloadable, no reference entry, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "series_instance_uid": self.series_instance_uid,
            "levels": self.levels.to_dict() if self.levels else None,
            "patient_probability": self.patient_probability,
            "patient_suspected": self.patient_suspected,
            "patient_threshold": self.patient_threshold,
            "model_patient_suspected": self.model_patient_suspected,
            "result": self.result,
            "inconclusive_reasons": self.inconclusive_reasons,
            "suspected_vertebrae": self.suspected_vertebrae,
            "in_view": self.in_view,
            "warnings": self.warnings,
            "seconds": self.seconds,
            "figure": self.figure,
            "error": self.error,
        }


def evaluate_scan(name: str, paths: Sequence[Path], settings: Settings,
                  reference: dict[str, Any], *, runtime: ModelRuntime | None = None,
                  centre: str = "body", figures: Path | None = None) -> ScanResult:
    """Analyse one scan with the served model and score its levels; failures are recorded
    in the result, never raised. With ``figures`` (a directory), also draw the reference
    and predicted centres on the scan's reformats (``<name>-predicted.png``; needs
    matplotlib, a dev dependency)."""
    from service.inference.pipeline import analyze_paths

    result = ScanResult(name=name)
    started = time.perf_counter()
    try:
        volume, findings = analyze_paths(paths, settings, runtime=runtime)
    except Exception as exc:  # noqa: BLE001 - a report line, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
        logger.warning("scan %s not analysed: %s", name, result.error)
        return result
    result.seconds = time.perf_counter() - started
    result.series_instance_uid = volume.series_instance_uid
    result.patient_probability = findings.patient_probability
    result.patient_suspected = findings.patient_suspected
    result.patient_threshold = findings.patient_threshold
    raw = getattr(findings, "model_patient_suspected", None)
    result.model_patient_suspected = None if raw is None else bool(raw)
    answer = getattr(findings, "result", None)
    result.result = None if answer is None else str(getattr(answer, "value", answer))
    result.inconclusive_reasons = list(getattr(findings, "inconclusive_reasons", []) or [])
    result.suspected_vertebrae = findings.suspected_vertebrae
    result.in_view = findings.in_view
    result.warnings = list(findings.warnings)
    try:
        entry = reference_for(volume, reference)
    except LookupError as exc:
        result.error = str(exc)
        logger.warning("scan %s not scored: %s", name, exc)
        return result
    result.levels = evaluate_levels(volume, findings, entry, centre=centre)
    if figures is not None:
        from service.evaluation.real_figures import draw_scan

        predicted = {k: (v.body_lps if centre == "body" else v.mass_lps)
                     for k, v in result.levels.predicted.items()}
        drawn = draw_scan(volume.hu, volume.affine, entry, figures / f"{name}-predicted.png",
                          title=f"{name}: model {findings.model_name} "
                                f"{findings.model_version}, {centre} centres",
                          predicted=predicted, dpi=70)
        result.figure = drawn.name
    return result


def evaluate_real(data_dir: Path, settings: Settings, *,
                  reference: dict[str, Any] | None = None,
                  runtime: ModelRuntime | None = None,
                  centre: str = "body", figures: Path | None = None) -> list[ScanResult]:
    """Every scan of ``data_dir`` through the served model, scored against the reference."""
    from service.inference.runtime import load_runtime

    scans = find_scans(data_dir)
    if not scans:
        raise FileNotFoundError(f"no scans (folders with {SCAN_SUBDIR}/) under {data_dir}")
    document = reference if reference is not None else load_reference()
    runtime = runtime or load_runtime(settings)
    return [evaluate_scan(name, paths, settings, document, runtime=runtime, centre=centre,
                          figures=figures)
            for name, paths in scans]


# --------------------------------------------------------------------------- report


def summarize(results: list[ScanResult], *, model: dict[str, str] | None = None,
              data_dir: Path | None = None, reference: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
    scored = [r.levels for r in results if r.levels is not None]
    return {
        "model": model or {},
        "data_dir": str(data_dir) if data_dir else None,
        "reference_reader": (reference or {}).get("reader"),
        "centre": scored[0].centre if scored else None,
        "pooled": pool(scored),
        "scans": [r.to_dict() for r in results],
    }


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(summary: dict[str, Any]) -> str:
    pooled = summary["pooled"]
    model = summary.get("model") or {}
    lines = [
        "# Real scans: level identification",
        "",
        f"Model: {model.get('model', '?')} {model.get('version', '')}".rstrip() + ".  ",
        f"Reference: {summary.get('reference_reader') or 'n/a'}.  ",
        f"Centre matched: {summary.get('centre')} (see `service/evaluation/levels.py`).",
        "",
        "These scans have no fracture labels: the patient probability is reported, not scored.",
        "",
        "## Pooled",
        "",
        "| scans | levels | exact | off by one | worse | missing | fraction exact "
        "| median centre error (mm) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {pooled['scans']} | {pooled['levels']} | {pooled['counts'][EXACT]} "
        f"| {pooled['counts'][OFF_BY_ONE]} | {pooled['counts'][WORSE]} "
        f"| {pooled['counts'][MISSING]} | {_fmt(pooled['fraction_exact'], '.2f')} "
        f"| {_fmt(pooled['median_centre_error_mm'])} |",
        "",
    ]
    for scan in summary["scans"]:
        lines += [f"## {scan['name']}", ""]
        if scan.get("patient_probability") is not None:
            lines += [
                f"- patient probability {scan['patient_probability']:.3f} (threshold "
                f"{_fmt(scan['patient_threshold'], '.3f')}), "
                f"{'suspected' if scan['patient_suspected'] else 'not suspected'}"
                + ("" if scan.get("model_patient_suspected") is None else
                   f" (classifier alone: "
                   f"{'suspected' if scan['model_patient_suspected'] else 'not suspected'})")
                + (f"; result {scan['result']}" if scan.get("result") else "")
                + (f" ({', '.join(scan['inconclusive_reasons'])})"
                   if scan.get("inconclusive_reasons") else ""),
                f"- suspected vertebrae: {', '.join(scan['suspected_vertebrae']) or 'none'}",
                f"- in view (model): {', '.join(scan['in_view']) or 'none'}",
                f"- warnings: {', '.join(scan['warnings']) or 'none'}",
            ]
        if scan.get("error"):
            lines.append(f"- not scored: {scan['error']}")
        levels = scan.get("levels")
        if levels:
            lines += [
                f"- levels: {levels['counts'][EXACT]} exact, {levels['counts'][OFF_BY_ONE]} "
                f"off by one, {levels['counts'][WORSE]} worse, {levels['counts'][MISSING]} "
                f"missing; median centre error {_fmt(levels['median_centre_error_mm'])} mm",
                "",
                "| level | outcome | nearest reference | centre error (mm) | reference z | "
                "predicted z | cut |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in levels["levels"]:
                predicted = r["predicted_centre_lps"]
                lines.append(
                    f"| {r['name']} | {r['outcome']} | {r['nearest_reference'] or '-'} "
                    f"| {_fmt(r['centre_error_mm'])} | {r['reference_centre_lps'][2]:.1f} "
                    f"| {_fmt(predicted[2] if predicted else None)} | {r['cut'] or ''} |")
            if levels.get("extra"):
                lines += ["", "Predicted levels the reference does not list: " + ", ".join(
                    f"{k} (nearest {v or 'none'})" for k, v in levels["extra"].items())]
        if scan.get("figure"):
            lines += ["", f"![{scan['name']}: reference and predicted centres]({scan['figure']})"]
        lines.append("")
    return "\n".join(lines)


def write_report(summary: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(summary), encoding="utf-8")
    return [json_path, md_path]
