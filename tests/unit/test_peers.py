"""The harness finds DCMTK by what it is, not by its name on PATH."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import dcmtk as finder
from harness.dcmtk import dcmtk

PYNETDICOM_SCRIPT = "#!/bin/sh\necho 'usage: storescu [options] addr port path' >&2\nexit 2\n"
DCMTK_PROGRAM = "#!/bin/sh\necho '$dcmtk: storescu v3.6.7 2022-04-22 $'\n"


def _tool(directory: Path, body: str) -> Path:
    directory.mkdir()
    tool = directory / "storescu"
    tool.write_text(body)
    tool.chmod(0o755)
    return tool


def test_dcmtk_passes_over_pynetdicom_scripts(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The virtualenv's pynetdicom ``storescu`` comes first on PATH; DCMTK's is chosen."""
    _tool(tmp_path / "venv-bin", PYNETDICOM_SCRIPT)
    real = _tool(tmp_path / "dcmtk-bin", DCMTK_PROGRAM)
    monkeypatch.setattr(finder, "FALLBACK_DIRS", ())
    monkeypatch.setenv("PATH", f"{tmp_path / 'venv-bin'}{os.pathsep}{tmp_path / 'dcmtk-bin'}")
    assert dcmtk("storescu") == str(real)
    monkeypatch.setenv("PATH", str(tmp_path / "venv-bin"))
    assert dcmtk("storescu") is None


def test_dcmtk_found_in_the_system_location_when_path_has_only_the_venv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tool(tmp_path / "venv-bin", PYNETDICOM_SCRIPT)
    system = _tool(tmp_path / "usr-bin", DCMTK_PROGRAM)
    monkeypatch.setattr(finder, "FALLBACK_DIRS", (str(tmp_path / "usr-bin"),))
    monkeypatch.setenv("PATH", str(tmp_path / "venv-bin"))
    assert dcmtk("storescu") == str(system)


def test_the_real_pynetdicom_script_is_not_dcmtk() -> None:
    """pynetdicom's own console script (the project's virtualenv) is told apart."""
    import shutil
    import sys

    script = Path(sys.executable).parent / "storescu"
    if not script.is_file():
        pytest.skip("pynetdicom's storescu script absent from this environment")
    assert not finder.is_dcmtk(script)
    system = shutil.which("storescu", path="/usr/bin")
    if system is not None:
        assert finder.is_dcmtk(Path(system))
