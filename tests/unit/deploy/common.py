"""Shared helpers of the deployment tests: paths, settings names, a strict YAML loader."""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

from service.config import CONFIG_FILE_VARIABLE, ENV_PREFIX, Settings

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART_DIR = REPO_ROOT / "deploy" / "helm" / "cspine-triage"
DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = (REPO_ROOT / "Dockerfile", REPO_ROOT / "Dockerfile.gpu")

# Variables our containers get that are not TRIAGE_* settings, each with its reason.
NON_SETTING_ENV = {
    "PGPASSWORD": "libpq reads the database password from it (no URL escaping needed)",
}
# TRIAGE_* variables that config.py reads that are not Settings fields.
NON_FIELD_TRIAGE_VARIABLES = {CONFIG_FILE_VARIABLE}

TRIAGE_NAME = re.compile(r"\bTRIAGE_[A-Z0-9_]+\b")


def setting_env_names() -> set[str]:
    """Every environment variable name that maps to a Settings field."""
    return {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def unknown_triage_names(names: set[str]) -> set[str]:
    """The TRIAGE_* names among ``names`` that no setting answers to."""
    known = setting_env_names() | NON_FIELD_TRIAGE_VARIABLES
    return {name for name in names if name.startswith(ENV_PREFIX) and name not in known}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    # Only keys written in this mapping count: `<<: *anchor` keys may be overridden.
    seen: set[str] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node,
                                                                        yaml.ScalarNode):
            continue
        if key_node.value in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
        seen.add(key_node.value)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              _construct_mapping)


def load_yaml_strict(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass


def load_all_yaml_strict(text: str) -> list[Any]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]


def load_script(name: str) -> ModuleType:
    """Import one of deploy/docker/*.py (not a package: the image runs them as scripts)."""
    path = DOCKER_DIR / name
    spec = importlib.util.spec_from_file_location(f"deploy_docker_{path.stem.replace('-', '_')}",
                                                  path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def venv_tool(name: str) -> str | None:
    """A tool installed by a dev dependency into this interpreter's bin/, else on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)
