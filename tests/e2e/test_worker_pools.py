"""``integration-hub worker --pool gevent``: the worker monkey-patches the standard library
before anything imports sockets, as Celery's own ``celery`` command does, so its greenlets run
their jobs at once, and its warm shutdown is bounded as a prefork worker's is; without gevent
installed the command says so in one line.

Each gevent test runs a stack of its own (``tests/e2e/delivery_stack.py``: a fresh database and
a queue of its own) and is skipped when gevent is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import processes
from tests.e2e.delivery_stack import DeliveryStack, connection, fresh_database, running_stack, submit, wait_final

SLOW_S = 2
"""How long the upstream takes to answer each job's call."""


def start_gevent_worker(stack: DeliveryStack, log: Path) -> None:
    """Start ``integration-hub worker --pool gevent -c 4`` as an operator would, named
    ``gevent``, its output in ``log``; wait until it is ready."""
    worker = processes.start([*processes.HUB, "worker", "--pool", "gevent", "-c", "4", "-n", "gevent@%h"],
                             stack.env, log)
    stack.started["gevent"] = worker
    processes.wait_until(lambda: b"ready." in log.read_bytes(), "the gevent worker", process=worker, log=log,
                         timeout=60)


def test_the_command_line_imports_no_socket_before_it_patches() -> None:
    # Given a fresh interpreter, when it imports the command line's module (as the
    # `integration-hub` script does before it calls main)
    done = subprocess.run(
        [sys.executable, "-c", "import sys, api_shim.cli; "
         "print(sorted(m for m in ('socket', 'ssl', 'threading', 'select') if m in sys.modules))"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    # Then nothing that gevent must patch first is imported yet
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_greenlet_pool_without_its_library_is_refused_in_one_line(pool: str) -> None:
    # Given an interpreter in which the pool's library cannot be imported (as if not installed)
    hide = f"import sys; sys.modules[{pool!r}] = None; from api_shim.cli import main; sys.exit(main())"
    # When an operator starts a worker on that pool
    done = subprocess.run([sys.executable, "-c", hide, "worker", "--pool", pool, "-c", "4"],
                          capture_output=True, text=True, timeout=60)
    # Then the command exits with status 2 and one line that says what to install, no traceback
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: --pool {pool} needs {pool}"), done.stderr
    assert f"pip install {pool}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_gevent_worker_is_patched_and_runs_its_jobs_at_once(redis_url: str, tmp_path: Path) -> None:
    pytest.importorskip("gevent")
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, workers=(), beat=False) as stack:
        # Given a worker started as an operator would, on a gevent pool of 4 slots
        log = tmp_path / "gevent.log"
        start_gevent_worker(stack, log)
        # Then its start line says its pool and slots, and that gevent patched its sockets,
        # and gevent did not warn that it patched too late
        started = log.read_text(errors="replace")
        assert "pool=gevent concurrency=4 " in started and " monkey_patched=gevent" in started, started
        assert "MonkeyPatchWarning" not in started, started

        # When four jobs, each a call the upstream answers after 2 seconds, are submitted at once
        with stack.client() as hub:
            connection(hub, stack.upstream, "slow", {"slow": ("GET", f"/slow/{SLOW_S}")})
            job_ids = [submit(hub, connection="slow", request="slow") for _ in range(4)]
            done = wait_final(hub, job_ids, timeout=40)

        # Then each succeeded with the upstream's answer
        assert [(job["status"], job["result"]["status_code"]) for job in done.values()] == [("succeeded", 200)] * 4
        # and the four calls were under way together: the upstream got the last one before it
        # answered the first (a worker whose sockets block would call one after another)
        calls = stack.upstream_calls(f"/slow/{SLOW_S}")
        assert len(calls) == 4, calls
        assert calls[-1] - calls[0] < SLOW_S * 0.75, calls
        assert "MonkeyPatchWarning" not in log.read_text(errors="replace")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_gevent_worker_still_busy_after_the_grace_stops_cold(redis_url: str, tmp_path: Path) -> None:
    pytest.importorskip("gevent")
    timings = {"HUB_WORKER_SHUTDOWN_GRACE_S": "1", "HUB_REQUEST_DEADLINE_S": "10", "HUB_JOB_LEASE_S": "11"}
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, workers=(), beat=False, extra_env=timings) as stack:
        # Given a gevent worker with 1 s of grace, and a job of 8 s running on it
        log = tmp_path / "gevent.log"
        start_gevent_worker(stack, log)
        with stack.client() as hub:
            connection(hub, stack.upstream, "slow", {"slow": ("GET", "/slow/8")})
            job_id = submit(hub, connection="slow", request="slow")
            processes.wait_until(lambda: stack.upstream_stats().get("/slow/8", 0) == 1, "the job's call", timeout=30)

            # When the worker gets SIGTERM, as an orchestrator stops it
            took = stack.terminate("gevent")

            # Then it stops cold once the grace is over, long before the job could have finished,
            # and the job is left running for the sweeper to take back after its lease
            text = log.read_text(errors="replace")
            assert took < 5.0, (took, text[-3000:])
            assert "Cold shutdown" in text and "raised:" not in text, text[-3000:]
            cut = hub.get(f"/v1/executions/{job_id}").json()
            assert (cut["status"], cut["attempts"]) == ("running", 1), cut
