"""A real stack for the delivery tests (rates, retries, lost workers, lost messages, callbacks):
the API, worker processes, Celery beat (the sweeper) and the demo upstream, each a process on
loopback, with timings short enough for a test to watch a lease expire or a message be sent
again. Unlike the shared ``stack`` fixture, workers and beat can be started, stopped and
killed one by one.

Each stack gets a database of its own (a fresh PostgreSQL database when
``HUB_TEST_DATABASE_URL`` is set, else a SQLite file), because its sweeper acts on every job in
the database it sees, and a queue of its own, so that no other stack's worker on the same
Redis takes its messages.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests import processes
from tests.conftest import TEST_DATABASE_URL, TEST_MASTER_KEY, _normalize

TIMINGS = {
    "HUB_SWEEP_INTERVAL_S": "1",
    "HUB_SWEEP_GRACE_S": "3",
    "HUB_JOB_LEASE_S": "6",
    "HUB_REQUEST_DEADLINE_S": "4",
    "HUB_RETRY_BASE_S": "0.2",
    "HUB_RETRY_CAP_S": "1",
    "HUB_RETRY_AFTER_CAP_S": "2",
    "HUB_RATE_HORIZON_S": "30",
    "HUB_DEFAULT_MAX_ATTEMPTS": "3",
    "HUB_CALLBACK_BACKOFF_S": "0.2",
    # Longer than any countdown or lease plus the deadline (30 + 4), as the settings require;
    # long enough that the broker never redelivers an unacknowledged message during a test.
    "HUB_BROKER_VISIBILITY_TIMEOUT_S": "120",
}
"""Short timings: a lost worker's job is taken back ~10 s (lease 6 s + deadline 4 s) after
its claim, a lost message is sent again ~3 s after it was due, a sweep runs every second."""

FINAL = ("succeeded", "failed", "cancelled")


@contextmanager
def fresh_database(directory: Path) -> Iterator[str]:
    """A new, empty database: on the PostgreSQL server of ``HUB_TEST_DATABASE_URL`` when set
    (dropped afterwards), else a SQLite file in ``directory``."""
    if not TEST_DATABASE_URL:
        yield f"sqlite:///{directory / 'hub.db'}"
        return
    admin_url = make_url(_normalize(TEST_DATABASE_URL))
    name = f"hub_e2e_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class DeliveryStack:
    """A running stack: its URLs, the default tenant's key, its environment and logs, and
    handles to start, stop or kill its workers and beat."""

    api: str
    upstream: str
    key: str
    env: dict[str, str]
    logs: Path
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def headers(self, key: str | None = None) -> dict[str, str]:
        """The Authorization header of ``key`` (default: the stack's tenant)."""
        return {"Authorization": f"Bearer {key or self.key}"}

    def client(self, key: str | None = None, timeout: float = 40.0) -> httpx.Client:
        """An HTTP client of the API as the tenant of ``key`` (default: the stack's tenant)."""
        return httpx.Client(base_url=self.api, headers=self.headers(key), timeout=timeout)

    def log(self, name: str) -> str:
        """What the process ``name`` logged so far."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_worker(self, name: str, concurrency: int = 2) -> None:
        """Start a worker process named ``name`` with ``concurrency`` slots; wait until it is ready."""
        log = self.logs / f"{name}.log"
        log.write_bytes(b"")
        worker = processes.start([*processes.HUB, "worker", "-c", str(concurrency), "-n", f"{name}@%h"],
                                 self.env, log)
        self.started[name] = worker
        processes.wait_until(lambda: b"ready." in log.read_bytes(), name, process=worker, log=log)

    def start_beat(self) -> None:
        """Start Celery beat, which sends the sweep every ``HUB_SWEEP_INTERVAL_S``."""
        log = self.logs / "beat.log"
        beat = processes.start([*processes.HUB, "beat"], self.env, log)
        self.started["beat"] = beat
        processes.wait_until(lambda: b"Sending due task" in log.read_bytes(), "beat", process=beat, log=log)

    def stop(self, name: str) -> None:
        """Stop the process ``name`` gracefully (SIGTERM, then SIGKILL after a grace period)."""
        processes.stop(self.started.pop(name))

    def terminate(self, name: str, timeout: float = 30.0) -> float:
        """Send SIGTERM to the process ``name``, as an orchestrator stops it, and wait for it to
        exit (up to ``timeout``, then stop it harder); the seconds it took."""
        process = self.started.pop(name)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
            return time.monotonic() - signalled
        finally:
            processes.stop(process)

    def kill(self, name: str) -> None:
        """SIGKILL the whole process group of ``name`` (its main process and pool children), as
        when a machine dies: nothing is acknowledged, nothing cleaned up."""
        process = self.started.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def create_tenant(self, name: str, *, rate: float, burst: int, max_inflight: int) -> str:
        """Create a tenant with the CLI, as an operator does; its API key."""
        created = subprocess.run(
            [*processes.HUB, "tenants", "create", name, "--rate", str(rate), "--burst", str(burst),
             "--max-inflight", str(max_inflight)],
            env=self.env, check=True, timeout=60, capture_output=True, text=True,
        )
        return created.stdout.strip().splitlines()[-1]

    def upstream_stats(self) -> dict[str, int]:
        """How many requests the upstream got, per path."""
        stats: dict[str, int] = httpx.get(f"{self.upstream}/stats", timeout=5).json()
        return stats

    def upstream_calls(self, path: str) -> list[float]:
        """The times (Unix seconds, the upstream's clock) of the upstream's calls to ``path``, in order."""
        calls: list[list[Any]] = httpx.get(f"{self.upstream}/calls", timeout=5).json()
        return sorted(float(when) for when, called in calls if called == path)


def connection(client: httpx.Client, upstream: str, name: str, requests: dict[str, tuple[str, str]]) -> None:
    """A template, a connection ``name`` to ``upstream`` and its stored requests
    (``{request name: (method, url)}``), made through the API."""
    template = client.post("/v1/templates", json={"name": name, "service_name": "Demo",
                                                  "verbs": ["GET", "POST", "PUT", "DELETE"]})
    assert template.status_code == 201, template.text
    created = client.post("/v1/connections", json={"name": name, "template_id": template.json()["id"],
                                                   "base_url": upstream})
    assert created.status_code == 201, created.text
    for request, (method, url) in requests.items():
        stored = client.post(f"/v1/connections/{name}/requests", json={"name": request, "method": method, "url": url})
        assert stored.status_code == 201, stored.text


def submit(client: httpx.Client, **submission: Any) -> str:
    """Submit a job; its id."""
    submitted = client.post("/v1/executions", json=submission)
    assert submitted.status_code == 202, submitted.text
    job_id: str = submitted.json()["id"]
    return job_id


def wait_final(client: httpx.Client, job_ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, Any]]:
    """Poll each job (``?wait=``) until it is final; every job's document. Fails after ``timeout``."""
    done: dict[str, dict[str, Any]] = {}

    def all_final() -> bool:
        for job_id in job_ids:
            if job_id not in done:
                job = client.get(f"/v1/executions/{job_id}?wait=5").json()
                if job["status"] not in FINAL:
                    return False
                done[job_id] = job
        return True

    try:
        processes.wait_until(all_final, f"{len(job_ids)} jobs final", timeout=timeout)
    except AssertionError:
        waiting = {job_id: client.get(f"/v1/executions/{job_id}").json() for job_id in job_ids if job_id not in done}
        raise AssertionError(f"{len(waiting)} jobs not final after {timeout} s: {list(waiting.values())[:5]}") from None
    return done


@contextmanager
def running_stack(redis_url: str, database_url: str, logs: Path, *, workers: tuple[str, ...] = ("worker-1", "worker-2"),
                  beat: bool = True, extra_env: Mapping[str, str] | None = None) -> Iterator[DeliveryStack]:
    """Migrate the database, create a tenant whose limits do not bite, start the upstream, the
    API, ``workers`` (two slots each) and, with ``beat``, the sweeper; stop them all after.
    ``extra_env`` is added to (and overrides) every process's environment, ``TIMINGS`` included."""
    api_port, upstream_port = processes.free_port(), processes.free_port()
    env = {
        **os.environ,
        **TIMINGS,
        "HUB_DATABASE_URL": database_url,
        "HUB_REDIS_URL": redis_url,
        "HUB_QUEUE_NAME": f"hub.jobs.e2e-{os.getpid()}-{api_port}",
        "HUB_DATA_DIR": str(logs),
        "HUB_ALLOW_HTTP": "true",
        "HUB_ALLOW_PRIVATE_DESTINATIONS": "true",
        "HUB_MASTER_KEYS": TEST_MASTER_KEY,
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("HUB_BROKER_URL", None)
    subprocess.run([*processes.HUB, "migrate"], env=env, check=True, timeout=60, capture_output=True)
    stack = DeliveryStack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{upstream_port}", "", env, logs)
    stack.key = stack.create_tenant(f"delivery-{os.getpid()}-{api_port}", rate=1000, burst=1000, max_inflight=1000)
    try:
        upstream = processes.start([*processes.HUB, "upstream", "--port", str(upstream_port)], env,
                                   logs / "upstream.log")
        stack.started["upstream"] = upstream
        processes.wait_until(lambda: processes.http_ok(f"{stack.upstream}/stats"), "upstream", process=upstream,
                             log=logs / "upstream.log")
        api = processes.start([*processes.HUB, "api", "--port", str(api_port)], env, logs / "api.log")
        stack.started["api"] = api
        processes.wait_until(lambda: processes.http_ok(f"{stack.api}/readyz"), "api", process=api,
                             log=logs / "api.log")
        for name in workers:
            stack.start_worker(name)
        if beat:
            stack.start_beat()
        yield stack
    finally:
        for name in reversed(list(stack.started)):
            stack.stop(name)
