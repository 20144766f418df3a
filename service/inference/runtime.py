"""ONNX Runtime sessions for the two model stages, created once per process.

A worker process calls :func:`get_runtime` for every task; the first call verifies every
model file against the manifest's sha256 and size, builds the sessions, and logs the
execution provider that is actually active (ONNX Runtime silently drops a provider it cannot
initialise, e.g. CUDA without a driver, so we read back what the session got). Later calls
return the same sessions. The model bytes that are hashed are the bytes handed to ONNX Runtime,
so a file swapped between the check and the load cannot slip through.

No torch here: the runtime image carries only onnxruntime (or onnxruntime-gpu).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.config import Settings
from service.inference.manifest import ModelFile, ModelManifest, OnnxModel, load_manifest

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = frozenset({CUDA, TENSORRT, "ROCMExecutionProvider", "DmlExecutionProvider"})


class ModelIntegrityError(RuntimeError):
    """A model file does not match the manifest (tampered, truncated, or missing).

    The worker must not run such a model; the analysis fails with this message.
    """


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_verified(model_dir: Path, entry: ModelFile) -> bytes:
    """The bytes of one model file, after checking size and sha256 against the manifest."""
    path = Path(model_dir) / entry.file
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ModelIntegrityError(f"model file {path} is missing") from exc
    if len(data) != entry.bytes:
        raise ModelIntegrityError(
            f"model file {path} has {len(data)} bytes, the manifest says {entry.bytes} "
            "(truncated or replaced); refusing to load it")
    actual = sha256_bytes(data)
    if actual != entry.sha256:
        raise ModelIntegrityError(
            f"model file {path} sha256 {actual} does not match the manifest's {entry.sha256} "
            "(tampered or corrupted); refusing to load it")
    return data


def resolve_providers(requested: Sequence[str], available: Sequence[str],
                      settings: Settings) -> list[tuple[str, dict[str, Any]]]:
    """Requested providers that this onnxruntime build has, with their options, CPU last.

    CPU is always appended as the fallback. Options: CUDA searches cuDNN convolution
    algorithms exhaustively once per input shape (our shapes repeat across series) and copies
    on a dedicated stream; TensorRT caches its engines next to the data directory.
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for name in requested:
        if name == CPU or any(name == n for n, _ in out):
            continue
        if name not in available:
            logger.warning("execution provider %s is not available in this onnxruntime build "
                           "(available: %s); skipping it", name, ", ".join(available))
            continue
        options: dict[str, Any] = {}
        if name == CUDA:
            options = {
                "device_id": settings.cuda_device_id,
                "cudnn_conv_algo_search": "EXHAUSTIVE",
                "do_copy_in_default_stream": True,
                "arena_extend_strategy": "kSameAsRequested",
            }
        elif name == TENSORRT:
            options = {
                "device_id": settings.cuda_device_id,
                "trt_fp16_enable": settings.use_fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(settings.data_dir / "trt-cache"),
            }
        out.append((name, options))
    out.append((CPU, {}))
    return out


@dataclass
class Stage:
    """One model stage: its session, which file variant it runs, and the provider it got."""

    name: str
    session: ort.InferenceSession
    variant: str
    """"fp32" or "fp16"."""
    provider: str
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """Run on host arrays; casts to the model's precision and returns float32 arrays.

        On a GPU provider the inputs are bound once to the device through I/O binding and
        the outputs come back to host memory in one copy each.
        """
        dtype = np.float16 if self.variant == "fp16" else np.float32
        feeds = {n: np.ascontiguousarray(x, dtype=dtype)
                 for n, x in zip(self.input_names, inputs, strict=True)}
        if self.provider in GPU_PROVIDERS:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            outputs = binding.copy_outputs_to_cpu()
        else:
            outputs = self.session.run(self.output_names, feeds)
        return [np.asarray(o, dtype=np.float32) for o in outputs]


@dataclass
class ModelRuntime:
    model_dir: Path
    manifest: ModelManifest
    seg: Stage
    frac: Stage

    @property
    def provider(self) -> str:
        """The active execution provider (the segmentation stage's; both normally agree)."""
        return self.seg.provider

    def describe(self) -> dict[str, str]:
        """For health reporting: model identity and what it runs on."""
        return {
            "model": self.manifest.name,
            "version": self.manifest.version,
            "execution_provider": self.provider,
            "seg_variant": self.seg.variant,
            "frac_variant": self.frac.variant,
        }


def _session_options(settings: Settings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.ort_intra_op_threads
    options.inter_op_num_threads = settings.ort_inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _load_stage(name: str, model_dir: Path, spec: OnnxModel, settings: Settings,
                providers: list[tuple[str, dict[str, Any]]]) -> Stage:
    wants_gpu = providers[0][0] in GPU_PROVIDERS
    use_fp16 = settings.use_fp16 and wants_gpu and spec.fp16 is not None
    if settings.use_fp16 and spec.fp16 is None:
        logger.info("%s: use_fp16 is set but the manifest offers no fp16 variant; using fp32",
                    name)
    entry = spec.fp16 if use_fp16 and spec.fp16 is not None else spec.model
    data = read_verified(model_dir, entry)
    session = ort.InferenceSession(
        data, sess_options=_session_options(settings),
        providers=[p for p, _ in providers], provider_options=[o for _, o in providers])
    active = session.get_providers()[0]
    variant = "fp16" if use_fp16 else "fp32"
    if variant == "fp16" and active not in GPU_PROVIDERS:
        # The GPU provider failed to start after all: fp16 on CPU is slow; reload the fp32 file.
        logger.warning("%s: GPU provider unavailable at session creation; using the fp32 model "
                       "on %s", name, active)
        return _load_stage(name, model_dir, spec, settings.model_copy(update={"use_fp16": False}),
                           providers)
    if wants_gpu and active not in GPU_PROVIDERS:
        logger.warning("%s: %s was requested but the session runs on %s (CPU fallback)",
                       name, providers[0][0], active)
    logger.info("%s: %s (%s, sha256 %s...) on %s", name, entry.file, variant,
                entry.sha256[:12], active)
    return Stage(name=name, session=session, variant=variant, provider=active,
                 input_names=[i.name for i in session.get_inputs()],
                 output_names=[o.name for o in session.get_outputs()])


def load_runtime(settings: Settings, model_dir: Path | None = None) -> ModelRuntime:
    """Verify and load both stages (no caching; see :func:`get_runtime`).

    Raises ``ManifestError`` for an unusable manifest and :class:`ModelIntegrityError` for a
    model file that does not match it.
    """
    directory = Path(model_dir or settings.model_dir)
    manifest = load_manifest(directory)
    providers = resolve_providers(settings.execution_providers, ort.get_available_providers(),
                                  settings)
    seg = _load_stage("seg", directory, manifest.seg, settings, providers)
    frac = _load_stage("frac", directory, manifest.frac, settings, providers)
    logger.info("model %s %s ready; execution provider %s", manifest.name, manifest.version,
                seg.provider)
    return ModelRuntime(model_dir=directory, manifest=manifest, seg=seg, frac=frac)


_CACHE_LOCK = threading.Lock()
_RUNTIMES: dict[tuple[object, ...], ModelRuntime] = {}


def _cache_key(settings: Settings, model_dir: Path | None) -> tuple[object, ...]:
    directory = Path(model_dir or settings.model_dir).resolve()
    return (str(directory), tuple(settings.execution_providers), settings.ort_intra_op_threads,
            settings.ort_inter_op_threads, settings.cuda_device_id, settings.use_fp16)


def get_runtime(settings: Settings, model_dir: Path | None = None) -> ModelRuntime:
    """The process's runtime for these settings, loaded on first use and reused after.

    A failed load is not cached: the next task tries again (and fails again, with the same
    clear error, until the model files are fixed), and the worker keeps serving meanwhile.
    """
    key = _cache_key(settings, model_dir)
    with _CACHE_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = load_runtime(settings, model_dir)
            _RUNTIMES[key] = runtime
        return runtime


def clear_runtime_cache() -> None:
    """Drop cached sessions (tests; a worker reloading a new model version)."""
    with _CACHE_LOCK:
        _RUNTIMES.clear()
