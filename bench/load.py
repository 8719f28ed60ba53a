"""The load: K client threads, each submitting a job and waiting for its result before the
next one (a closed loop: K jobs in flight), and what is measured around it.

- :func:`closed_loop` runs ``jobs`` jobs with ``in_flight`` threads, bounded in time.
- :class:`HubClient` submits with ``POST /v1/executions`` and polls ``GET /v1/executions/{id}?wait=30``.
- :class:`BaselineClient` sends the baseline task and waits for its result (see
  :mod:`bench.baseline_app`).
- :class:`Meter` reads CPU seconds per process group and Redis's command counts around a phase;
  :class:`MemorySampler` samples the resident memory of a group of processes.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis

from bench import procs
from bench.baseline_app import RESULT_PREFIX, TASK, make_app

FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Outcome:
    """One job as the client saw it."""

    ok: bool
    latency_s: float
    """From the start of the submission to the result in hand."""
    submit_s: float | None = None
    """The submission alone (``POST /v1/executions``, or sending the Celery task)."""
    error: str | None = None
    ended: float = 0.0
    stages: dict[str, float] | None = None
    """For a hub job: seconds from the client's POST to ``created_at``, then to ``started_at``
    (the queue), to ``finished_at`` (the run), and to the result in the client's hands."""


@dataclass
class Run:
    """What a closed loop measured."""

    jobs: int
    in_flight: int
    wall_s: float
    outcomes: list[Outcome]
    timed_out: bool = False

    @property
    def done(self) -> int:
        return len(self.outcomes)

    @property
    def failures(self) -> int:
        return sum(not o.ok for o in self.outcomes) + (self.jobs - self.done)

    @property
    def per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def latencies(self) -> list[float]:
        return [o.latency_s for o in self.outcomes if o.ok]

    def submits(self) -> list[float]:
        return [o.submit_s for o in self.outcomes if o.submit_s is not None]

    def stages(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for outcome in self.outcomes:
            if outcome.ok and outcome.stages:
                for name, seconds in outcome.stages.items():
                    found.setdefault(name, []).append(seconds)
        return found

    def errors(self, limit: int = 5) -> list[str]:
        found = Counter(o.error or "failed" for o in self.outcomes if not o.ok)
        if self.jobs > self.done:
            found[f"not finished in time ({self.jobs - self.done})"] += 1
        return [f"{text} (x{n})" for text, n in found.most_common(limit)]


def percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def closed_loop(job: Callable[[int], Outcome], *, jobs: int, in_flight: int, timeout_s: float) -> Run:
    """Run ``job(i)`` for i in range(jobs) from ``in_flight`` threads; stop after ``timeout_s``."""
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    next_index = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with lock:
                index = next_index[0]
                if index >= jobs:
                    return
                next_index[0] += 1
            try:
                outcome = job(index)
            except Exception as exc:  # a client-side error counts as a failed job
                outcome = Outcome(False, 0.0, error=f"{type(exc).__name__}: {exc}"[:200])
            outcome.ended = time.perf_counter()
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=loop, name=f"bench-client-{n}", daemon=True) for n in range(in_flight)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    try:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    finally:
        stop.set()
    timed_out = any(thread.is_alive() for thread in threads)
    with lock:
        done = list(outcomes)
    ended = max((o.ended for o in done), default=time.perf_counter())
    return Run(jobs=jobs, in_flight=in_flight, wall_s=ended - started, outcomes=done, timed_out=timed_out)


# --- the hub ---------------------------------------------------------------------------------


def hub_http(api: str, key: str, in_flight: int) -> httpx.Client:
    """An HTTP client for the API, with room for ``in_flight`` threads."""
    limits = httpx.Limits(max_connections=in_flight + 8, max_keepalive_connections=in_flight + 8)
    return httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits,
                        trust_env=False)


@dataclass
class HubClient:
    """Submits executions of one stored request and polls each to its end."""

    http: httpx.Client
    connection: str
    request: str
    check: Callable[[dict[str, Any]], str | None] = field(default=lambda job: None)
    """Extra checks of a succeeded job: None, or what is wrong with it."""

    def submit(self) -> tuple[str | None, float, str | None]:
        """``POST /v1/executions``: the job id (None on failure), the time it took, an error."""
        started = time.perf_counter()
        answer = self.http.post("/v1/executions", json={"connection": self.connection, "request": self.request})
        took = time.perf_counter() - started
        if answer.status_code != 202:
            return None, took, f"POST answered {answer.status_code}: {answer.text[:120]}"
        return str(answer.json()["id"]), took, None

    def wait(self, job_id: str) -> tuple[dict[str, Any], str | None]:
        """Poll the job until it is final (``?wait=30``, up to 4 times)."""
        job: dict[str, Any] = {}
        for _ in range(4):
            answer = self.http.get(f"/v1/executions/{job_id}", params={"wait": 30})
            if answer.status_code != 200:
                return job, f"GET answered {answer.status_code}"
            job = answer.json()
            if job["status"] in FINAL:
                return job, self.verdict(job)
        return job, f"still {job.get('status')} after 120 s"

    def verdict(self, job: dict[str, Any]) -> str | None:
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            return f"job {job['status']}: {error.get('code')}"
        status = (job.get("result") or {}).get("status_code")
        if status != 200:
            return f"the service answered {status}"
        return self.check(job)

    def job(self, _index: int) -> Outcome:
        """Submit one job and wait for its result."""
        started, clock = time.perf_counter(), time.time()
        job_id, took, error = self.submit()
        if job_id is None:
            return Outcome(False, time.perf_counter() - started, took, error)
        job, error = self.wait(job_id)
        outcome = Outcome(error is None, time.perf_counter() - started, took, error)
        if error is None:
            outcome.stages = stages(job, clock, time.time())
        return outcome


def stages(job: dict[str, Any], sent: float, received: float) -> dict[str, float] | None:
    """Where a hub job's time went, from its timestamps (this machine's clock, milliseconds)."""
    try:
        created, started, finished = (dt.datetime.fromisoformat(job[name]).timestamp()
                                      for name in ("created_at", "started_at", "finished_at"))
    except (KeyError, TypeError, ValueError):
        return None
    return {"api": created - sent, "queue": started - created, "run": finished - started,
            "delivery": received - finished}


# --- the baseline ----------------------------------------------------------------------------


class ResultListener:
    """One ``PSUBSCRIBE celery-task-meta-*`` for every waiting client thread."""

    def __init__(self, redis_url: str) -> None:
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub()
        self._pubsub.psubscribe(RESULT_PREFIX + "*")
        deadline = time.monotonic() + 10
        while True:  # the subscription is confirmed before any task is sent
            message = self._pubsub.get_message(timeout=1)
            if message is not None and message.get("type") == "psubscribe":
                break
            if time.monotonic() > deadline:
                raise redis.RedisError("no confirmation of PSUBSCRIBE within 10 s")
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-results", daemon=True)
        self._thread.start()

    def expect(self, task_id: str) -> Callable[[float], dict[str, Any] | None]:
        """Register ``task_id`` (before sending it); returns a wait for its result document."""
        event = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._waiting[task_id] = (event, box)

        def wait(timeout: float) -> dict[str, Any] | None:
            event.wait(timeout)
            with self._lock:
                self._waiting.pop(task_id, None)
            return box[0] if box else None

        return wait

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._pubsub.get_message(timeout=0.5)
            except redis.RedisError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)
                continue
            if message is None or message.get("type") != "pmessage":
                continue
            task_id = message["channel"].decode()[len(RESULT_PREFIX):]
            with self._lock:
                found = self._waiting.get(task_id)
            if found is not None:
                found[1].append(json.loads(message["data"]))
                found[0].set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._pubsub.close()
        self._client.close()


class BaselineClient:
    """Sends ``bench.fetch(url)`` and waits for its result through :class:`ResultListener`."""

    def __init__(self, broker_url: str, url: str) -> None:
        self.app = make_app(broker_url, backend=False)
        self.app.conf.broker_pool_limit = 128
        self.url = url
        self.listener = ResultListener(broker_url)

    def job(self, _index: int) -> Outcome:
        task_id = str(uuid.uuid4())
        wait = self.listener.expect(task_id)
        started = time.perf_counter()
        self.app.send_task(TASK, args=[self.url], task_id=task_id)
        sent = time.perf_counter()
        document = wait(60.0)
        took = time.perf_counter() - started
        if document is None:
            return Outcome(False, took, sent - started, "no result within 60 s")
        if document.get("status") != "SUCCESS" or '"method": "GET"' not in str(document.get("result")):
            return Outcome(False, took, sent - started, f"task {document.get('status')}")
        return Outcome(True, took, sent - started)

    def close(self) -> None:
        self.listener.close()
        self.app.close()


# --- meters ----------------------------------------------------------------------------------


@dataclass
class Reading:
    """CPU seconds per group and Redis command counts at one moment."""

    at: float
    cpu_s: dict[str, float]
    redis_calls: Counter[str]


class Meter:
    """CPU time of process groups (and of this process, the client) and Redis's command counts."""

    def __init__(self, groups: list[procs.Group], redis_url: str) -> None:
        self.groups = groups
        self._redis = redis.Redis.from_url(redis_url)

    def read(self) -> Reading:
        stats = procs.all_stats()
        cpu = {group.name: group.cpu_s(stats) for group in self.groups}
        cpu["client"] = procs.self_cpu_s()
        calls: Counter[str] = Counter()
        try:
            for name, values in self._redis.info("commandstats").items():
                calls[name.removeprefix("cmdstat_")] = int(values["calls"])
        except redis.RedisError:
            pass
        return Reading(time.perf_counter(), cpu, calls)

    @staticmethod
    def delta(before: Reading, after: Reading) -> tuple[dict[str, float], Counter[str]]:
        cpu = {name: after.cpu_s[name] - before.cpu_s.get(name, 0.0) for name in after.cpu_s}
        calls = Counter({name: after.redis_calls[name] - before.redis_calls.get(name, 0)
                         for name in after.redis_calls})
        return cpu, +calls

    def close(self) -> None:
        self._redis.close()


class MemorySampler:
    """Samples the summed RSS (and PSS) of a group of processes every ``interval_s``."""

    def __init__(self, group: procs.Group, interval_s: float = 0.05) -> None:
        self.group = group
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []
        self.peak_per_process: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> tuple[int, int]:
        """One reading now: (RSS, PSS) in bytes, summed over the group."""
        stats = self.group.members(procs.all_stats())
        rss = sum(s.rss_bytes for s in stats)
        pss = sum(procs.pss_bytes(s.pid) or 0 for s in stats)
        for s in stats:
            self.peak_per_process[s.pid] = max(self.peak_per_process.get(s.pid, 0), s.rss_bytes)
        self.samples.append((time.perf_counter(), rss, pss))
        return rss, pss

    def start(self) -> None:
        def run() -> None:
            while not self._stop.wait(self.interval_s):
                self.sample()

        self._thread = threading.Thread(target=run, name="bench-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
