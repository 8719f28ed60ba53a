"""Waking ``GET /v1/executions/{id}?wait=N`` as soon as a worker finishes the job.

A worker publishes the id of each job it finishes on the Redis channel
:data:`~models.jobs.FINAL_CHANNEL`, in the round trip that records its metrics. Each API
process runs one listener (one connection, started with the app) that sets the event of every
request waiting for that job. A waiting request still reads the job from the database at
least every :data:`RECHECK_S`, so a message missed while Redis was away costs that much
latency, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import defaultdict

import redis.asyncio as aioredis

from models.jobs import FINAL_CHANNEL

log = logging.getLogger("hub.api")

RECHECK_S = 0.5
"""A waiting request reads the job again at least this often, message or not."""


class Waiters:
    """The requests of this process that wait for jobs to finish, by job id.

    One listener per event loop that started it (uvicorn runs one; tests may run several
    apps' lifespans at once); an announcement wakes every waiting request, each in its own
    loop."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.events: defaultdict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self.tasks: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self.listening = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start listening (in the running event loop)."""
        loop = asyncio.get_running_loop()
        self.tasks[loop] = loop.create_task(self._listen())

    async def stop(self) -> None:
        """Stop this loop's listener; never waits more than a couple of seconds (a Redis that
        does not answer cannot hold the API's shutdown)."""
        task = self.tasks.pop(asyncio.get_running_loop(), None)
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=2.0)

    def register(self, job_id: str) -> asyncio.Event:
        """An event set when the job ``job_id`` is announced as finished."""
        event = asyncio.Event()
        with self._lock:
            self.events[job_id].add((asyncio.get_running_loop(), event))
        return event

    def unregister(self, job_id: str, event: asyncio.Event) -> None:
        with self._lock:
            waiting = self.events.get(job_id)
            if waiting is not None:
                waiting.discard((asyncio.get_running_loop(), event))
                if not waiting:
                    del self.events[job_id]

    def wake(self, job_id: str) -> None:
        """Wake every request waiting for ``job_id``, in whichever loop it waits."""
        with self._lock:
            waiting = list(self.events.get(job_id, ()))
        for loop, event in waiting:
            with contextlib.suppress(RuntimeError):  # its loop has closed
                loop.call_soon_threadsafe(event.set)

    def recheck_s(self) -> float:
        """How long a waiting request may sleep before it reads the job again."""
        return RECHECK_S if self.listening else 0.1

    async def _listen(self) -> None:
        backoff = 0.5
        while True:
            client = aioredis.from_url(self.redis_url, socket_connect_timeout=2)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(FINAL_CHANNEL)
                self.listening, backoff = True, 0.5
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self.wake(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: wait and subscribe again; polls cover the gap
                if self.listening:
                    log.warning("job notifications lost (%s); waiting requests poll the database", type(exc).__name__)
                self.listening = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                self.listening = False
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(pubsub.aclose(), 1.0)
                    await asyncio.wait_for(client.aclose(), 1.0)
