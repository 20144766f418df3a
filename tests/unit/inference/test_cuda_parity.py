"""The CUDA execution provider answers as the CPU provider does, on the shipped model.

Marked ``gpu``: collected only where onnxruntime has the CUDA provider (``onnxruntime-gpu`` on
a GPU machine; README.md, "Deployment", for the GPU image), deselected elsewhere
with the reason in the summary (tests/conftest.py); ``make test-gpu`` runs them and fails
where the provider does not start. Both stages, fp32, the same random inputs, through
:meth:`service.inference.runtime.Stage.run` (I/O binding on the GPU, as the worker runs it).
Tolerances: probabilities within 1e-3 absolute (cuDNN picks other convolution algorithms
than MLAS; the export check holds torch vs CPU ORT to 1e-4), and the segmentation's arg-max
label equal on at least 99.9 % of voxels (ties between classes may flip).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.config import Settings
from service.inference.runtime import ModelRuntime, load_runtime
from service.shipped import model_dir

CUDA = "CUDAExecutionProvider"

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def runtimes() -> tuple[ModelRuntime, ModelRuntime]:
    assert CUDA in ort.get_available_providers(), \
        f"onnxruntime {ort.__version__} has no {CUDA}: install onnxruntime-gpu"
    gpu = load_runtime(Settings(execution_providers=[CUDA], use_fp16=False), model_dir())
    assert gpu.provider == CUDA, f"{CUDA} is installed but did not start: got {gpu.provider}"
    cpu = load_runtime(Settings(execution_providers=["CPUExecutionProvider"]), model_dir())
    return cpu, gpu


def test_segmentation_matches_cpu(runtimes: tuple[ModelRuntime, ModelRuntime]) -> None:
    cpu, gpu = runtimes
    rng = np.random.default_rng(22)
    image = rng.normal(0.0, 1.0, (1, 3, 32, 96, 96)).astype(np.float32)
    (expected,) = cpu.seg.run(image)
    (got,) = gpu.seg.run(image)
    assert got.shape == expected.shape
    assert float(np.abs(got - expected).max()) < 1e-3
    agree = float((got.argmax(axis=1) == expected.argmax(axis=1)).mean())
    assert agree >= 0.999


def test_classifier_matches_cpu(runtimes: tuple[ModelRuntime, ModelRuntime]) -> None:
    cpu, gpu = runtimes
    rng = np.random.default_rng(23)
    stack = rng.normal(0.0, 1.0, (2, 24, 6, 64, 64)).astype(np.float32)
    expected = cpu.frac.run(stack)
    got = gpu.frac.run(stack)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert float(np.abs(a - b).max()) < 1e-3
