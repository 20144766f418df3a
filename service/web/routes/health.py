"""Liveness/readiness: versions and the status of each dependency."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service import health
from service.web.deps import EngineDep, SettingsDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(settings: SettingsDep, engine: EngineDep) -> JSONResponse:
    components: dict[str, dict[str, Any]] = {
        "database": await run_in_threadpool(health.check_database, engine, settings),
        "broker": await run_in_threadpool(health.check_broker, settings),
        "model": await run_in_threadpool(health.check_model, settings),
        "workers": await run_in_threadpool(health.check_workers, settings),
    }
    status = health.overall(components)
    body = {"status": status, "versions": health.versions(), "components": components}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)
