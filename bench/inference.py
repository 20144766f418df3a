"""Inference: ONNX Runtime against PyTorch eager on the same model and input, in one run.

Peer: PyTorch eager (``torch.no_grad``, eval mode) running the very weights that were exported
(the checkpoints shipped next to the ONNX files; the export check proved them equal to
within 1e-4), on the same input arrays, with the same thread count.

Measured, on a synthetic 512 x 512 series written as DICOM (``service.synthetic``):

1. series complete -> findings with ONNX Runtime: ``load_volume`` + ``run_pipeline`` (the
   worker's path, sessions created once beforehand as in a worker process), median of
   ``--repeat`` runs, per stage, against the 30 s target for 300 slices on 2 CPU cores;
2. per model stage, ONNX Runtime vs PyTorch eager on the same 300-slice input (segmentation
   on the whole neck grid, classification of every vertebra in view), printed as
   torch / ORT time ratios, plus the outputs' max abs difference on that input;
3. peak RSS (``ru_maxrss``) of a fresh worker-like process that loads the runtime and
   analyses a 300- and a 600-slice series;
4. the CUDA provider, when this onnxruntime build has it; otherwise it says so.

    .venv/bin/python -m bench.inference [--slices 300] [--rss-slices 300,600] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.config import Settings
from service.imaging.volume import load_volume
from service.inference.crops import vertebra_box, vertebra_stack
from service.inference.pipeline import run_pipeline, segment_volume, segmentation_input
from service.inference.runtime import ModelRuntime, load_runtime

TARGET_S = 30.0
SEED = 4242


def series_dir(workdir: Path, slices: int) -> list[Path]:
    """Write (or reuse) a 512 x 512 synthetic series with a C5 body fracture."""
    from service.synthetic import FractureSpec, FractureType, generate_phantom, random_options
    from service.synthetic import write_series as write_dicom

    out = workdir / f"series_{slices}"
    done = out / ".done"
    if not done.exists():
        options = random_options(SEED, matrix=512, n_slices=slices)
        options.fractures = [FractureSpec(FractureType.BODY, "C5")]
        options.slice_spacing = 0.625
        options.slice_thickness = 0.625
        options.pixel_spacing = 0.43
        write_dicom(generate_phantom(options), out)
        done.write_text("ok")
    return sorted(out.glob("*.dcm"))


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def end_to_end(paths: list[Path], runtime: ModelRuntime, settings: Settings, repeat: int
               ) -> dict[str, Any]:
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        volume = load_volume(paths)
        load_s = time.perf_counter() - started
        findings = run_pipeline(volume, runtime, settings, load_seconds=load_s)
        total = time.perf_counter() - started
        runs.append({"total": total, **findings.stage_durations})
        del volume, findings
    stages = runs[0].keys()
    return {k: statistics.median(r[k] for r in runs) for k in stages}


def model_inputs(paths: list[Path], runtime: ModelRuntime) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation input (first pass) and the classifier batch the pipeline builds."""
    volume = load_volume(paths)
    pre = runtime.manifest.preprocessing
    image, _ = segmentation_input(volume.hu, volume.spacing, pre)
    segmentation = segment_volume(volume.hu, volume.spacing, runtime.seg, pre)
    spec = pre.stack_spec()
    stacks = [vertebra_stack(volume.hu, segmentation.label_map, label,
                             vertebra_box(bbox, volume.spacing, spec), spec)[0]
              for label, bbox in segmentation.in_view]
    return image, np.stack(stacks)


def ort_vs_torch(runtime: ModelRuntime, image: np.ndarray, batch: np.ndarray, threads: int,
                 repeat: int) -> dict[str, Any]:
    import torch

    from models.arch import FracExport, SegExport
    from models.export import load_checkpoints

    torch.set_num_threads(threads)
    seg, frac, _ = load_checkpoints(runtime.model_dir / "checkpoints")
    seg_t, frac_t = SegExport(seg).eval(), FracExport(frac).eval()
    image_t, batch_t = torch.from_numpy(image), torch.from_numpy(batch)
    out: dict[str, Any] = {"seg_input": list(image.shape), "frac_input": list(batch.shape)}
    with torch.no_grad():
        seg_t(image_t)
        frac_t(batch_t)
        runtime.seg.run(image)
        runtime.frac.run(batch)
        out["seg_ort_s"] = _median_time(lambda: runtime.seg.run(image), repeat)
        out["seg_torch_s"] = _median_time(lambda: seg_t(image_t), repeat)
        out["frac_ort_s"] = _median_time(lambda: runtime.frac.run(batch), repeat)
        out["frac_torch_s"] = _median_time(lambda: frac_t(batch_t), repeat)
        ort_seg = runtime.seg.run(image)[0]
        torch_seg = seg_t(image_t).numpy()
        out["seg_max_abs_diff"] = float(np.abs(ort_seg - torch_seg).max())
        out["seg_label_disagreement"] = float(
            (ort_seg.argmax(axis=1) != torch_seg.argmax(axis=1)).mean())
        ort_frac = runtime.frac.run(batch)
        torch_frac = frac_t(batch_t)
        out["frac_max_abs_diff"] = max(float(np.abs(a - b.numpy()).max())
                                       for a, b in zip(ort_frac, torch_frac, strict=True))
    return out


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB.

    Not ``ru_maxrss``: Linux carries the parent's peak across fork + exec into it, so a
    child started by a big parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(directory: Path, model_dir: Path, threads: int) -> None:
    """Worker-like process: sessions, then one analysis; prints peak RSS as JSON."""
    before = _peak_rss_mb()
    settings = Settings(model_dir=model_dir, execution_providers=["CPUExecutionProvider"],
                        ort_intra_op_threads=threads)
    runtime = load_runtime(settings)
    with_runtime = _peak_rss_mb()
    started = time.perf_counter()
    volume = load_volume(sorted(directory.glob("*.dcm")))
    run_pipeline(volume, runtime, settings)
    print(json.dumps({"before_mb": before, "with_runtime_mb": with_runtime,
                      "peak_mb": _peak_rss_mb(), "seconds": time.perf_counter() - started}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("models/cspine-v1"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cspine-bench"))
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rss-slices", default="300,600")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        child(args.child, args.model_dir, args.threads)
        return 0
    import onnxruntime as ort

    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = series_dir(args.workdir, args.slices)
    settings = Settings(model_dir=args.model_dir, execution_providers=["CPUExecutionProvider"],
                        ort_intra_op_threads=args.threads)
    runtime = load_runtime(settings)
    print(f"# bench.inference: {args.slices}-slice 512x512 synthetic series, "
          f"{args.threads} threads, median of {args.repeat}")
    e2e = end_to_end(paths, runtime, settings, args.repeat)
    print("\n## series complete -> findings (ONNX Runtime, CPU)")
    for stage, seconds in e2e.items():
        print(f"  {stage:<15} {seconds:8.3f} s")
    verdict = "meets" if e2e["total"] <= TARGET_S else "MISSES"
    print(f"  total {e2e['total']:.2f} s vs target {TARGET_S:.0f} s: {verdict} the target "
          f"(ratio target/ours = {TARGET_S / e2e['total']:.1f}x)")

    image, batch = model_inputs(paths, runtime)
    cmp = ort_vs_torch(runtime, image, batch, args.threads, args.repeat)
    print("\n## ONNX Runtime vs PyTorch eager (same weights, same input, same threads)")
    print(f"  segmentation   input {cmp['seg_input']}: ORT {cmp['seg_ort_s']:.3f} s, torch "
          f"{cmp['seg_torch_s']:.3f} s -> torch/ORT = {cmp['seg_torch_s'] / cmp['seg_ort_s']:.2f}x"
          f"  (max |diff| {cmp['seg_max_abs_diff']:.2e}, label disagreement "
          f"{cmp['seg_label_disagreement'] * 100:.4f} % of voxels)")
    print(f"  classification input {cmp['frac_input']}: ORT {cmp['frac_ort_s']:.3f} s, torch "
          f"{cmp['frac_torch_s']:.3f} s -> torch/ORT = "
          f"{cmp['frac_torch_s'] / cmp['frac_ort_s']:.2f}x  (max |diff| "
          f"{cmp['frac_max_abs_diff']:.2e})")

    print("\n## peak RSS of a worker-like process (fresh process per series)")
    rss: dict[str, Any] = {}
    for n in [int(s) for s in args.rss_slices.split(",") if s]:
        series_dir(args.workdir, n)
        proc = subprocess.run(
            [sys.executable, "-m", "bench.inference", "--child", str(args.workdir / f"series_{n}"),
             "--model-dir", str(args.model_dir), "--threads", str(args.threads)],
            capture_output=True, text=True, check=True)
        rss[str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = rss[str(n)]
        print(f"  {n} slices: peak {r['peak_mb']:.0f} MB (interpreter {r['before_mb']:.0f} MB, "
              f"with sessions {r['with_runtime_mb']:.0f} MB), analysis {r['seconds']:.1f} s")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        gpu = Settings(model_dir=args.model_dir,
                       execution_providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        gpu_runtime = load_runtime(gpu)
        g = end_to_end(paths, gpu_runtime, gpu, args.repeat)
        print(f"\n## CUDA provider ({gpu_runtime.provider}): total {g['total']:.2f} s, "
              f"segmentation {g['segmentation']:.3f} s, classification "
              f"{g['classification']:.3f} s")
    else:
        print("\n## CUDA provider: not measured (this onnxruntime build has no CUDA provider; "
              "no GPU here)")
    print(json.dumps({"end_to_end": e2e, "ort_vs_torch": cmp, "rss": rss}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
