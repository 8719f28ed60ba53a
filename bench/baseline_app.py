"""The baseline: a bare Celery app whose task makes one httpx GET and returns the body.

No database and no hub code: what Celery, Redis and httpx cost by themselves for the same
call to the same demo upstream, for the hub's figures to be read against.

- Broker: Redis (``BENCH_BROKER_URL``), queue ``bench.baseline``.
- Completion: Celery's Redis result backend on the same Redis. A finished task's return value
  is stored with ``SETEX celery-task-meta-<id>`` and ``PUBLISH`` on that name in one pipeline;
  the benchmark's client listens with a single ``PSUBSCRIBE celery-task-meta-*`` and wakes the
  thread waiting for that id (no polling). The client's own app has no result backend, so
  sending a task does not subscribe to its result.
- Delivery options: Celery's defaults (``BENCH_BASELINE_DELIVERY=celery``), or the hub's
  (``=hub``: late acks, reject on worker lost, a prefetch of one; no task events, as the hub by default) to tell
  how much of the difference those settings make.

Workers run as ``python -m celery -A bench.baseline_app worker --pool P -c N``, with the same
pool, concurrency and log level as the hub's workers in the same run.
"""

from __future__ import annotations

import os
import threading

import httpx
from celery import Celery

QUEUE = "bench.baseline"
TASK = "bench.fetch"
RESULT_PREFIX = "celery-task-meta-"


def make_app(broker_url: str, *, backend: bool = True, delivery: str = "celery") -> Celery:
    """The baseline app on ``broker_url``; ``backend``: with the Redis result backend."""
    app = Celery("bench_baseline", broker=broker_url, backend=broker_url if backend else None)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        result_expires=600,
        broker_connection_retry_on_startup=True,
    )
    if delivery == "hub":  # the delivery settings of worker.celery_app
        app.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
        )
    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0"),
    delivery=os.environ.get("BENCH_BASELINE_DELIVERY", "celery"),
)

_clients: dict[int, httpx.Client] = {}
_lock = threading.Lock()


def _client() -> httpx.Client:
    """This process's HTTP client (made after a prefork child is forked; shared by threads)."""
    pid = os.getpid()
    client = _clients.get(pid)
    if client is None:
        with _lock:
            client = _clients.get(pid)
            if client is None:
                client = _clients[pid] = httpx.Client(timeout=30, trust_env=False)
    return client


@app.task(name=TASK)
def fetch(url: str) -> str:
    """GET ``url`` and return the body as text."""
    response = _client().get(url)
    response.raise_for_status()
    return response.text
