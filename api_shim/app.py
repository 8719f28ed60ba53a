"""The FastAPI application: routes, problem documents, and the clients they share."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.engine import Engine

from api_shim import problems
from api_shim.bodylimit import BodyLimit
from api_shim.queue import Enqueue, celery_enqueue
from api_shim.routes import callback_key, connections, executions, health, metrics, requests, secrets, templates
from api_shim.waiters import Waiters
from models.db import get_engine
from models.settings import Settings, get_settings
from models.tenants import Callers
from models.vault import Vault, generate_key

DESCRIPTION = """Keeps an organisation's connections to third-party web services in one place
and executes requests through them asynchronously. Every call but the health checks and the
docs needs `Authorization: Bearer <tenant API key>`. Errors are RFC 9457 problem documents
with a stable `code`."""


def create_app(
    settings: Settings | None = None, *, engine: Engine | None = None, enqueue: Enqueue | None = None
) -> FastAPI:
    """The API, on ``engine`` (default: the configured database), sending jobs with ``enqueue``.

    It refuses to start (:class:`~models.errors.MasterKeyMissing`) without a master key.
    """
    settings = settings or get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    waiters = Waiters(settings.effective_redis_url())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        waiters.start()
        yield
        await waiters.stop()

    app = FastAPI(title="Integration Hub", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.waiters = waiters
    app.state.settings = settings
    app.state.callers = Callers(settings.api_key_cache_s)
    app.state.engine = engine or get_engine(settings.effective_database_url())
    app.state.enqueue = enqueue or celery_enqueue()
    app.state.vault = Vault.from_setting(settings.master_keys_value())
    app.state.redis = redis.Redis.from_url(settings.effective_redis_url(), socket_timeout=2, socket_connect_timeout=2)
    problems.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for module in (health, metrics, templates, connections, requests, secrets, executions, callback_key):
        app.include_router(module.router)
    return app


def openapi_document() -> dict[str, Any]:
    """The API's OpenAPI document, as committed in ``docs/openapi.json``."""
    settings = Settings(
        _env_file=None, database_url="sqlite://", master_keys=SecretStr(generate_key())  # type: ignore[call-arg]
    )
    return create_app(settings, enqueue=lambda _job_id: None).openapi()
