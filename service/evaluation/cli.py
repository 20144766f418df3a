"""``triage evaluate DATASET_DIR --out REPORT_DIR``: the served model on an RSNA-layout dataset."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from service.config import Settings

logger = logging.getLogger(__name__)


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from service.evaluation.report import StudyResult, evaluate_dataset, summarize, write_report
    from service.inference.runtime import load_runtime

    updates: dict[str, object] = {}
    if args.model_dir:
        updates["model_dir"] = args.model_dir
    if args.patient_threshold is not None:
        updates["patient_threshold"] = args.patient_threshold
    if args.vertebra_threshold is not None:
        updates["fracture_threshold"] = args.vertebra_threshold
    if updates:
        settings = settings.model_copy(update=updates)
    runtime = load_runtime(settings)
    manifest = runtime.manifest
    patient_threshold = (settings.patient_threshold if settings.patient_threshold is not None
                         else manifest.thresholds.patient)
    vertebra_threshold = (settings.fracture_threshold if settings.fracture_threshold is not None
                          else manifest.thresholds.vertebra)
    results: list[StudyResult] = []
    for directory in args.dataset:
        remaining = None if args.limit is None else args.limit - len(results)
        if remaining is not None and remaining <= 0:
            break
        results += evaluate_dataset(directory, settings, runtime=runtime, limit=remaining,
                                    progress=not args.no_progress)
    summary = summarize(results, patient_threshold=patient_threshold,
                        vertebra_threshold=vertebra_threshold, model=runtime.describe(),
                        dataset=",".join(str(d) for d in args.dataset),
                        synthetic=not args.real_data)
    paths = write_report(summary, results, args.out)
    brief = {k: summary.get(k) for k in ("studies", "processed", "rsna_weighted_log_loss")}
    if "patient" in summary:
        brief["sensitivity"] = summary["patient"]["sensitivity"]["value"]
        brief["specificity"] = summary["patient"]["specificity"]["value"]
    print(json.dumps({"report": [str(p) for p in paths], **brief}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="evaluate the model on an RSNA-layout dataset (report.json/md, roc.png)")
    parser.add_argument("dataset", type=Path, nargs="+",
                        help="directory with train.csv and train_images/ (several: one report "
                             "over all of them, e.g. a test set generated in parallel chunks)")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model directory (default: settings model_dir)")
    parser.add_argument("--limit", type=int, default=None, help="first N studies only")
    parser.add_argument("--patient-threshold", type=float, default=None)
    parser.add_argument("--vertebra-threshold", type=float, default=None)
    parser.add_argument("--real-data", action="store_true",
                        help="the dataset is real patient data (drops the synthetic caveat)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=cmd_evaluate)


def cmd_evaluate_real(args: argparse.Namespace, settings: Settings) -> int:
    from service.evaluation.levels import load_reference
    from service.evaluation.real import evaluate_real, summarize, write_report
    from service.evaluation.scans import default_data_dir
    from service.inference.runtime import load_runtime

    if args.model_dir:
        settings = settings.model_copy(update={"model_dir": args.model_dir})
    data_dir = args.data or default_data_dir()
    if not data_dir.is_dir():
        print(f"data directory {data_dir} not found (--data DIR)")
        return 2
    reference = load_reference(args.reference)
    runtime = load_runtime(settings)
    results = evaluate_real(data_dir, settings, reference=reference, runtime=runtime,
                            centre=args.centre, figures=args.out if args.figures else None)
    summary = summarize(results, model=runtime.describe(), data_dir=data_dir,
                        reference=reference)
    paths = write_report(summary, args.out)
    pooled = summary["pooled"]
    print(json.dumps({"report": [str(p) for p in paths],
                      "scans": [r.name for r in results],
                      "counts": pooled["counts"],
                      "fraction_exact": pooled["fraction_exact"],
                      "median_centre_error_mm": pooled["median_centre_error_mm"],
                      "errors": {r.name: r.error for r in results if r.error}}, indent=2))
    return 0 if all(r.levels is not None for r in results) else 1


def register_real(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate-real",
        help="the served model on the real scans: level identification against the levels "
             "read on them (report.json/md)")
    parser.add_argument("--data", type=Path, default=None,
                        help="data directory with one folder per scan (DICOM under ct/); "
                             "default ../shared/data beside the repository")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="model directory (default: settings model_dir)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="level reference JSON (default: the packaged "
                             "service/evaluation/real_reference.json)")
    parser.add_argument("--centre", choices=("body", "mass"), default="body",
                        help="predicted centre matched to the reference body centres "
                             "(default: body, the anterior part of each level)")
    parser.add_argument("--figures", action="store_true",
                        help="also draw each scan's reference and predicted centres on its "
                             "reformats (<scan>-predicted.png; needs matplotlib)")
    parser.set_defaults(handler=cmd_evaluate_real)
