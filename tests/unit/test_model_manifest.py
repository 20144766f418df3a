"""The one reader of ``manifest.json``: light (no model side), and what its callers make of it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.model_manifest import ManifestError, model_identity, model_version, read_manifest

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "cspine-v1"


def test_reads_name_and_version(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "m", "version": "1.2"}))
    assert read_manifest(tmp_path)["name"] == "m"
    identity = model_identity(tmp_path)
    assert (identity.name, identity.version) == ("m", "1.2")
    assert model_version(tmp_path) == "1.2"


@pytest.mark.parametrize("content,message", [
    (None, "no model manifest at"),
    ("{not json", "cannot read model manifest"),
    ("[1, 2]", "not a JSON object"),
])
def test_unusable_manifests(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)
    assert model_version(tmp_path) == "unknown"


def test_the_typed_loader_and_the_health_check_use_it(tmp_path: Path) -> None:
    from service import health
    from service.inference import manifest

    assert manifest.ManifestError is ManifestError
    settings = type("S", (), {"model_dir": tmp_path})()
    assert health.check_model(settings)["status"] == "absent"  # type: ignore[arg-type]
    (tmp_path / "manifest.json").write_text("[]")
    assert health.check_model(settings)["status"] == "invalid"  # type: ignore[arg-type]
    if (SHIPPED / "manifest.json").is_file():
        shipped = manifest.load_manifest(SHIPPED)
        assert model_version(SHIPPED) == shipped.version


def test_reading_the_manifest_loads_no_model_runtime() -> None:
    code = ("import sys, service.model_manifest, service.ingest.dispatch, service.health; "
            "print(sorted(m for m in ('onnxruntime', 'torch', 'service.inference') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out == "[]"
