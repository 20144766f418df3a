"""Where the shipped model and the Alembic migrations are, in a checkout or an installed wheel.

In a source checkout (``pip install -e .``, ``make run``) they are where DESIGN.md puts them:
``models/cspine-v1/`` and ``alembic/`` beside the ``service`` package. A wheel
(``pip install .``) has no checkout beside it: the build (``setup.py``) copies both into the
package as ``service/_shipped/models/cspine-v1/`` and ``service/_shipped/alembic/``. Either way
the path found here is absolute, so ``triage`` works from any working directory.

The copies in a wheel are the model's ONNX files, ``manifest.json`` and ``MODEL_CARD.md``
(not the torch checkpoints: the runtime never uses torch) and every migration.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INSTALLED_DIR = PACKAGE_DIR / "_shipped"
"""Filled by the wheel build (``setup.py``); absent in a checkout."""
SOURCE_ROOT = PACKAGE_DIR.parent
MODEL_NAME = "cspine-v1"


def _locate(relative: str) -> Path:
    installed = INSTALLED_DIR / relative
    return installed if installed.is_dir() else SOURCE_ROOT / relative


def model_dir() -> Path:
    """The shipped model's directory (the default of ``TRIAGE_MODEL_DIR``)."""
    return _locate(f"models/{MODEL_NAME}")


def alembic_dir() -> Path:
    """The migrations' directory (Alembic's ``script_location``)."""
    return _locate("alembic")
