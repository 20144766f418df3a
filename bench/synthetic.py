"""Benchmark: generating one synthetic cervical-spine CT series.

Times ``generate_phantom`` for a 300-slice 512x512 series (and the 256 matrix used for
training data), then prints ratios against peers measured in the same run on the same
machine:

* ``gaussian_filter``: one scipy.ndimage.gaussian_filter (sigma 1 voxel) over the same
  float32 volume: the full-volume filter the generator avoids by folding blur into edges;
* ``write_series``: writing the generated series as Explicit VR Little Endian DICOM.

Run: ``python bench/synthetic.py [--repeats 3] [--threads N]``. Uses the machine as it is;
on a shared machine read the ratios rather than the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from service.synthetic import PhantomOptions, WriterOptions, generate_phantom, write_series


def _time(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="limit numpy/threads used by the generator (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        import service.synthetic.phantom as phantom_module

        phantom_module._threads = lambda: args.threads  # type: ignore[attr-defined]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cores} cores available, load average {load:.1f}")

    full = PhantomOptions(seed=1, fractures=2, mimics=2)
    t_full, phantom = _time(lambda: generate_phantom(full), args.repeats)
    stages = phantom.timings  # type: ignore[attr-defined]
    small = PhantomOptions(seed=1, fractures=2, mimics=2, matrix=256, pixel_spacing=0.8)
    t_small, _ = _time(lambda: generate_phantom(small), args.repeats)

    volume = phantom.hu.astype(np.float32)  # type: ignore[attr-defined]
    t_filter, _ = _time(lambda: gaussian_filter(volume, 1.0), 1)
    with tempfile.TemporaryDirectory() as tmp:
        t_write, _ = _time(lambda: write_series(phantom, Path(tmp) / "s",  # type: ignore
                                                WriterOptions()), 1)

    print(f"generate_phantom 300x512x512: {t_full:.2f} s (median of {args.repeats}); "
          + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items() if k != "total"))
    print(f"generate_phantom 300x256x256 (training matrix): {t_small:.2f} s")
    print(f"peer gaussian_filter (sigma 1) on the same volume: {t_filter:.2f} s -> "
          f"generation = {t_full / t_filter:.2f}x one full-volume filter")
    print(f"peer write_series explicit VR LE (300 files): {t_write:.2f} s -> "
          f"generation = {t_full / t_write:.2f}x writing the series")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
