"""Run the DICOM validators the results are checked with (dciodvfy, dsrdump).

A missing tool makes the calling test skip with the Debian package to install.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.dcmtk import dcmtk


@dataclass(frozen=True)
class Validation:
    errors: list[str]
    warnings: list[str]
    output: str


def dciodvfy(path: Path) -> Validation:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy absent (Debian package dicom3tools)")
    proc = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return Validation(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output="\n".join(lines),
    )


def dsrdump(path: Path) -> str:
    tool = dcmtk("dsrdump")
    if tool is None:
        pytest.skip("dsrdump absent (Debian package dcmtk)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
