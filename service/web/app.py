"""Application factory: wiring only; routes live in ``service.web.routes``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import quote

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from service import __version__
from service.config import Settings, get_settings
from service.db.session import make_engine, make_session_factory
from service.web.auth import SessionCodec
from service.web.deps import CurrentUser, LoginRequired
from service.web.routes import admin as admin_routes
from service.web.routes import admin_analytics, health, pages, reading, studies, worklist
from service.web.routes import metrics as metrics_routes
from service.web.templating import STATIC_DIR, make_templates

logger = logging.getLogger(__name__)


class InsecureConfiguration(RuntimeError):
    """The web app will not start with a configuration anyone could exploit."""


SECURITY_HEADERS = {
    # Everything the pages use is served from here: no CDN, no inline script.
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; "
                                "style-src 'self'; script-src 'self'; object-src 'none'; "
                                "frame-ancestors 'none'; base-uri 'self'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.secret_key_is_placeholder:
        # The placeholder is in the public source: with it anyone can forge an admin session.
        if not settings.development_mode:
            raise InsecureConfiguration(
                "TRIAGE_SECRET_KEY is the public placeholder: set it (e.g. `python -c 'import "
                "secrets; print(secrets.token_urlsafe(32))'`), or TRIAGE_DEVELOPMENT_MODE=true "
                "on a developer's machine")
        logger.warning("TRIAGE_SECRET_KEY is the placeholder (development mode): anyone who "
                       "knows it can forge sessions")
    engine = make_engine(settings.db_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    # No /docs or /redoc (Swagger UI would load from a CDN); the OpenAPI document is served
    # below, behind login like every other route.
    app = FastAPI(title="cspine-triage", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.session_codec = SessionCodec(settings)
    app.state.templates = make_templates()

    @app.exception_handler(LoginRequired)
    async def _to_login(_request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='/')}", status_code=303)

    @app.middleware("http")
    async def _security_headers(request: Request,
                                call_next: Callable[[Request], Awaitable[Response]]
                                ) -> Response:
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(health.router)
    app.include_router(pages.router)
    app.include_router(worklist.router)
    app.include_router(reading.router)
    app.include_router(studies.router)
    app.include_router(admin_analytics.router)
    app.include_router(admin_routes.router)
    app.include_router(metrics_routes.router)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(_actor: CurrentUser) -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
