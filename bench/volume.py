"""Series loading: ``load_volume`` against a naive loop, same files, same run.

Peer ("naive"): ``np.stack([dcmread(p).pixel_array for p in paths])``, i.e. read every file
whole, decode, stack. It does *less* than ``load_volume`` (no sorting, no rescale to HU, no
duplicate or geometry checks, no header stripping), so the ratio is conservative.

Measured:

1. load time of a 300-slice 512 x 512 series, uncompressed (Explicit VR Little Endian) and
   JPEG 2000 lossless, median of ``--repeat`` alternating runs after one warm-up run each
   (files in the page cache), printed as naive / ours;
2. the cost of gantry-tilt correction: the uncompressed series written with a 20 degree
   tilt, loaded (and resampled to axial) by ``load_volume``, against the untilted load;
3. peak RSS (``ru_maxrss``) of loading a 600-slice 512 x 512 uncompressed series, each
   loader in a fresh child process, with the RSS of the same process just before loading.

The series are synthetic (noise on a rough neck cross-section), written once under
``--workdir`` with pydicom and reused by later runs.

    .venv/bin/python -m bench.volume [--slices 300] [--rss-slices 600] [--repeat 3]
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

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless

from service.imaging.volume import load_volume

SIZE = 512
SPACING = 0.5
SLICE_SPACING = 0.625


def _slice_image(k: int, rng: np.random.Generator) -> np.ndarray:
    """Stored values (uint16, intercept -1024) of a rough neck cross-section with CT noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cy, cx = SIZE * 0.5, SIZE * 0.5
    body = ((yy - cy) / (SIZE * 0.33)) ** 2 + ((xx - cx) / (SIZE * 0.40)) ** 2 < 1
    spine = ((yy - cy - SIZE * 0.06) / (SIZE * 0.05)) ** 2 + ((xx - cx) / (SIZE * 0.06)) ** 2 < 1
    hu = np.full((SIZE, SIZE), -1000.0, np.float32)
    hu[body] = 40.0
    hu[spine] = 700.0 + 50.0 * np.sin(k / 20.0)
    hu += rng.normal(0.0, 25.0, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu + 1024.0), 0, 4095).astype(np.uint16)


def write_series(directory: Path, count: int, syntax: UID, tilt_deg: float = 0.0) -> list[Path]:
    """Write (or reuse) ``count`` single-frame CT slices in ``syntax``; ``tilt_deg`` tilts the
    image planes about x while the table still advances along z (a gantry tilt)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / "COMPLETE"
    paths = [directory / f"IM{k:04d}.dcm" for k in range(count)]
    if done.exists():
        return paths
    rng = np.random.default_rng(0)
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    for k, path in enumerate(paths):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = count - k
        t = np.radians(tilt_deg)
        ds.ImageOrientationPatient = [1, 0, 0, 0, round(float(np.cos(t)), 6),
                                      round(float(-np.sin(t)), 6)]
        ds.ImagePositionPatient = [-128.0, -128.0, round(-200.0 + k * SLICE_SPACING, 4)]
        ds.PixelSpacing = [SPACING, SPACING]
        ds.SliceThickness = SLICE_SPACING
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.AcquisitionDate, ds.AcquisitionTime = "20240315", "101500"
        ds.PixelData = _slice_image(k, rng).tobytes()
        if syntax.is_encapsulated:
            ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)
    done.touch()
    return paths


def naive(paths: list[Path]) -> np.ndarray:
    return np.stack([pydicom.dcmread(p).pixel_array for p in paths])


def ours(paths: list[Path]) -> np.ndarray:
    return load_volume(paths).hu


LOADERS: dict[str, Callable[[list[Path]], np.ndarray]] = {"naive": naive, "ours": ours}


def _time(loader: Callable[[list[Path]], np.ndarray], paths: list[Path]) -> float:
    started = time.perf_counter()
    loader(paths)
    return time.perf_counter() - started


def compare_times(paths: list[Path], repeat: int) -> dict[str, float]:
    for loader in LOADERS.values():  # warm-up: page cache, imports, decoder plugins
        loader(paths)
    samples: dict[str, list[float]] = {name: [] for name in LOADERS}
    for _ in range(repeat):
        for name, loader in LOADERS.items():
            samples[name].append(_time(loader, paths))
    return {name: statistics.median(values) for name, values in samples.items()}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_child(loader_name: str, directory: Path) -> None:
    """Child process body: print current RSS before, and peak RSS of, one load (MB) as JSON."""
    paths = sorted(directory.glob("IM*.dcm"))
    import gc

    gc.collect()
    before = _current_rss_mb()
    started = time.perf_counter()
    array = LOADERS[loader_name](paths)
    elapsed = time.perf_counter() - started
    print(json.dumps({"before_mb": before, "peak_mb": _max_rss_mb(), "seconds": elapsed,
                      "array_mb": array.nbytes / 2**20, "dtype": str(array.dtype)}))


def measure_rss(directory: Path) -> dict[str, dict[str, float]]:
    results = {}
    for name in LOADERS:
        out = subprocess.run([sys.executable, "-m", "bench.volume", "--rss-child", name,
                              str(directory)], check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rss-slices", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cspine-bench-volume"))
    parser.add_argument("--rss-child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.rss_child:
        rss_child(args.rss_child[0], Path(args.rss_child[1]))
        return

    print(f"series: {SIZE}x{SIZE} synthetic CT, single-frame files; naive = dcmread + "
          "pixel_array + np.stack (no sort, no HU); ours = load_volume (sorted HU int16, QC)")
    times_by_syntax: dict[str, dict[str, float]] = {}
    for label, syntax in (("uncompressed", ExplicitVRLittleEndian),
                          ("JPEG 2000 lossless", JPEG2000Lossless)):
        directory = args.workdir / f"{args.slices}-{syntax}"
        write_started = time.perf_counter()
        paths = write_series(directory, args.slices, syntax)
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(f"\n{args.slices} slices, {label}: {size_mb:.0f} MB on disk "
              f"(ready in {time.perf_counter() - write_started:.1f} s)")
        times = compare_times(paths, args.repeat)
        times_by_syntax[str(syntax)] = times
        for name, seconds in times.items():
            print(f"  {name:6s} {seconds:7.2f} s  ({args.slices / seconds:6.0f} slices/s)")
        print(f"  ratio naive/ours = {times['naive'] / times['ours']:.2f} "
              "(> 1: ours faster)")

    untilted = times_by_syntax[str(ExplicitVRLittleEndian)]["ours"]
    tilted_paths = write_series(args.workdir / f"{args.slices}-tilt20", args.slices,
                                ExplicitVRLittleEndian, tilt_deg=20.0)
    ours(tilted_paths)
    tilted = statistics.median(_time(ours, tilted_paths) for _ in range(args.repeat))
    print(f"\n{args.slices} slices uncompressed with 20 deg gantry tilt (resampled to axial):")
    print(f"  ours   {tilted:7.2f} s; untilted {untilted:.2f} s; ratio tilted/untilted = "
          f"{tilted / untilted:.1f}")

    directory = args.workdir / f"{args.rss_slices}-{ExplicitVRLittleEndian}"
    write_series(directory, args.rss_slices, ExplicitVRLittleEndian)
    rss = measure_rss(directory)
    print(f"\npeak RSS loading {args.rss_slices} slices {SIZE}x{SIZE} uncompressed "
          "(fresh process each):")
    for name, values in rss.items():
        print(f"  {name:6s} peak {values['peak_mb']:7.0f} MB  (process before load "
              f"{values['before_mb']:.0f} MB, result {values['array_mb']:.0f} MB "
              f"{values['dtype']}, {values['seconds']:.1f} s)")
    ratio = rss["naive"]["peak_mb"] / rss["ours"]["peak_mb"]
    verdict = "meets" if rss["ours"]["peak_mb"] < 1536 else "MISSES"
    print(f"  ratio naive/ours = {ratio:.2f}; ours {verdict} the < 1.5 GB target")


if __name__ == "__main__":
    main()
