"""DCMTK's programs, found by what they are, not by their name on PATH.

With the project's virtualenv on PATH, ``storescu``, ``storescp``, ``echoscu``, ``findscu``,
``getscu`` and ``movescu`` are pynetdicom's console scripts: other programs with other options
(``storescp`` from pynetdicom rejects DCMTK's ``--fork`` and exits with 2). So a program counts
as DCMTK's only when its ``--version`` output carries DCMTK's banner (``$dcmtk: storescu
v3.6.7 ... $``). PATH is searched first, in order, then the Debian locations, so a DCMTK
built elsewhere (``/opt/dcmtk/bin`` on PATH) still wins over the system one.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

FALLBACK_DIRS = ("/usr/bin", "/usr/local/bin")
"""Where Debian's ``dcmtk`` package (or a local build) puts the programs, searched after PATH."""


def is_dcmtk(program: Path) -> bool:
    """Whether ``program`` is one of DCMTK's (its ``--version`` names DCMTK)."""
    try:
        proc = subprocess.run([str(program), "--version"], capture_output=True, text=True,
                              timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return "dcmtk" in (proc.stdout + proc.stderr).lower().split("\n", 1)[0]


@functools.cache
def _find(tool: str, search_path: str, fallback: tuple[str, ...]) -> str | None:
    directories = [d or "." for d in search_path.split(os.pathsep)]
    for directory in dict.fromkeys([*directories, *fallback]):
        candidate = Path(directory) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK) and is_dcmtk(candidate):
            return str(candidate)
    return None


def dcmtk(tool: str) -> str | None:
    """Path of DCMTK's ``tool`` (``storescu``, ``storescp``, ``dsrdump``, ...), or None.

    Cached per PATH value (each candidate costs a process start): a test that changes PATH
    gets a fresh search."""
    return _find(tool, os.environ.get("PATH", ""), tuple(FALLBACK_DIRS))
