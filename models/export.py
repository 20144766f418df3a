"""Export trained checkpoints to ONNX, check ONNX Runtime against torch, write the model dir.

    python -m models.export --checkpoints var/train/cspine-v1 --out models/cspine-v1

Both graphs use opset 17 with a dynamic batch axis; the segmentation net also takes any
spatial size divisible by its divisor, the classifier any slice count. The check runs the same
random inputs (with shapes other than the export example, so the dynamic axes are exercised)
through torch and ONNX Runtime (CPU) and reports the largest absolute difference of each
output; export fails when it exceeds ``--tolerance``.

Thresholds: ``--vertebra-threshold`` / ``--patient-threshold`` (default 0.5) are placeholders
until ``python -m models.calibrate`` chooses them on the validation split.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from models.arch import FracConfig, FracExport, FractureNet, SegConfig, SegExport, SegUNet3D
from models.config import default_preprocessing
from service.inference.manifest import (
    ModelFile,
    ModelManifest,
    OnnxModel,
    Preprocessing,
    TensorSpec,
    Thresholds,
    dump_manifest,
)
from service.inference.runtime import sha256_file

logger = logging.getLogger(__name__)

OPSET = 17
DEFAULT_TOLERANCE = 1e-4


def _export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
            output_names: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is the one that keeps the GRU's slice axis dynamic.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=output_names, dynamic_axes=dynamic_axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_seg(net: SegUNet3D, path: Path) -> None:
    c = net.config
    d = net.divisor
    example = torch.rand(1, c.in_channels, 4 * d, 5 * d, 5 * d)
    _export(SegExport(net), example, path, "image", ["probabilities"],
            {"image": {0: "batch", 2: "z", 3: "y", 4: "x"},
             "probabilities": {0: "batch", 2: "z", 3: "y", 4: "x"}})


def export_frac(net: FractureNet, path: Path, slices: int, size: int) -> None:
    example = torch.rand(2, slices, net.config.in_channels, size, size)
    _export(FracExport(net), example, path, "stack", ["fracture_probability", "slice_scores"],
            {"stack": {0: "batch", 1: "slices"}, "fracture_probability": {0: "batch"},
             "slice_scores": {0: "batch", 1: "slices"}})


def max_abs_diff(module: torch.nn.Module, path: Path, inputs: torch.Tensor) -> float:
    """Largest |torch - ORT(CPU)| over all outputs for the same input."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ort_out = session.run(None, {name: inputs.numpy()})
    with torch.no_grad():
        torch_out = module.eval()(inputs)
    if isinstance(torch_out, torch.Tensor):
        torch_out = (torch_out,)
    return max(float(np.abs(a - b.numpy()).max()) for a, b in zip(ort_out, torch_out,
                                                                     strict=True))


@dataclass
class ExportCheck:
    seg_max_abs_diff: float
    frac_max_abs_diff: float

    def as_dict(self) -> dict[str, float]:
        return {"seg_max_abs_diff": self.seg_max_abs_diff,
                "frac_max_abs_diff": self.frac_max_abs_diff}


def check_exports(seg: SegUNet3D, frac: FractureNet, out: Path, pre: Preprocessing,
                  seed: int = 0) -> ExportCheck:
    """Compare torch and ORT on inputs shaped unlike the export examples (dynamic axes)."""
    g = torch.Generator().manual_seed(seed)
    d = seg.divisor
    seg_in = torch.rand(2, seg.config.in_channels, 3 * d, 6 * d, 7 * d, generator=g)
    frac_in = torch.rand(3, pre.crop_slices + 3, frac.config.in_channels, pre.crop_size,
                         pre.crop_size, generator=g)
    frac_in[:, :, -1] = (frac_in[:, :, -1] > 0.5).float()  # the mask channel is binary
    return ExportCheck(
        seg_max_abs_diff=max_abs_diff(SegExport(seg), out / "seg.onnx", seg_in),
        frac_max_abs_diff=max_abs_diff(FracExport(frac), out / "frac.onnx", frac_in),
    )


def _file(path: Path) -> ModelFile:
    return ModelFile(file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)


def build_manifest(out: Path, pre: Preprocessing, seg: SegUNet3D, frac: FractureNet, *,
                   name: str, version: str, thresholds: Thresholds, synthetic_only: bool,
                   training: dict[str, Any], validation: dict[str, Any]) -> ModelManifest:
    classes = len(pre.seg_classes)
    channels = len(pre.windows)
    return ModelManifest(
        name=name,
        version=version,
        created=dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        synthetic_only=synthetic_only,
        seg=OnnxModel(
            model=_file(out / "seg.onnx"), opset=OPSET,
            inputs=[TensorSpec(name="image", shape=["batch", channels, "z", "y", "x"])],
            outputs=[TensorSpec(name="probabilities", shape=["batch", classes, "z", "y", "x"])]),
        frac=OnnxModel(
            model=_file(out / "frac.onnx"), opset=OPSET,
            inputs=[TensorSpec(name="stack", shape=["batch", "slices", frac.config.in_channels,
                                                    pre.crop_size, pre.crop_size])],
            outputs=[TensorSpec(name="fracture_probability", shape=["batch"]),
                     TensorSpec(name="slice_scores", shape=["batch", "slices"])]),
        preprocessing=pre,
        thresholds=thresholds,
        patient_aggregation="max",
        training=training,
        validation=validation,
    )


def load_checkpoints(directory: Path) -> tuple[SegUNet3D, FractureNet, dict[str, Any]]:
    seg_state = torch.load(directory / "seg.pt", map_location="cpu", weights_only=False)
    frac_state = torch.load(directory / "frac.pt", map_location="cpu", weights_only=False)
    seg_cfg = seg_state["config"]
    frac_cfg = frac_state["config"]
    # Checkpoints written before the head was configurable had the softmax head.
    seg = SegUNet3D(SegConfig(**{"head": "softmax", **seg_cfg,
                                 "widths": tuple(seg_cfg["widths"])}))
    # Checkpoints written before the fracture-map head existed: no pixel head, and the
    # encoder blocks were an ``encoder`` Sequential.
    frac = FractureNet(FracConfig(**{"pixel_head": False, **frac_cfg,
                                     "widths": tuple(frac_cfg["widths"])}))
    seg.load_state_dict(seg_state["state"])
    frac.load_state_dict({k.replace("encoder.", "blocks.", 1) if k.startswith("encoder.") else k:
                          v for k, v in frac_state["state"].items()})
    history_path = directory / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else {}
    # The step each shipped checkpoint was saved at (the best validation, not the last).
    for stage, state in (("seg", seg_state), ("frac", frac_state)):
        if stage in history and "step" in state:
            history[stage]["checkpoint_step"] = state["step"]
    return seg.eval(), frac.eval(), history


def export_model_dir(seg: SegUNet3D, frac: FractureNet, out: Path, *,
                     pre: Preprocessing | None = None, name: str = "cspine-v1",
                     version: str = "1.0.0", thresholds: Thresholds | None = None,
                     synthetic_only: bool = True, training: dict[str, Any] | None = None,
                     validation: dict[str, Any] | None = None,
                     tolerance: float = DEFAULT_TOLERANCE) -> tuple[ModelManifest, ExportCheck]:
    """Write seg.onnx, frac.onnx and manifest.json into ``out``; verify against torch."""
    pre = pre or default_preprocessing()
    out.mkdir(parents=True, exist_ok=True)
    export_seg(seg, out / "seg.onnx")
    export_frac(frac, out / "frac.onnx", pre.crop_slices, pre.crop_size)
    check = check_exports(seg, frac, out, pre)
    logger.info("export check: %s", check.as_dict())
    if max(check.seg_max_abs_diff, check.frac_max_abs_diff) > tolerance:
        raise RuntimeError(f"ONNX Runtime differs from torch beyond {tolerance}: "
                           f"{check.as_dict()}")
    thresholds = thresholds or Thresholds(vertebra=0.5, patient=0.5,
                                          selection="placeholder (not calibrated)")
    training = dict(training or {})
    training["export_check"] = check.as_dict()
    manifest = build_manifest(out, pre, seg, frac, name=name, version=version,
                              thresholds=thresholds, synthetic_only=synthetic_only,
                              training=training, validation=validation or {})
    dump_manifest(manifest, out)
    return manifest, check


def ship_checkpoints(source: Path, out: Path) -> dict[str, str]:
    """Copy the torch checkpoints next to the ONNX files (fine-tuning; the bench's eager peer).

    Returns their sha256 by name, for the manifest's training section.
    """
    import shutil

    target = out / "checkpoints"
    target.mkdir(parents=True, exist_ok=True)
    shas = {}
    for name in ("seg.pt", "frac.pt", "history.json"):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)
            shas[name] = sha256_file(target / name)
    return shas


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="cspine-v1")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--vertebra-threshold", type=float, default=0.5)
    parser.add_argument("--patient-threshold", type=float, default=0.5)
    parser.add_argument("--real-data", action="store_true",
                        help="the weights were trained on real data (synthetic_only=false)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    parser.add_argument("--no-checkpoints", action="store_true",
                        help="do not copy the torch checkpoints into OUT/checkpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    seg, frac, history = load_checkpoints(args.checkpoints)
    training = _training_summary(history)
    if not args.no_checkpoints:
        training["checkpoints"] = ship_checkpoints(args.checkpoints, args.out)
    manifest, check = export_model_dir(
        seg, frac, args.out, name=args.name, version=args.version,
        thresholds=Thresholds(vertebra=args.vertebra_threshold, patient=args.patient_threshold,
                              selection="given on the command line (not calibrated)"),
        synthetic_only=not args.real_data, training=training, tolerance=args.tolerance)
    total = sum(f.bytes for f in manifest.files())
    print(json.dumps({"out": str(args.out), "bytes": total, **check.as_dict()}, indent=2))
    return 0


def _training_summary(history: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: history[k] for k in ("train_studies", "val_studies", "seed",
                                                   "device", "threads", "seconds", "note")
                           if k in history}
    for stage in ("seg", "frac"):
        if stage in history:
            h = history[stage]
            log = h.get("log") or []
            shipped = [e for e in log if e.get("step") == h.get("checkpoint_step")]
            out[stage] = {"seconds": round(h.get("seconds", 0.0), 1),
                          "parameters": h.get("parameters"),
                          "shipped_validation": shipped[0] if shipped else None,
                          "last_validation": log[-1] if log else None}
    return out


if __name__ == "__main__":
    sys.exit(main())
