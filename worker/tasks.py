"""The Celery tasks: thin glue between a message (a job id, nothing else) and the executor."""

from __future__ import annotations

import logging
import os
import uuid

import redis

from models import errors, metrics
from models.db import UNAVAILABLE, get_engine
from models.logs import job_event
from models.settings import get_settings
from models.tables import Job
from models.vault import Vault
from worker import callbacks, guard, ratelimit, sweeper, tls, upstream
from worker.celery_app import app
from worker.dispatch import send
from worker.executor import run_job
from worker.keys import CALLBACK_TASK, EXECUTE_TASK, SWEEP_LOCK_KEY, SWEEP_TASK
from worker.leases import Leases
from worker.runtime import Runtime
from worker.tokens import TokenCache

# httpx logs every request's URL at INFO, and a URL may carry a secret or a token.
logging.getLogger("httpx").setLevel(logging.WARNING)
log = logging.getLogger("hub.worker")

_runtimes: dict[int, Runtime] = {}


def _later(task: str, job_id: str, delay_s: float = 0.0) -> None:
    """Queue ``task(job_id)`` from a worker. A broker that is down is logged, not raised: the
    job's ``due_at`` (or pending callback) is in the database, and the sweeper sends it."""
    try:
        send(app, task, job_id, delay_s)
    except errors.BrokerUnavailable:
        job_event(log, "not sent: the broker is unavailable; the sweeper will send it", job_id,
                  level=logging.WARNING, outcome=task)


def _notify(job: Job) -> None:
    if job.callback_url:
        _later(CALLBACK_TASK, job.id)


def runtime() -> Runtime:
    """This process's runtime, built on first use (after a prefork child is forked)."""
    current = _runtimes.get(os.getpid())
    if current is None:
        settings = get_settings()
        vault = Vault.from_setting(settings.master_keys_value())
        client = redis.Redis.from_url(settings.effective_redis_url())
        engine = get_engine(settings.effective_database_url())
        current = _runtimes[os.getpid()] = Runtime(
            settings=settings,
            engine=engine,
            client=upstream.build_client(settings, transport=guard.PinnedTransport(tls.context(settings))),
            vault=vault,
            tokens=TokenCache(client, vault, settings),
            limiter=ratelimit.Limiter(client, horizon_s=settings.rate_horizon_s),
            dispatch=lambda job_id, delay_s: _later(EXECUTE_TASK, job_id, delay_s),
            notify=_notify,
            metrics=client,
            leases=Leases(engine, every_s=settings.job_lease_s / 3),
        )
    return current


@app.task(name=EXECUTE_TASK, acks_late=True, ignore_result=True)
def execute(job_id: str) -> None:
    """Run the job ``job_id``. The message carries the id only: the worker loads the rest."""
    run_job(job_id, runtime())


@app.task(name=CALLBACK_TASK, acks_late=True, ignore_result=True)
def callback(job_id: str) -> None:
    """Deliver the finished job ``job_id`` to its ``callback_url``; on failure, send itself again
    after a backoff (a new message, so no worker slot waits)."""
    try:
        wait = callbacks.deliver(job_id, runtime())
    except UNAVAILABLE as exc:  # still pending: the sweeper sends it again once it is overdue
        job_event(log, "callback stopped: the database is unavailable; the sweeper will send it again", job_id,
                  level=logging.WARNING, code=type(exc).__name__)
        return
    if wait is not None:
        _later(CALLBACK_TASK, job_id, wait)


@app.task(name=SWEEP_TASK, acks_late=False, ignore_result=True)
def sweep() -> None:
    """Celery beat's periodic sweep (see :mod:`worker.sweeper`), one at a time across workers."""
    current = runtime()
    lock = current.tokens.redis.set(SWEEP_LOCK_KEY, uuid.uuid4().hex, nx=True,
                                    px=int(max(current.settings.sweep_interval_s, 30.0) * 1000))
    if not lock:
        return
    try:
        report = sweeper.sweep(current.engine, current.settings, sweeper.Senders(
            dispatch=lambda job_id: send(app, EXECUTE_TASK, job_id),
            notify=lambda job_id: send(app, CALLBACK_TASK, job_id),
        ))
    except UNAVAILABLE as exc:  # what this sweep did not do, the next one does
        log.warning("sweep: the database is unavailable (%s); the next sweep tries again", type(exc).__name__)
        return
    finally:
        current.tokens.redis.delete(SWEEP_LOCK_KEY)
    batch = metrics.Batch(current.metrics)
    sweeper.record(report, batch)
    batch.flush()
