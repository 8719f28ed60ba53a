"""``/metrics``: the hub's Prometheus metrics, added up in Redis by every process
(:mod:`models.metrics`), and the jobs in flight per tenant and status, read from the database."""

from __future__ import annotations

from collections.abc import Iterator

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy.engine import Engine
from sqlmodel import col

from models import jobs
from models.metrics import HubCollector
from models.tables import Job

router = APIRouter(tags=["health"])


class InFlightCollector:
    """``hub_jobs_in_flight{tenant,status}``: jobs queued, running or retrying now."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("hub_jobs_in_flight", "Jobs queued, running or retrying now.",
                                   labels=["tenant", "status"])
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(col(Job.tenant_id), col(Job.status), sa.func.count())
                .where(col(Job.status).in_(jobs.IN_FLIGHT))
                .group_by(col(Job.tenant_id), col(Job.status))
            ).all()
        for tenant_id, status, count in rows:
            family.add_metric([tenant_id, status], count)
        yield family


def _render(request: Request) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(request.app.state.redis))  # type: ignore[arg-type]
    registry.register(InFlightCollector(request.app.state.engine))  # type: ignore[arg-type]
    return generate_latest(registry)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the whole hub (every API and worker process), in the text format.

    No API key: scrape it from inside the deployment, and do not expose it publicly (its labels
    name tenants by id)."""
    return Response(await run_in_threadpool(_render, request), media_type=CONTENT_TYPE_LATEST)
