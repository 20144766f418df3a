"""The DICOM peers find DCMTK by what it is, not by its name on PATH."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peers.dicom import dcmtk


def test_dcmtk_passes_over_pynetdicom_scripts(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin, system_bin = tmp_path / "venv-bin", tmp_path / "usr-bin"
    for directory, head in ((venv_bin, b"#!/venv/bin/python\n"), (system_bin, b"\x7fELF")):
        directory.mkdir()
        tool = directory / "storescu"
        tool.write_bytes(head + b"\0" * 16)
        tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{venv_bin}:{system_bin}")
    assert dcmtk("storescu") == str(system_bin / "storescu")
    monkeypatch.setenv("PATH", str(venv_bin))
    assert dcmtk("storescu") is None
