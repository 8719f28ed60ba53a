"""Sending a job id to the workers, by task name: the one way every process queues work."""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import KombuError, OperationalError

from models import errors


def send(app: Celery, task: str, job_id: str, countdown: float = 0.0) -> None:
    """Queue ``task(job_id)`` on ``app``'s broker, due in ``countdown`` seconds; the message
    carries the job id and nothing else. :class:`~models.errors.BrokerUnavailable` when the
    broker cannot take it."""
    try:
        app.send_task(task, args=[job_id], countdown=countdown if countdown > 0 else None)
    except (KombuError, OperationalError, OSError) as exc:
        raise errors.BrokerUnavailable() from exc
