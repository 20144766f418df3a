"""Turn RSNA-layout studies into the training cache (one ``.npz`` per study).

Real data (a site's copy of the RSNA 2022 competition, or its own data in that layout)::

    python -m models.prepare rsna DATASET_DIR --cache var/cache/train

Synthetic data, written through the very same layout and readers, in chunks so that only a
few studies' DICOM files exist at a time::

    python -m models.prepare synthetic --seeds 1000:1400 --matrix 256 --cache var/cache/train

``--crops served --model-dir models/cspine-v1`` cuts the classifier crops with that model's
own segmentation (the masks and boxes the classifier is served at runtime) instead of the
ground truth; ``--crops both`` keeps both. A classifier trained only on ground-truth crops
does not transfer to the served ones (``models/experiments/2026-11-26-frac-more-positives``).

``--keep-dicom DIR`` keeps the synthetic layout (the validation and test sets are evaluated
from DICOM by ``triage evaluate``). Studies already in the cache are skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from models.config import default_preprocessing
from models.data import (
    CROP_SOURCES,
    NEEDS_SERVED,
    Case,
    case_from_phantom,
    case_from_rsna,
    prepare_case,
    save_prepared,
)
from service.evaluation.rsna import RsnaDataset

logger = logging.getLogger(__name__)


class CaseWriter:
    """Prepares one case into the cache, with the served segmentation when the crops need it."""

    def __init__(self, *, jitters: int, crops: str = "gt", model_dir: Path | None = None,
                 threads: int = 1, compress: bool = True) -> None:
        self.pre = default_preprocessing()
        self.compress = compress
        self.jitters = jitters
        self.crops = crops
        self.seg = None
        if crops in NEEDS_SERVED:
            if model_dir is None:
                raise ValueError(f"--crops {crops} needs --model-dir (the segmentation to serve)")
            from service.config import Settings
            from service.inference.runtime import load_runtime

            runtime = load_runtime(Settings(model_dir=model_dir,
                                            execution_providers=["CPUExecutionProvider"],
                                            ort_intra_op_threads=threads))
            if runtime.manifest.preprocessing != self.pre:
                raise ValueError(f"{model_dir} was trained with other preprocessing than "
                                 "models.config; its masks would not match these crops")
            self.seg = runtime.seg

    def write(self, target: Path, case: Case, seed: int) -> None:
        served = None
        if self.seg is not None:
            from service.inference.pipeline import segment_volume

            served = segment_volume(case.hu, case.spacing, self.seg, self.pre)
        save_prepared(target, prepare_case(case, self.pre, jitters=self.jitters, seed=seed,
                                           served=served, crops=self.crops),
                      compress=self.compress)


def prepare_rsna(root: Path, cache: Path, *, writer: CaseWriter, seed: int,
                 progress: bool = True) -> int:
    """Prepare every study of an RSNA-layout directory that has a segmentation."""
    dataset = RsnaDataset(root)
    done = 0
    for i, study in enumerate(tqdm(list(dataset), desc="prepare", disable=not progress)):
        target = cache / f"{study.study_instance_uid}.npz"
        if target.exists():
            continue
        if study.segmentation is None:
            logger.info("study %s has no segmentation; skipped", study.study_instance_uid)
            continue
        writer.write(target, case_from_rsna(study), seed * 100003 + i)
        done += 1
    return done


def parse_seeds(text: str) -> list[int]:
    """``A:B`` (half-open range) or a comma list."""
    if ":" in text:
        a, b = text.split(":", 1)
        return list(range(int(a), int(b)))
    return [int(s) for s in text.split(",") if s.strip()]


def prepare_synthetic(seeds: Sequence[int], cache: Path, *, matrix: int, writer: CaseWriter,
                      chunk: int = 8, keep_dicom: Path | None = None,
                      fracture_rate: float = 0.5, progress: bool = True,
                      via_memory: bool = False) -> int:
    """Generate phantoms by seed, write them in the RSNA layout, prepare them into ``cache``.

    ``via_memory`` skips the DICOM/NIfTI round trip (same arrays, half the time; see
    :func:`models.data.case_from_phantom`).
    """
    from service.synthetic import generate_phantom, random_options, write_rsna_layout

    done = 0
    failed: list[int] = []
    bar = tqdm(total=len(seeds), desc="synthetic", disable=not progress)
    if via_memory:
        from service.synthetic import study_uid

        for s in seeds:
            try:
                phantom = generate_phantom(random_options(s, fracture_rate, matrix=matrix))
            except Exception:  # a generator bug must not stop a long run
                logger.exception("seed %d: phantom generation failed; skipped", s)
                failed.append(s)
                bar.update(1)
                continue
            uid = study_uid(phantom)
            target = cache / f"{uid}.npz"
            if not target.exists():
                writer.write(target, case_from_phantom(phantom, uid), s)
                done += 1
            bar.update(1)
        seeds = []
    for start in range(0, len(seeds), chunk):
        part = list(seeds[start:start + chunk])
        if keep_dicom is not None:
            layout = keep_dicom
            temporary = None
        else:
            temporary = Path(tempfile.mkdtemp(prefix="cspine-synth-"))
            layout = temporary
        try:
            phantoms, used = [], []
            for s in part:
                try:
                    phantoms.append(generate_phantom(random_options(s, fracture_rate,
                                                                    matrix=matrix)))
                    used.append(s)
                except Exception:  # a generator bug must not stop a long run
                    logger.exception("seed %d: phantom generation failed; skipped", s)
                    failed.append(s)
                    bar.update(1)
            index = write_rsna_layout(layout, phantoms)
            del phantoms
            dataset = RsnaDataset(layout)
            for uid, seed in zip(index.studies, used, strict=True):
                target = cache / f"{uid}.npz"
                if not target.exists():
                    writer.write(target, case_from_rsna(dataset.study(uid)), seed)
                    done += 1
                bar.update(1)
        finally:
            if temporary is not None:
                shutil.rmtree(temporary, ignore_errors=True)
    bar.close()
    if failed:
        logger.warning("%d seeds failed to generate: %s", len(failed), failed)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    rsna = sub.add_parser("rsna", help="an RSNA-layout directory")
    rsna.add_argument("dataset", type=Path)
    synth = sub.add_parser("synthetic", help="generate synthetic studies by seed")
    synth.add_argument("--seeds", required=True, help="A:B (half-open) or a comma list")
    synth.add_argument("--matrix", type=int, default=256)
    synth.add_argument("--chunk", type=int, default=8)
    synth.add_argument("--fracture-rate", type=float, default=0.5)
    synth.add_argument("--via-memory", action="store_true",
                       help="prepare phantoms in memory, without writing DICOM (faster)")
    synth.add_argument("--keep-dicom", type=Path, default=None,
                       help="write the layout here and keep it (validation/test sets)")
    for p in (rsna, synth):
        p.add_argument("--cache", type=Path, required=True)
        p.add_argument("--jitters", type=int, default=2,
                       help="jittered crops per vertebra besides the canonical one")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--crops", choices=CROP_SOURCES, default="gt",
                       help="label map the classifier crops are cut with (default gt)")
        p.add_argument("--model-dir", type=Path, default=None,
                       help="model whose segmentation cuts served crops")
        p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
        p.add_argument("--no-compress", action="store_true",
                       help="store the cache uncompressed (4x the disk, faster to write and load)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    writer = CaseWriter(jitters=args.jitters, crops=args.crops, model_dir=args.model_dir,
                        threads=args.threads, compress=not args.no_compress)
    if args.source == "rsna":
        count = prepare_rsna(args.dataset, args.cache, writer=writer, seed=args.seed,
                             progress=not args.no_progress)
    else:
        count = prepare_synthetic(parse_seeds(args.seeds), args.cache, matrix=args.matrix,
                                  writer=writer, chunk=args.chunk,
                                  keep_dicom=args.keep_dicom,
                                  fracture_rate=args.fracture_rate,
                                  progress=not args.no_progress, via_memory=args.via_memory)
    logger.info("prepared %d studies into %s in %.0f s", count, args.cache,
                time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
