"""The Celery application: Redis broker, late acks, one message at a time per process.

Delivery is at least once: a message is acknowledged after its task ran, so a worker that
dies mid-job leaves the message to be delivered again; the task's atomic claim of the job
row makes the second delivery harmless. No result backend: results live in the job row.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from celery import Celery, signals

from models import logs
from models.errors import HubError
from models.settings import Settings, get_settings
from models.vault import Vault
from worker.keys import SWEEP_TASK


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
        worker_send_task_events=True,
        task_send_sent_event=True,
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


@signals.worker_shutting_down.connect
def bound_the_warm_shutdown(how: str = "", **_: object) -> None:
    """On SIGTERM Celery stops taking messages and waits for the running jobs (a warm
    shutdown); if they are not done within ``HUB_WORKER_SHUTDOWN_GRACE_S``, a SIGQUIT makes it
    cold: the jobs' messages stay unacknowledged, and their leases let the sweeper send them
    again."""
    if how != "Warm":
        return
    grace = get_settings().worker_shutdown_grace_s
    timer = threading.Timer(grace, os.kill, args=(os.getpid(), signal.SIGQUIT))
    timer.daemon = True
    timer.start()
