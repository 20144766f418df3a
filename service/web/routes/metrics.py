"""``GET /metrics``: Prometheus exposition of :class:`service.web.metrics.TriageCollector`.

Who may scrape:

* with ``TRIAGE_METRICS_TOKEN`` set, a caller sending ``Authorization: Bearer <that token>``
  (what a Prometheus ``scrape_config`` with ``authorization: {credentials: ...}`` sends);
* always, an admin: a logged-in admin session, or an admin's API token (``ct_...``);
* nobody else: 401 without credentials or with a wrong token, 403 for a radiologist.

Unset, the token does not default to "open": the metrics name no patient, but queue depths,
failure counts and model versions are operational detail an anonymous caller has no use for.
The collector reads the database and the broker per scrape, so the response is never cached.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy.orm import Session

from service.web.auth import SESSION_COOKIE, actor_from_session, actor_from_token
from service.web.deps import CodecDep, EngineDep, SessionDep, SettingsDep
from service.web.metrics import TriageCollector

router = APIRouter(tags=["metrics"], include_in_schema=False)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def _check(request: Request, session: Session, codec: CodecDep, expected: str | None) -> None:
    token = _bearer(request)
    if token is not None:
        if expected and hmac.compare_digest(token.encode(), expected.encode()):
            return
        actor = actor_from_token(session, token)
        if actor is None:
            raise HTTPException(status_code=401, detail="invalid token", headers=_CHALLENGE)
    else:
        cookie = request.cookies.get(SESSION_COOKIE)
        data = codec.read(cookie) if cookie else None
        actor = actor_from_session(session, data) if data is not None else None
        if actor is None:
            raise HTTPException(status_code=401, detail="metrics token or admin login "
                                "required", headers=_CHALLENGE)
    if not actor.is_admin:
        raise HTTPException(status_code=403, detail="admin role required")


@router.get("/metrics")
async def metrics(request: Request, session: SessionDep, engine: EngineDep,
                  settings: SettingsDep, codec: CodecDep) -> Response:
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    await run_in_threadpool(_check, request, session, codec, expected)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TriageCollector(engine, settings))
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST,
                    headers={"Cache-Control": "no-store"})
