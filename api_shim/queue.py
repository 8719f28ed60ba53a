"""Sending jobs to the workers: by task name, with the job id as the only argument."""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery

from worker.celery_app import app as worker_app
from worker.dispatch import send
from worker.keys import EXECUTE_TASK

Enqueue = Callable[[str], None]


def celery_enqueue(app: Celery | None = None) -> Enqueue:
    """A function that sends a job id to the broker of ``app`` (default: the worker's app).

    It raises :class:`~models.errors.BrokerUnavailable` when the broker cannot take it.
    """
    target = app or worker_app

    def enqueue(job_id: str) -> None:
        send(target, EXECUTE_TASK, job_id)

    return enqueue
