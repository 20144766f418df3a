"""Tissue HU and noise levels, calibrated on a real head-and-neck CT.

The reference series (``../shared/data/real-ct-head-neck``: Picker PQ2000, 1.0 mm pixels,
3 mm slices, standard kernel; never copied into this repository) was measured with
``python -m service.synthetic.calibration <dir>``: histogram modes of fat and soft tissue,
percentiles of cancellous and cortical bone inside the cervical vertebrae, and the noise
standard deviation in homogeneous soft tissue (estimated from differences of neighbouring
pixels, which removes anatomy). Measured (``measure()``): fat mode -117.5 HU, soft-tissue
mode +22.5 HU (all soft tissue, brain included; neck muscle sits higher), air median -1014,
cancellous bone median 275 HU (voxels 150-500), bone 90th / 99th percentile 1304 / 1638 HU,
noise sigma 4.3 HU in the smoothest soft-tissue windows (a lower bound) and 17.4 HU from
neighbour differences (an upper bound, edges included) at 1.0 mm / 3 mm with a standard
kernel. The phantom's tissue values below follow those figures. The noise at the
reference geometry is scaled from ~10 HU there with sigma ~ 1/sqrt(slice thickness) and
~ 1/pixel size (58 HU bone kernel / 14 HU soft kernel at 0.4 mm, 0.625 mm), in the range
published for sharp-kernel neck CT (40-90 HU at 0.6 mm).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueHU:
    air: float = -1000.0
    lung: float = -840.0
    fat: float = -105.0
    """Real CT: subcutaneous fat mode -110 (10th-90th percentile -155..-45 incl. blur)."""
    muscle: float = 48.0
    """Real CT: soft-tissue mode +15..+30 over all soft tissue; neck muscle 40-55."""
    blood: float = 42.0
    csf: float = 8.0
    cord: float = 32.0
    brain: float = 34.0
    disc: float = 82.0


HU = TissueHU()


@dataclass(frozen=True)
class NoiseModel:
    """Noise standard deviation (HU) in neck soft tissue at the reference geometry
    (0.4 mm pixels, 0.625 mm slices); scaled by ``sigma`` for other geometries."""

    bone_ref: float = 58.0
    soft_ref: float = 14.0
    ref_pixel_mm: float = 0.4
    ref_thickness_mm: float = 0.625

    def sigma(self, kernel: str, pixel_mm: float, thickness_mm: float) -> float:
        base = self.bone_ref if kernel == "BONE" else self.soft_ref
        return float(base * (self.ref_pixel_mm / pixel_mm) ** 1.0
                     * (self.ref_thickness_mm / thickness_mm) ** 0.5)


NOISE = NoiseModel()


def measure(ct_dir: Path) -> dict[str, float]:
    """Measure HU figures of a real CT series (used to set the constants above)."""
    import pydicom

    datasets = [pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm"))]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    vol = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                    for d in datasets]).astype(np.float32)

    def mode(lo: float, hi: float) -> float:
        values = vol[(vol >= lo) & (vol < hi)]
        hist, edges = np.histogram(values, bins=np.arange(lo, hi + 5, 5))
        return float(edges[int(np.argmax(hist))] + 2.5)

    # Noise: in smooth soft tissue, the difference of horizontal neighbours has variance
    # 2 sigma^2 (anatomy cancels out).
    diff = vol[:, :, 1:] - vol[:, :, :-1]
    center = vol[:, :, 1:]
    smooth = (center > 0) & (center < 80) & (np.abs(diff) < 200)
    from scipy.ndimage import uniform_filter

    local = uniform_filter(vol, size=(1, 7, 7))
    local_sq = uniform_filter(vol * vol, size=(1, 7, 7))
    local_std = np.sqrt(np.maximum(local_sq - local * local, 0))
    flat = (local > 20) & (local < 70) & (local_std < np.percentile(
        local_std[(local > 20) & (local < 70)], 20))
    bone = vol > 150
    return {
        "fat_mode": mode(-200, -30),
        "soft_mode": mode(-20, 100),
        "air_median": float(np.median(vol[vol < -900])),
        "cancellous_p50": float(np.percentile(vol[bone & (vol < 500)], 50)),
        "cortex_p90": float(np.percentile(vol[bone], 90)),
        "cortex_p99": float(np.percentile(vol[bone], 99)),
        "noise_sigma_diff": float(np.std(diff[smooth]) / np.sqrt(2)),
        "noise_sigma_flat": float(np.median(local_std[flat])),
        "pixel_mm": float(datasets[0].PixelSpacing[0]),
        "thickness_mm": float(datasets[0].SliceThickness),
    }


if __name__ == "__main__":  # pragma: no cover - manual calibration aid
    print(measure(Path(sys.argv[1])))
