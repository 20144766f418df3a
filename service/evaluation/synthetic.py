"""``python -m service.evaluation.synthetic``: the served pipeline on phantoms drawn by seed.

The same :func:`~service.inference.pipeline.run_pipeline` and the same report as
``triage evaluate``, without writing the phantoms as DICOM first: each phantom's HU volume
and geometry become a :class:`~service.imaging.volume.Volume` in memory. The DICOM writer is
lossless (int16 HU, the phantom's own axial grid), so the figures are those of the DICOM
round trip at a fraction of the disk and time; that is what makes held-out sets at the
clinical matrix of 512 affordable on two CPU cores (200 studies at 512 as DICOM would be about
30 GB). Synthetic figures only: they say nothing about patients.

    python -m service.evaluation.synthetic --seeds 31000:31200 --matrix 512 --out var/eval512
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.config import Settings, get_settings
from service.evaluation.report import StudyResult, study_result, summarize, write_report
from service.findings import VERTEBRAE
from service.imaging.volume import Volume
from service.inference.runtime import ModelRuntime, load_runtime
from service.synthetic import Phantom

logger = logging.getLogger(__name__)


def phantom_volume(phantom: Phantom, uid: str) -> Volume:
    """A phantom as the volume loader would give it (z ascending = inferior to superior)."""
    hu = np.asarray(phantom.hu)
    n = hu.shape[0]
    dz, dy, dx = (float(s) for s in phantom.spacing)
    return Volume(hu=hu, spacing=(dz, dy, dx),
                  affine=np.asarray(phantom.affine, dtype=np.float64),
                  sop_instance_uids=[f"{uid}.{i + 1}" for i in range(n)],
                  frame_numbers=[None] * n, headers=[], study_instance_uid=uid,
                  series_instance_uid=f"{uid}.1", frame_of_reference_uid=None,
                  acquired_at=None)


def evaluate_seeds(seeds: Sequence[int], settings: Settings, runtime: ModelRuntime, *,
                   matrix: int = 512, fracture_rate: float = 0.5,
                   progress: bool = True) -> list[StudyResult]:
    from service.inference.pipeline import run_pipeline
    from service.synthetic import generate_phantom, random_options, study_uid

    results = []
    for seed in tqdm(seeds, desc=f"synthetic {matrix}", unit="study", disable=not progress):
        phantom = generate_phantom(random_options(seed, fracture_rate, matrix=matrix))
        uid = study_uid(phantom)
        fractured = [int(phantom.vertebra_fractured[v]) for v in VERTEBRAE]
        labels = np.array([int(any(fractured)), *fractured], dtype=float)
        findings = run_pipeline(phantom_volume(phantom, uid), runtime, settings)
        reference = np.where(phantom.labels <= len(VERTEBRAE), phantom.labels, 0)
        mimics = [(str(m.type.value if hasattr(m.type, "value") else m.type), m.vertebra)
                  for m in phantom.mimics]
        results.append(study_result(uid, labels, findings, reference, mimics))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", required=True, help="A:B (half-open) or a comma list")
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--fracture-rate", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if ":" in args.seeds:
        a, b = args.seeds.split(":", 1)
        seeds = list(range(int(a), int(b)))
    else:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    settings = get_settings()
    runtime = load_runtime(settings)
    manifest = runtime.manifest
    results = evaluate_seeds(seeds, settings, runtime, matrix=args.matrix,
                             fracture_rate=args.fracture_rate, progress=not args.no_progress)
    summary = summarize(results, patient_threshold=manifest.thresholds.patient,
                        vertebra_threshold=manifest.thresholds.vertebra,
                        model=runtime.describe(),
                        dataset=f"synthetic seeds {args.seeds} at matrix {args.matrix} "
                                f"(in memory)")
    paths = write_report(summary, results, args.out)
    gate = summary.get("gate", {})
    print(json.dumps({"report": [str(p) for p in paths],
                      "inconclusive": gate.get("inconclusive", {}).get("value"),
                      "sensitivity": summary.get("patient", {}).get("sensitivity", {})
                      .get("value")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
