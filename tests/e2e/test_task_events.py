"""Celery's task events are off by default (``HUB_TASK_EVENTS``), and ``integration-hub flower``
turns them on in the running workers, so Flower still shows the jobs by name with the job id
as their only argument. (``integration-hub dev``, which turns them on itself, is
``tests/e2e/test_dev.py``.)

The test runs a stack of its own (``tests/e2e/delivery_stack.py``: a fresh database and a
queue of its own).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from celery import Celery

from tests import processes
from tests.e2e.delivery_stack import connection, fresh_database, running_stack, submit, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ENABLED_BY_FLOWER = b"Events of group {task} enabled by remote."
"""What a Celery worker logs when a control command turns its task events on."""


def flower_tasks(flower: str) -> dict[str, dict[str, Any]]:
    """Flower's task list (``/api/tasks``), by task id."""
    tasks: dict[str, dict[str, Any]] = httpx.get(f"{flower}/api/tasks", timeout=5).json()
    return tasks


@contextmanager
def celery_events(broker_url: str) -> Iterator[list[dict[str, Any]]]:
    """Every Celery event sent on ``broker_url`` while the block runs, as Flower receives them."""
    app = Celery("listener", broker=broker_url)
    seen: list[dict[str, Any]] = []
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        listener = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listener.start()
        try:
            yield seen
        finally:
            receiver.should_stop = True
            listener.join(10)


def task_events(seen: list[dict[str, Any]], job_id: str) -> list[str]:
    """The types of the task events about the job ``job_id`` (its task's), in order."""
    uuids = {e["uuid"] for e in seen if e["type"].startswith("task-") and e.get("args") == repr([job_id])}
    return [e["type"] for e in seen if e["type"].startswith("task-") and e.get("uuid") in uuids]


def test_flower_turns_on_the_task_events_that_are_off_by_default(redis_url: str, tmp_path: Path) -> None:
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, workers=("worker-1",), beat=False,
                          extra_env={"HUB_TASK_EVENTS": "false"}) as stack, \
            celery_events(redis_url) as seen:
        # Given a worker with the default setting: it says, when it starts, that it sends no task events
        assert " task_events=off " in stack.log("worker-1"), stack.log("worker-1")
        with stack.client() as hub:
            connection(hub, stack.upstream, "watched", {"echo": ("GET", "/echo/watched")})
            # When a job runs before Flower starts
            before = submit(hub, connection="watched", request="echo")
            assert wait_final(hub, [before])[before]["status"] == "succeeded"
            # Then neither the API nor the worker sent a task event about it (the worker's
            # heartbeats show that events were being received)
            processes.wait_until(lambda: any(e["type"] == "worker-heartbeat" and e["hostname"].startswith("worker-1@")
                                             for e in seen), "a heartbeat of the worker", timeout=10)
            assert task_events(seen, before) == [], seen

            # When Flower starts, as an operator starts it
            port = processes.free_port()
            flower = f"http://127.0.0.1:{port}"
            log = tmp_path / "flower.log"
            stack.started["flower"] = processes.start(
                [*processes.HUB, "flower", "--address", "127.0.0.1", "--port", str(port)],
                {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}, log)
            processes.wait_until(lambda: processes.http_ok(f"{flower}/healthcheck"), "Flower",
                                 process=stack.started["flower"], log=log)
            # Then within its broadcast interval (5 s) the worker turns its task events on
            worker_log = tmp_path / "worker-1.log"
            processes.wait_until(lambda: ENABLED_BY_FLOWER in worker_log.read_bytes(),
                                 "Flower to turn the worker's task events on", timeout=30)

            # and a job run after that is in Flower's task list, by name, with the job id as
            # its only argument, and succeeded
            after = submit(hub, connection="watched", request="echo")
            assert wait_final(hub, [after])[after]["status"] == "succeeded"

            def shown() -> bool:
                return any(t.get("name") == "hub.execute" and t.get("args") == repr([after])
                           and t.get("state") == "SUCCESS" for t in flower_tasks(flower).values())

            processes.wait_until(shown, "the job in Flower", timeout=20)
        # from the worker's task events; the API still sends no task-sent event
        assert task_events(seen, after) == ["task-received", "task-started", "task-succeeded"], seen
