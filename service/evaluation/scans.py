"""Where the real scans are and how one is loaded: shared by ``triage evaluate-real``
(:mod:`service.evaluation.real`) and the figures (:mod:`service.evaluation.real_figures`),
which draws what ``real`` scores; kept apart so neither imports the other.

The real scans are not part of the repository: one folder per scan in a data directory, its
DICOM files under ``ct/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings
    from service.imaging.volume import Volume

SCAN_SUBDIR = "ct"
"""Each scan folder of the data directory keeps its DICOM files here."""


def default_data_dir() -> Path:
    """``../shared/data`` beside the repository root (this file is
    ``<root>/service/evaluation/scans.py``)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def find_scans(data_dir: Path) -> list[tuple[str, list[Path]]]:
    """(name, files) of every scan folder under ``data_dir`` that has a ``ct/`` folder with
    files in it, sorted by name."""
    scans: list[tuple[str, list[Path]]] = []
    if not data_dir.is_dir():
        return scans
    for folder in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        ct = folder / SCAN_SUBDIR
        files = sorted(p for p in ct.iterdir() if p.is_file()) if ct.is_dir() else []
        if files:
            scans.append((folder.name, files))
    return scans


def load_scan(paths: Sequence[Path], settings: Settings) -> Volume:
    """The sorted volume of one scan, loaded as the worker loads a series."""
    from service.imaging.volume import load_series

    return load_series(paths, settings)
