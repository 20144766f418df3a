from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import main
from service.config import Settings


def test_defaults_operators_rely_on() -> None:
    s = Settings()
    assert s.ae_title == "CSPINE_TRIAGE"
    assert s.dicom_port == 11112
    assert s.web_port == 8000
    assert s.spool_path == s.data_dir / "spool"
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("triage.db")


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TRIAGE_AE_TITLE", "MYTRIAGE")
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "4242")
    monkeypatch.setenv("TRIAGE_WEB_HOST", "0.0.0.0")
    monkeypatch.setenv("TRIAGE_WEB_PORT", "9000")
    monkeypatch.setenv("TRIAGE_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("TRIAGE_DATABASE_URL", "postgresql+psycopg://u:pw@db/triage")
    monkeypatch.setenv("TRIAGE_ALLOWED_CALLING_AES", "PACS1, ORTHANC")
    monkeypatch.setenv("TRIAGE_PACS_DESTINATIONS",
                       '[{"ae_title": "PACS", "host": "10.0.0.5", "port": 104}]')
    s = Settings()
    assert s.data_dir == tmp_path
    assert s.spool_path == tmp_path / "spool"
    assert (s.ae_title, s.dicom_port, s.web_host, s.web_port) == ("MYTRIAGE", 4242, "0.0.0.0",
                                                                   9000)
    assert s.allowed_calling_aes == ["PACS1", "ORTHANC"]
    assert s.pacs_destinations[0].ae_title == "PACS"
    assert s.pacs_destinations[0].port == 104


def test_config_file_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "triage.yaml"
    cfg.write_text("ae_title: FROMFILE\ndicom_port: 2000\nallowed_networks: ['10.0.0.0/8']\n")
    monkeypatch.setenv("TRIAGE_CONFIG_FILE", str(cfg))
    monkeypatch.setenv("TRIAGE_DICOM_PORT", "3000")  # environment beats the file
    s = Settings()
    assert s.ae_title == "FROMFILE"
    assert s.dicom_port == 3000
    assert s.allowed_networks == ["10.0.0.0/8"]


def test_missing_config_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIAGE_CONFIG_FILE", "/nonexistent/triage.yaml")
    with pytest.raises(FileNotFoundError):
        Settings()


@pytest.mark.parametrize("field,value", [("dicom_port", 0), ("allowed_networks", ["not-an-ip"]),
                                         ("uid_root", "1.2.3"), ("tls_enabled", True)])
def test_invalid_values_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_config_show_masks_secrets(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from service.config import get_settings

    monkeypatch.setenv("TRIAGE_SECRET_KEY", "super-secret-value")
    monkeypatch.setenv("TRIAGE_DATABASE_URL", "postgresql+psycopg://triage:dbpassword@db/triage")
    get_settings.cache_clear()
    try:
        assert main(["config", "show"]) == 0
    finally:
        get_settings.cache_clear()
    out = capsys.readouterr().out
    assert "super-secret-value" not in out and "dbpassword" not in out
    data = json.loads(out)
    assert data["secret_key"] == "**********"
    assert data["database_url"] == "postgresql+psycopg://triage:****@db/triage"
    assert data["ae_title"] == "CSPINE_TRIAGE"


def test_only_config_reads_the_environment() -> None:
    root = Path(__file__).resolve().parents[2] / "service"
    offenders = [
        str(p.relative_to(root)) for p in root.rglob("*.py")
        if p.name != "config.py" and ("os.environ" in p.read_text() or "os.getenv" in p.read_text())
    ]
    assert offenders == []


def test_runtime_never_imports_torch() -> None:
    root = Path(__file__).resolve().parents[2] / "service"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "import torch" in p.read_text() or "from torch" in p.read_text()]
    assert offenders == []
