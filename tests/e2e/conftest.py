"""The real stack for end-to-end tests: Redis, the database, the API under uvicorn, a Celery
worker process and the demo upstream, each a separate process on loopback.

Redis is ``HUB_TEST_REDIS_URL`` when set (CI), else a Redis server that the test starts from
the binary the hub bundles (``redis_url`` in ``tests/conftest.py``). The database is ``HUB_TEST_DATABASE_URL`` (a fresh database) when
set, else a SQLite file.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import processes
from tests.conftest import TEST_MASTER_KEY

pytestmark = pytest.mark.e2e


WORKERS = ("worker-1", "worker-2")


@dataclass
class Stack:
    """URLs and the API key of a running stack, and where its logs are."""

    api: str
    upstream: str
    key: str
    env: dict[str, str]
    logs: Path

    def headers(self) -> dict[str, str]:
        """The tenant's Authorization header."""
        return {"Authorization": f"Bearer {self.key}"}

    def worker_logs(self) -> str:
        """What every worker process logged so far."""
        return "".join((self.logs / f"{name}.log").read_text(errors="replace") for name in WORKERS)


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """API, worker and upstream as real processes on a migrated database, and a tenant's key."""
    logs = tmp_path_factory.mktemp("stack")
    if os.environ.get("HUB_TEST_DATABASE_URL"):
        database_url = request.getfixturevalue("postgres_url")
    else:
        database_url = f"sqlite:///{logs / 'hub.db'}"
    api_port, upstream_port = processes.free_port(), processes.free_port()
    env = {
        **os.environ,
        "HUB_DATABASE_URL": database_url,
        "HUB_REDIS_URL": redis_url,
        "HUB_DATA_DIR": str(logs),
        "HUB_ALLOW_HTTP": "true",
        "HUB_ALLOW_PRIVATE_DESTINATIONS": "true",
        "HUB_MASTER_KEYS": TEST_MASTER_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run([*processes.HUB, "migrate"], env=env, check=True, timeout=60, capture_output=True)
    created = subprocess.run(
        # limits high enough not to bite: the tests of rates and quotas make tenants of their own
        [*processes.HUB, "tenants", "create", f"e2e-{os.getpid()}-{api_port}", "--rate", "1000", "--burst", "1000",
         "--max-inflight", "1000"],
        env=env, check=True, timeout=60, capture_output=True, text=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    started = []
    try:
        upstream = processes.start([*processes.HUB, "upstream", "--port", str(upstream_port)], env, logs / "upstream.log")
        started.append(upstream)
        processes.wait_until(lambda: processes.http_ok(f"http://127.0.0.1:{upstream_port}/stats"),
                             "upstream", process=upstream, log=logs / "upstream.log")
        api = processes.start([*processes.HUB, "api", "--port", str(api_port)], env, logs / "api.log")
        started.append(api)
        processes.wait_until(lambda: processes.http_ok(f"http://127.0.0.1:{api_port}/readyz"),
                             "api", process=api, log=logs / "api.log")
        for name in WORKERS:  # two worker processes, two slots each, as a scaled deployment has
            log = logs / f"{name}.log"
            worker = processes.start([*processes.HUB, "worker", "-c", "2", "-n", f"{name}@%h"], env, log)
            started.append(worker)
            processes.wait_until(lambda log=log: b"ready." in log.read_bytes(), name, process=worker, log=log)
        yield Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{upstream_port}", key, env, logs)
    finally:
        for process in reversed(started):
            processes.stop(process)
