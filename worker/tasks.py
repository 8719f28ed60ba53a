"""The Celery tasks: thin glue between a message (a job id, nothing else) and the executor."""

from __future__ import annotations

import logging
import os

import redis

from models.db import get_engine
from models.settings import get_settings
from models.vault import Vault
from worker import guard, tls, upstream
from worker.celery_app import app
from worker.executor import Runtime, run_job
from worker.keys import EXECUTE_TASK
from worker.tokens import TokenCache

# httpx logs every request's URL at INFO, and a URL may carry a secret or a token.
logging.getLogger("httpx").setLevel(logging.WARNING)

_runtimes: dict[int, Runtime] = {}


def runtime() -> Runtime:
    """This process's runtime, built on first use (after a prefork child is forked)."""
    current = _runtimes.get(os.getpid())
    if current is None:
        settings = get_settings()
        vault = Vault.from_setting(settings.master_keys_value())
        current = _runtimes[os.getpid()] = Runtime(
            settings=settings,
            engine=get_engine(settings.effective_database_url()),
            client=upstream.build_client(settings, transport=guard.PinnedTransport(tls.context(settings))),
            vault=vault,
            tokens=TokenCache(redis.Redis.from_url(settings.effective_redis_url()), vault, settings),
        )
    return current


@app.task(name=EXECUTE_TASK, acks_late=True, ignore_result=True)
def execute(job_id: str) -> None:
    """Run the job ``job_id``. The message carries the id only: the worker loads the rest."""
    run_job(job_id, runtime())
