"""The model manifest file on disk (``<model_dir>/manifest.json``): where it is, its raw JSON.

The one reader of the file. The edge and the web side (``service.ingest.dispatch``,
``service.health``) need only the model's name and version and must not import the model
side, so this module imports nothing but the standard library (no onnxruntime, no numpy);
:mod:`service.inference.manifest` validates the same JSON into its typed schema.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
UNKNOWN_VERSION = "unknown"


class ManifestError(ValueError):
    """The manifest is missing, unreadable or inconsistent; the model cannot be used."""


def manifest_path(model_dir: Path | str) -> Path:
    return Path(model_dir) / MANIFEST_NAME


def read_manifest(model_dir: Path | str) -> dict[str, Any]:
    """The manifest's JSON object; :class:`ManifestError` when absent, unreadable or not an
    object (messages start ``no model manifest at``, ``cannot read model manifest``)."""
    path = manifest_path(model_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"no model manifest at {path}") from exc
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read model manifest {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ManifestError(f"cannot read model manifest {path}: not a JSON object")
    return raw


@dataclass(frozen=True)
class ModelIdentity:
    """Name and version as the manifest states them (None where it states none)."""

    name: str | None
    version: str | None


def model_identity(model_dir: Path | str) -> ModelIdentity:
    """Name and version from the manifest; raises :class:`ManifestError` like
    :func:`read_manifest`."""
    raw = read_manifest(model_dir)
    name, version = raw.get("name"), raw.get("version")
    return ModelIdentity(None if name is None else str(name),
                         None if version is None else str(version))


def model_version(model_dir: Path | str) -> str:
    """The manifest's version (at most 64 characters, the column's size), ``unknown`` when the
    manifest is absent or unreadable or states none: what an analysis row is keyed by."""
    try:
        version = model_identity(model_dir).version
    except ManifestError:
        return UNKNOWN_VERSION
    return version[:64] if version else UNKNOWN_VERSION


def manifest_sha256(model_dir: Path | str) -> str | None:
    """SHA-256 of ``manifest.json`` itself: one hash that names the exact model, since the
    manifest lists the sha256 of every weight file (the worker checks those at load). None
    when the manifest cannot be read. Shown per worker on the admin status page."""
    import hashlib

    try:
        return hashlib.sha256(manifest_path(model_dir).read_bytes()).hexdigest()
    except OSError:
        return None
