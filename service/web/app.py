"""Application factory: wiring only; routes live in ``service.web.routes``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.config import Settings, get_settings
from service.db.session import make_engine, make_session_factory
from service.web.routes import health, studies, worklist


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(settings.db_url)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.dispose()

    app = FastAPI(title="cspine-triage", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.include_router(health.router)
    app.include_router(worklist.router)
    app.include_router(studies.router)
    return app
