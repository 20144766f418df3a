"""Manifest validation, model integrity checks, provider selection and session reuse."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.inference import runtime as rt
from service.inference.manifest import ManifestError, load_manifest
from service.inference.runtime import (
    CPU,
    CUDA,
    ModelIntegrityError,
    get_runtime,
    load_runtime,
    resolve_providers,
    sha256_file,
)
from tests.unit.inference.conftest import MODEL_DIR


def _settings(model_dir: Path, **kw: object) -> Settings:
    return Settings(model_dir=model_dir, **kw)  # type: ignore[arg-type]


def test_shipped_manifest_is_valid_and_matches_files() -> None:
    manifest = load_manifest(MODEL_DIR)
    assert manifest.synthetic_only is True
    assert manifest.seg.opset >= 17 and manifest.frac.opset >= 17
    total = 0
    for entry in manifest.files():
        path = MODEL_DIR / entry.file
        assert sha256_file(path) == entry.sha256
        assert path.stat().st_size == entry.bytes
        total += entry.bytes
    assert total < 30 * 1024 * 1024
    assert 0 < manifest.thresholds.patient < 1 and 0 < manifest.thresholds.vertebra < 1
    assert "validation" in manifest.thresholds.selection


def test_tampered_model_is_refused(model_copy: Path) -> None:
    data = bytearray((model_copy / "frac.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / "frac.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256 .* does not match"):
        load_runtime(_settings(model_copy))


def test_truncated_model_is_refused(model_copy: Path) -> None:
    data = (model_copy / "seg.onnx").read_bytes()
    (model_copy / "seg.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelIntegrityError, match="truncated or replaced"):
        load_runtime(_settings(model_copy))


def test_missing_model_file_is_refused(model_copy: Path) -> None:
    (model_copy / "seg.onnx").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_runtime(_settings(model_copy))


def test_bad_manifest_is_refused(model_copy: Path) -> None:
    path = model_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["seg"]["model"]["sha256"] = "not-a-hash"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="invalid model manifest"):
        load_runtime(_settings(model_copy))
    raw = json.loads((MODEL_DIR / "manifest.json").read_text())
    raw["frac"]["inputs"][0]["shape"][2] = 99  # channel count disagrees with preprocessing
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="frac input"):
        load_runtime(_settings(model_copy))
    path.unlink()
    with pytest.raises(ManifestError, match="no model manifest"):
        load_runtime(_settings(model_copy))


def test_model_file_outside_directory_is_refused(model_copy: Path) -> None:
    path = model_copy / "manifest.json"
    raw = json.loads(path.read_text())
    raw["seg"]["model"]["file"] = "../seg.onnx"
    path.write_text(json.dumps(raw))
    with pytest.raises(ManifestError):
        load_runtime(_settings(model_copy))


def test_cuda_requested_but_absent_falls_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    settings = _settings(MODEL_DIR, execution_providers=[CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="service.inference.runtime"):
        runtime = load_runtime(settings)
    assert runtime.provider == CPU
    assert runtime.describe()["execution_provider"] == CPU
    assert any(CUDA in r.getMessage() for r in caplog.records)


def test_cuda_listed_but_unusable_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A build that lists CUDA on a machine without a GPU: the session ends up on CPU."""
    monkeypatch.setattr(rt.ort, "get_available_providers", lambda: [CUDA, CPU])
    settings = _settings(MODEL_DIR, execution_providers=[CUDA, CPU], use_fp16=True)
    with caplog.at_level(logging.WARNING, logger="service.inference.runtime"):
        runtime = load_runtime(settings)
    assert runtime.provider == CPU
    assert runtime.seg.variant == "fp32"  # no fp16 on a CPU session
    assert any("CPU fallback" in r.getMessage() for r in caplog.records)


def test_provider_options() -> None:
    settings = Settings(execution_providers=["TensorrtExecutionProvider", CUDA, CPU],
                        cuda_device_id=1)
    resolved = resolve_providers(settings.execution_providers, [CUDA, CPU], settings)
    assert [name for name, _ in resolved] == [CUDA, CPU]  # TensorRT absent: skipped
    cuda_options = resolved[0][1]
    assert cuda_options["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert cuda_options["device_id"] == 1
    # CPU is always the last resort, even when not requested.
    assert resolve_providers([CUDA], [CPU], settings) == [(CPU, {})]


def test_sessions_are_created_once_per_process() -> None:
    settings = _settings(MODEL_DIR, execution_providers=[CPU], ort_intra_op_threads=1)
    first = get_runtime(settings)
    assert get_runtime(settings) is first
    other = get_runtime(settings.model_copy(update={"ort_intra_op_threads": 2}))
    assert other is not first


def test_stage_runs_and_casts() -> None:
    runtime = load_runtime(_settings(MODEL_DIR, execution_providers=[CPU]))
    pre = runtime.manifest.preprocessing
    stack = np.zeros((2, pre.crop_slices, pre.frac_channels, pre.crop_size, pre.crop_size),
                     dtype=np.float64)
    probability, slices = runtime.frac.run(stack)
    assert probability.shape == (2,) and slices.shape == (2, pre.crop_slices)
    assert probability.dtype == np.float32
    assert ((probability >= 0) & (probability <= 1)).all()
