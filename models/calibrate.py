"""Choose the decision thresholds on the validation split and write them into the manifest.

    python -m models.calibrate --model-dir models/cspine-v1 --val VAL_DIR [--val VAL_DIR2]

The validation studies (RSNA layout, DICOM) run through the served path itself: ONNX Runtime
sessions from the model directory, ``load_volume`` and ``run_pipeline``, so the thresholds
belong to the model as deployed, with its own segmentation feeding the classifier. Operating
point: patient-level sensitivity at least ``--min-sensitivity`` (0.95) with the best
specificity; the vertebra threshold is set equal (see
``service.evaluation.report.choose_thresholds``). The model files are not touched, so their
sha256 in the manifest stay valid.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from service.config import Settings
from service.evaluation.report import choose_thresholds, evaluate_dataset, summarize
from service.inference.manifest import Thresholds, dump_manifest, load_manifest
from service.inference.runtime import load_runtime

logger = logging.getLogger(__name__)


def calibrate(model_dir: Path, val_dirs: Sequence[Path], *, min_sensitivity: float = 0.95,
              threads: int = 2, progress: bool = True) -> dict[str, object]:
    settings = Settings(model_dir=model_dir, execution_providers=["CPUExecutionProvider"],
                        ort_intra_op_threads=threads)
    runtime = load_runtime(settings)
    results = []
    for directory in val_dirs:
        results += evaluate_dataset(directory, settings, runtime=runtime, progress=progress)
    chosen = choose_thresholds(results, min_sensitivity)
    summary = summarize(results, patient_threshold=chosen["patient"],
                        vertebra_threshold=chosen["vertebra"], model=runtime.describe(),
                        dataset=",".join(str(d) for d in val_dirs))
    manifest = load_manifest(model_dir)
    thresholds = Thresholds(
        vertebra=round(chosen["vertebra"], 6), patient=round(chosen["patient"], 6),
        selection=(f"validation split ({int(chosen['studies'])} synthetic studies): patient "
                   f"sensitivity >= {min_sensitivity} with the best specificity "
                   f"(sensitivity {chosen['sensitivity']:.3f}, specificity "
                   f"{chosen['specificity']:.3f}); vertebra threshold = patient threshold"))
    validation = {
        "studies": summary["studies"],
        "processed": summary["processed"],
        "positives": summary["positives"],
        "rsna_weighted_log_loss": summary.get("rsna_weighted_log_loss"),
        "patient_auc": summary.get("patient", {}).get("auc", {}).get("value"),
        "sensitivity": chosen["sensitivity"],
        "specificity": chosen["specificity"],
        "mean_dice": summary.get("segmentation_dice", {}).get("mean", {}).get("value"),
        "seeds": "see MODEL_CARD.md",
    }
    updated = manifest.model_copy(update={"thresholds": thresholds, "validation": validation})
    dump_manifest(updated, model_dir)
    logger.info("thresholds written: %s", thresholds)
    return {"thresholds": thresholds.model_dump(), "validation": validation}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--val", type=Path, action="append", required=True,
                        help="validation RSNA-layout directory (repeatable)")
    parser.add_argument("--min-sensitivity", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = calibrate(args.model_dir, args.val, min_sensitivity=args.min_sensitivity,
                    threads=args.threads, progress=not args.no_progress)
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
