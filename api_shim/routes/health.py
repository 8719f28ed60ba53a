"""``/healthz`` (the process is up) and ``/readyz`` (its database, Redis and broker answer)."""

from __future__ import annotations

from typing import Any

import redis
import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from kombu import Connection as BrokerConnection

from api_shim.problems import problem
from models.views import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _database(request: Request) -> None:
    with request.app.state.engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))


def _redis(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def _broker(url: str) -> None:
    with BrokerConnection(url, connect_timeout=2) as connection:
        connection.ensure_connection(max_retries=1)


def _checks(request: Request) -> dict[str, str]:
    settings = request.app.state.settings
    checks: dict[str, Any] = {
        "database": lambda: _database(request),
        "redis": lambda: _redis(settings.effective_redis_url()),
    }
    if settings.effective_broker_url() != settings.effective_redis_url():
        checks["broker"] = lambda: _broker(settings.effective_broker_url())
    found: dict[str, str] = {}
    for name, check in checks.items():
        try:
            check()
            found[name] = "ok"
        except Exception as exc:  # any failure means "not ready"; the kind is enough
            found[name] = f"unavailable ({type(exc).__name__})"
    if "broker" not in found:
        found["broker"] = found["redis"]
    return found


@router.get("/readyz", response_model=None, responses={
    503: {"model": Problem, "description": "Not ready (`not_ready`): `checks` names the state of the database, "
                                           "Redis and the broker."},
})
async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
    """Ready when the database, Redis and the broker answer; ``503`` otherwise."""
    found = await run_in_threadpool(_checks, request)
    if all(state == "ok" for state in found.values()):
        return {"status": "ok", "checks": found}
    down = ", ".join(name for name, state in found.items() if state != "ok")
    return problem(503, "not_ready", "Not ready.", f"unavailable: {down}", checks=found)
