"""Build hook: a wheel carries the shipped model and the migrations inside ``service``.

``pyproject.toml`` holds the whole configuration; this file only extends ``build_py``. DESIGN.md
keeps ``alembic/`` and ``models/cspine-v1/`` at the top of the repository, outside the
``service`` package, so a plain wheel would lack both and ``triage db upgrade`` / ``triage
serve`` would work only from a checkout. The build copies them to
``service/_shipped/alembic/`` and ``service/_shipped/models/cspine-v1/`` (ONNX files,
``manifest.json``, ``MODEL_CARD.md``; not the torch checkpoints), where ``service/shipped.py``
looks first. An editable install needs no copy: the checkout is there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
MODEL = "models/cspine-v1"
MODEL_FILES = ("manifest.json", "MODEL_CARD.md", "*.onnx")


def shipped_files() -> dict[str, Path]:
    """Destination (relative to ``service/_shipped``) -> source, for every file shipped."""
    files: dict[str, Path] = {}
    for path in sorted((ROOT / "alembic").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files[str(path.relative_to(ROOT))] = path
    for pattern in MODEL_FILES:
        for path in sorted((ROOT / MODEL).glob(pattern)):
            files[f"{MODEL}/{path.name}"] = path
    if f"{MODEL}/manifest.json" not in files or "alembic/env.py" not in files:
        raise RuntimeError(f"{MODEL}/manifest.json or alembic/env.py missing: not a full tree")
    return files


class BuildPyWithShipped(build_py):
    """``build_py`` that also copies the model and the migrations into the package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "service" / "_shipped"
        for relative, source in shipped_files().items():
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "service" / "_shipped"
            outputs += [str(target / relative) for relative in shipped_files()]
        return outputs


setup(cmdclass={"build_py": BuildPyWithShipped})
