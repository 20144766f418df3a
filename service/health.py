"""Component health shared by ``/healthz`` and ``triage status``.

Each check is bounded by a short timeout so a dead dependency makes the probe say "down"
rather than hang the load balancer.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from importlib import metadata
from typing import Any

from sqlalchemy import Engine

from service import __version__
from service.config import Settings
from service.db import migrate
from service.db.session import ping
from service.model_manifest import ManifestError, manifest_path, model_identity
from service.queue import WORKER_KEY_PATTERN

logger = logging.getLogger(__name__)

_VERSIONED = ("pydicom", "pynetdicom", "highdicom", "onnxruntime", "onnxruntime-gpu",
              "sqlalchemy", "celery", "fastapi")


def versions() -> dict[str, str]:
    out = {"cspine-triage": __version__, "python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def check_database(engine: Engine, settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        ping(engine)
        current = migrate.current_revision(engine)
        head = migrate.head_revision(settings.db_url)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return {"status": "down", "error": type(exc).__name__, "detail": str(exc)[:200]}
    status = "up" if current == head else "needs_migration"
    return {"status": status, "dialect": engine.dialect.name, "revision": current,
            "head": head, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


def check_broker(settings: Settings) -> dict[str, Any]:
    if not settings.broker_url:
        return {"status": "not_configured"}
    import redis

    started = time.perf_counter()
    try:
        client = redis.Redis.from_url(settings.broker_url,
                                      socket_connect_timeout=settings.broker_connect_timeout_s,
                                      socket_timeout=settings.broker_connect_timeout_s)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001
        return {"status": "down", "error": type(exc).__name__, "detail": str(exc)[:200]}
    return {"status": "up", "latency_ms": round((time.perf_counter() - started) * 1000, 1)}




def check_workers(settings: Settings) -> dict[str, Any]:
    """Workers that announced themselves recently, with their model and execution provider."""
    if not settings.broker_url:
        return {"status": "not_configured", "workers": []}
    import redis

    try:
        client = redis.Redis.from_url(settings.broker_url,
                                      socket_connect_timeout=settings.broker_connect_timeout_s,
                                      socket_timeout=settings.broker_connect_timeout_s)
        keys = sorted(client.scan_iter(WORKER_KEY_PATTERN, count=100))[:50]
        values = client.mget(keys) if keys else []
        client.close()
    except Exception as exc:  # noqa: BLE001
        return {"status": "unknown", "error": type(exc).__name__, "workers": []}
    workers = [json.loads(v) for v in values if v]
    providers = sorted({w.get("execution_provider") for w in workers
                        if w.get("execution_provider")})
    return {"status": "up" if workers else "none", "workers": workers,
            "execution_providers": providers}


def check_model(settings: Settings) -> dict[str, Any]:
    """Presence and identity of the model artifacts; the worker reports its own provider."""
    if not manifest_path(settings.model_dir).is_file():
        return {"status": "absent", "model_dir": str(settings.model_dir)}
    try:
        identity = model_identity(settings.model_dir)
    except ManifestError as exc:
        return {"status": "invalid", "detail": str(exc)[:200]}
    return {"status": "present", "name": identity.name, "version": identity.version}


def overall(components: dict[str, dict[str, Any]]) -> str:
    critical = ("database", "broker")
    if any(components[c]["status"] not in ("up", "not_configured") for c in critical
           if c in components):
        return "degraded"
    return "ok"
