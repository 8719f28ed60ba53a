"""The Celery application: Redis broker, late acks, one message at a time per process.

Delivery is at least once: a message is acknowledged after its task ran, so a worker that
dies mid-job leaves the message to be delivered again; the task's atomic claim of the job
row makes the second delivery harmless. No result backend: results live in the job row.
"""

from __future__ import annotations

import _thread
import logging
import os
import signal
import sys
import time
from typing import Any

from celery import Celery, signals

from models import logs
from models.errors import HubError
from models.settings import Settings, get_settings
from models.vault import Vault
from worker.keys import SWEEP_TASK

log = logging.getLogger("hub.worker")


def create_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings``."""
    app = Celery("integration_hub", broker=settings.effective_broker_url(), include=["worker.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        # Only Flower reads task events; while it runs it turns the workers' on (HUB_TASK_EVENTS).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=settings.task_events,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=4,
        broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_s},
        # The API must answer quickly when the broker is down (503 broker_unavailable).
        # The sweeper (worker.sweeper), sent by `integration-hub beat`; a sweep nobody took
        # before the next one is due is dropped.
        beat_schedule={
            "sweep": {"task": SWEEP_TASK, "schedule": settings.sweep_interval_s,
                      "options": {"expires": settings.sweep_interval_s}},
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
    )
    return app


app = create_app(get_settings())


@signals.celeryd_init.connect
def refuse_to_start_without_a_master_key(**_: object) -> None:
    """A worker that could not open any secret does not start (``celery -A worker worker`` too)."""
    try:
        Vault.from_setting(get_settings().master_keys_value())
    except HubError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from exc


@signals.after_setup_logger.connect
@signals.after_setup_task_logger.connect
def use_the_hubs_log_format(logger: logging.Logger, **_: object) -> None:
    """Celery's handlers (worker, beat, tasks) write lines in ``HUB_LOG_FORMAT``; httpx, which
    logs every URL at INFO (a URL may hold a secret), only warnings."""
    settings = get_settings()
    if settings.log_format == "json":
        for handler in logger.handlers:
            handler.setFormatter(logs.formatter("json"))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def monkey_patched() -> str | None:
    """The library, ``gevent`` or ``eventlet``, that made this process's sockets cooperative;
    None if neither did. Neither is imported here: one not imported yet has patched nothing."""
    gevent_monkey: Any = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("socket"):
        return "gevent"
    eventlet_patcher: Any = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None and eventlet_patcher.is_monkey_patched("socket"):
        return "eventlet"
    return None


@signals.worker_ready.connect
def say_how_the_worker_runs(sender: Any, **_: object) -> None:
    """One line when a worker is ready (just before Celery's ``ready.``): its pool, its slots,
    whether it sends task events, and which library monkey-patched its sockets. A gevent or
    eventlet worker whose sockets are not patched blocks on its first socket, whatever its ``-c``."""
    worker = sender.controller  # the sender is the worker's consumer
    pool_cls = worker.pool_cls
    pool = (pool_cls if isinstance(pool_cls, str) else pool_cls.__module__).rsplit(".", 1)[-1]
    fields = {"pool": pool, "concurrency": worker.concurrency,
              "task_events": "on" if worker.task_events else "off", "monkey_patched": monkey_patched() or "no"}
    log.info("worker %s: %s", sender.hostname, " ".join(f"{key}={value}" for key, value in fields.items()),
             extra={logs.HUB_FIELDS: fields})


@signals.worker_shutting_down.connect
def bound_the_warm_shutdown(how: str = "", **_: object) -> None:
    """On SIGTERM Celery stops taking messages and waits for the running jobs (a warm
    shutdown); if they are not done within ``HUB_WORKER_SHUTDOWN_GRACE_S``, a SIGQUIT makes it
    cold: the jobs' messages stay unacknowledged, and their leases let the sweeper send them
    again."""
    if how != "Warm":
        return
    # Not threading.Timer, whose start() waits until its thread runs: a gevent worker calls
    # this handler in its event loop, where nothing may wait. A bare thread (a greenlet once
    # monkey-patched) starts without waiting.
    _thread.start_new_thread(_quit_after, (get_settings().worker_shutdown_grace_s,))


def _quit_after(grace_s: float) -> None:
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGQUIT)
