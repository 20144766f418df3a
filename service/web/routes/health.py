"""Liveness/readiness: up/down for anyone; versions and each dependency for an admin or an
API token (a load balancer's probe needs only the status code)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from service import health
from service.web.auth import Actor
from service.web.deps import EngineDep, SettingsDep, get_optional_user

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


def _health_actor(request: Request) -> Actor | None:
    """The caller if one can be told, else anonymous: with the database down or unmigrated
    nobody can be looked up, and the probe must still answer."""
    factory = request.app.state.session_factory
    try:
        with factory() as session:
            return get_optional_user(request, session, request.app.state.session_codec)
    except (SQLAlchemyError, HTTPException):
        return None


HealthActor = Annotated[Actor | None, Depends(_health_actor)]


@router.get("/healthz", responses={503: {"description": "A critical dependency is down"}})
async def healthz(settings: SettingsDep, engine: EngineDep, actor: HealthActor) -> JSONResponse:
    """200 when every dependency is up, 503 otherwise. Anonymous callers get the status word
    only: no versions, host names or exception text."""
    components: dict[str, dict[str, Any]] = {
        "database": await run_in_threadpool(health.check_database, engine, settings),
        "broker": await run_in_threadpool(health.check_broker, settings),
        "model": await run_in_threadpool(health.check_model, settings),
        "workers": await run_in_threadpool(health.check_workers, settings),
    }
    status = health.overall(components)
    code = 200 if status == "ok" else 503
    if actor is None or not (actor.is_admin or actor.via == "token"):
        return JSONResponse({"status": status}, status_code=code)
    body = {"status": status, "versions": health.versions(), "components": components}
    return JSONResponse(body, status_code=code)
