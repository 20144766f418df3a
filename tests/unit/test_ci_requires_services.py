"""A green CI means the real servers were there: absent peers fail under .ci/run."""

from __future__ import annotations

from pathlib import Path

import pytest

import harness.services as shared


def test_missing_peer_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared, "REQUIRE_SERVICES", True)
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL"):
        shared.missing("PostgreSQL server not reachable on 127.0.0.1:5432")


def test_missing_peer_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shared, "REQUIRE_SERVICES", False)
    with pytest.raises(pytest.skip.Exception, match="Redis"):
        shared.missing("Redis server not reachable on 127.0.0.1:6379")


def test_ci_script_requires_the_servers_and_names_no_absolute_path() -> None:
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "export TEST_REQUIRE_SERVICES=1" in script
    assert "/work/" not in script  # the shared data is found relative to the repository
    assert "make test" in script


def test_missing_peer_outside_pytest_raises_naming_it() -> None:
    """A benchmark (no pytest imported) gets an exception naming the peer, not a skip."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.pop('pytest', None); "
            "from harness.services import PeerMissing, missing\n"
            "try:\n    missing('storescp absent')\n"
            "except PeerMissing as exc:\n    print('raised', exc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.strip() == "raised storescp absent", proc.stdout + proc.stderr


def test_ci_script_requires_the_tools_and_reports_skips() -> None:
    """DCMTK, dicom3tools and Orthanc missing fail CI by name; skips are listed and counted."""
    import subprocess

    path = Path(__file__).resolve().parents[2] / ".ci" / "run"
    script = path.read_text()
    for tool in ("storescu", "storescp", "dcmdump", "dciodvfy", "Orthanc"):
        assert tool in script.split("for tool in", 1)[1].split(";", 1)[0], tool
    assert '-rs"' in script and "skipped test(s)" in script
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True,
                          timeout=30).returncode == 0
