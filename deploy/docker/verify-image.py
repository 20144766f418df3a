#!/usr/bin/env python3
"""Build-time self-check of a cspine-triage image; a failed check fails ``docker build``.

It catches the mistakes that otherwise only show at run time, on a GPU node:

* both ``onnxruntime`` and ``onnxruntime-gpu`` installed (they share one import package);
* a GPU image whose ONNX Runtime has no CUDA provider compiled in (the session would fall
  back to the CPU without an error);
* torch in the runtime image (training only: the runtime must never import it);
* migrations or model artifacts missing where ``triage db upgrade`` and the worker look.

No GPU is needed: ``get_available_providers()`` lists the providers built into the wheel,
it does not open a device.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from importlib import metadata
from pathlib import Path


def installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def check_runtime_distribution(gpu: bool) -> list[str]:
    """Exactly one ONNX Runtime distribution, the one this image is for."""
    problems: list[str] = []
    cpu_dist, gpu_dist = installed("onnxruntime"), installed("onnxruntime-gpu")
    if cpu_dist and gpu_dist:
        problems.append("both onnxruntime and onnxruntime-gpu are installed")
    if gpu and not gpu_dist:
        problems.append("onnxruntime-gpu is not installed")
    if not gpu and not cpu_dist:
        problems.append("onnxruntime is not installed")
    return problems


def check_providers(gpu: bool) -> list[str]:
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CPUExecutionProvider" not in providers:
        return [f"no CPUExecutionProvider in {providers}"]
    if gpu and "CUDAExecutionProvider" not in providers:
        return [f"no CUDAExecutionProvider in {providers}"]
    return []


def check_no_torch() -> list[str]:
    if importlib.util.find_spec("torch") is not None:
        return ["torch is importable: the runtime image must not ship it"]
    return []


def check_service_layout(model_dir: Path | None) -> list[str]:
    """Migrations sit where ``service.db.migrate`` looks; the model where the worker looks."""
    from service.cli import build_parser
    from service.db import migrate

    build_parser()
    problems: list[str] = []
    if not (migrate.ALEMBIC_DIR / "env.py").is_file():
        problems.append(f"no Alembic scripts at {migrate.ALEMBIC_DIR}")
    if model_dir is not None and not (model_dir / "manifest.json").is_file():
        problems.append(f"no model manifest at {model_dir / 'manifest.json'}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--gpu", action="store_true", help="image with onnxruntime-gpu")
    kind.add_argument("--cpu", action="store_true", help="image with onnxruntime")
    parser.add_argument("--model-dir", type=Path, help="expect a model manifest here")
    args = parser.parse_args(argv)
    problems = (check_runtime_distribution(args.gpu) + check_providers(args.gpu)
                + check_no_torch() + check_service_layout(args.model_dir))
    for problem in problems:
        print(f"verify-image: {problem}", file=sys.stderr)
    if not problems:
        print(f"verify-image: ok ({'gpu' if args.gpu else 'cpu'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
