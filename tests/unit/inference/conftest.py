from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.inference.runtime import clear_runtime_cache

MODEL_DIR = Path(__file__).resolve().parents[3] / "models" / "cspine-v1"
"""The shipped artifacts; these tests run the real model."""


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A private copy of the shipped model directory that a test may damage."""
    target = tmp_path / "cspine-v1"
    target.mkdir()
    for name in ("seg.onnx", "frac.onnx", "manifest.json"):
        shutil.copyfile(MODEL_DIR / name, target / name)
    return target


@pytest.fixture(autouse=True)
def _fresh_runtime_cache() -> Iterator[None]:
    clear_runtime_cache()
    yield
    clear_runtime_cache()
