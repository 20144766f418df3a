"""SEG size and build time for a 300-slice series: our default against named peers.

Default (``TRIAGE_SEG_ENCODING=NATIVE``): BINARY with uncompressed, bit-packed frames (Explicit
VR Little Endian). Named peer, measured in the same run on the same label map: the previous
default, BINARY + JPEG 2000 lossless, built the way it was before issue 22 (highdicom's IOD
lookup not memoized) and as it is now (memoized, ``TRIAGE_SEG_ENCODING=JPEG2000``); also
LABELMAP + RLE (its NATIVE form), LABELMAP + JPEG 2000 and LABELMAP uncompressed, and the SR
build time. Synthetic inputs (ellipsoidal "vertebrae" with ragged edges on a 512 x 512 x 300
grid), not clinical data. The machine may be shared: trust the ratios more than the seconds.

    .venv/bin/python -m bench.results [--slices 300] [--size 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from harness.data.results_inputs import make_ct_series, volume_from
from service.config import SegFormat
from service.findings import VERTEBRAE, Findings, VertebraFinding
from service.results import hdcache
from service.results.common import AlgorithmInfo
from service.results.seg import build_segmentation
from service.results.sr import build_report

ROOT = "1.2.826.0.1.3680043.10.1455."


def vertebra_label_map(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Seven stacked ellipsoids (body plus a posterior arch), edges roughened by noise."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, rows, cols), np.uint8)
    yy, xx = np.mgrid[0:rows, 0:cols]
    height = int(n * 0.6) // len(VERTEBRAE)
    top = int(n * 0.9)
    for i in range(len(VERTEBRAE)):
        z1 = top - i * height
        z0 = z1 - height + 3  # a 3-slice disc between vertebrae
        cy, cx = rows * 0.45, cols * 0.5
        for z in range(max(z0, 0), max(z1, 0)):
            t = (z - z0) / max(1, z1 - z0) - 0.5
            ry, rx = rows * 0.07 * (1 - t * t), cols * 0.09 * (1 - t * t)
            body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            arch = ((yy - cy - rows * 0.12) / (ry * 0.8)) ** 2 + ((xx - cx) / (rx * 1.3)) ** 2
            noise = rng.normal(0, 0.08, (rows, cols))
            mask = (np.minimum(body, arch) + noise) < 1.0
            labels[z][mask] = i + 1
    return labels


@contextmanager
def unmemoized() -> Iterator[None]:
    """highdicom's own IOD lookup for the duration (as before :mod:`service.results.hdcache`)."""
    import importlib

    home = importlib.import_module(hdcache._MODULES[0])
    memo = home.is_attribute_in_iod
    original = getattr(memo, "__wrapped__", memo)
    modules = [importlib.import_module(name) for name in hdcache._MODULES]
    for module in modules:
        module.is_attribute_in_iod = original  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module in modules:
            module.is_attribute_in_iod = memo  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    volume = volume_from(make_ct_series(args.slices, args.size, args.size, with_pixels=False))
    label_map = vertebra_label_map(args.slices, args.size, args.size)
    findings = Findings(
        series_instance_uid=volume.series_instance_uid, model_name="bench", model_version="1",
        vertebrae=[VertebraFinding(vertebra=v, in_view=True, probability=0.1, suspected=False,
                                   slice_range=(0, 0)) for v in VERTEBRAE],
        patient_probability=0.1, patient_suspected=False, vertebra_threshold=0.5,
        patient_threshold=0.5, label_map=label_map)
    algorithm = AlgorithmInfo(name="bench", version="1")
    voxels = int((label_map > 0).sum())
    print(f"series: {args.slices} slices of {args.size}x{args.size}, "
          f"{voxels} labelled voxels ({100 * voxels / label_map.size:.2f} %), "
          f"{int((label_map > 0).any(axis=(1, 2)).sum())} slices with a vertebra")

    # Warm-up: highdicom reads the standard's tables once per process (a worker pays it once).
    build_segmentation(volume, findings, uid_root=ROOT, algorithm=algorithm)
    variants = [
        ("BINARY + JPEG 2000, unmemoized (before)", SegFormat.BINARY, JPEG2000Lossless, False),
        ("BINARY uncompressed (NATIVE, default)", SegFormat.BINARY, ExplicitVRLittleEndian,
         True),
        ("BINARY + JPEG 2000 (JPEG2000 encoding)", SegFormat.BINARY, JPEG2000Lossless, True),
        ("BINARY uncompressed, unmemoized", SegFormat.BINARY, ExplicitVRLittleEndian, False),
        ("LABELMAP + RLE (NATIVE)", SegFormat.LABELMAP, RLELossless, True),
        ("LABELMAP + JPEG 2000 lossless", SegFormat.LABELMAP, JPEG2000Lossless, True),
        ("LABELMAP uncompressed (Explicit VR LE)", SegFormat.LABELMAP, ExplicitVRLittleEndian,
         True),
    ]
    results: list[tuple[str, int, float, int]] = []
    for name, seg_format, syntax, memoized in variants:
        times, size, frames = [], 0, 0
        for _ in range(args.repeat):
            with unmemoized() if not memoized else nullcontext():
                start = time.perf_counter()
                seg = build_segmentation(volume, findings, uid_root=ROOT, algorithm=algorithm,
                                         seg_format=seg_format, transfer_syntax_uid=syntax)
                assert seg is not None
                buffer = io.BytesIO()
                seg.dataset.save_as(buffer)
                times.append(time.perf_counter() - start)
            size, frames = len(buffer.getvalue()), int(seg.dataset.NumberOfFrames)
        results.append((name, size, statistics.median(times), frames))

    base_name, base_size, base_time, _ = results[0]
    print(f"\n{'variant':42s} {'frames':>6s} {'bytes':>12s} {'size x':>8s} "
          f"{'build s':>8s} {'time x':>7s}")
    for name, size, seconds, frames in results:
        print(f"{name:42s} {frames:6d} {size:12d} {size / base_size:8.2f} "
              f"{seconds:8.2f} {seconds / base_time:7.2f}")
    print(f"(ratios against '{base_name}', median of {args.repeat} builds, "
          "build time includes writing to memory)")
    for name, size, seconds, _ in results[1:]:
        print(f"ratio {name} / {base_name}: size {size / base_size:.2f}x, "
              f"build time {seconds / base_time:.2f}x")

    seg = build_segmentation(volume, findings, uid_root=ROOT, algorithm=algorithm)
    sr_times: dict[bool, float] = {}
    for memoized in (False, True):
        times = []
        for _ in range(args.repeat):
            with unmemoized() if not memoized else nullcontext():
                start = time.perf_counter()
                sr = build_report(volume, findings, uid_root=ROOT, algorithm=algorithm,
                                  segmentation=seg)
                buffer = io.BytesIO()
                sr.save_as(buffer)
                times.append(time.perf_counter() - start)
        sr_times[memoized] = statistics.median(times)
    print(f"\nSR (TID 1500, 7 vertebra groups, {args.slices} evidence references): "
          f"{len(buffer.getvalue())} bytes, built in {sr_times[True]:.2f} s "
          f"({sr_times[False]:.2f} s unmemoized)")
    before = results[0][2] + sr_times[False]
    after = results[1][2] + sr_times[True]
    print(f"ratio SEG+SR now (NATIVE, memoized) / before (JPEG 2000, unmemoized): "
          f"{after / before:.2f}x ({after:.2f} s vs {before:.2f} s)")


if __name__ == "__main__":
    main()
