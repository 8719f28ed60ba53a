"""End to end through real processes: the API under uvicorn, a Celery worker, the demo
upstream and Redis, over HTTP as a user would."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from api_shim.queue import celery_enqueue
from models.settings import Settings
from tests.e2e.conftest import Stack
from tests.e2e.walkthrough import run_walkthrough
from tests.processes import wait_until
from worker.celery_app import create_app

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    """An HTTP client of the stack's API, as the test tenant."""
    with httpx.Client(base_url=stack.api, headers=stack.headers(), timeout=15) as client:
        yield client


def _wait_final(client: httpx.Client, job_id: str) -> dict:
    for _ in range(6):
        job = client.get(f"/v1/executions/{job_id}?wait=10").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _connection(client: httpx.Client, stack: Stack, name: str) -> None:
    template = client.post("/v1/templates", json={"name": name, "service_name": "Demo", "verbs": ["GET", "POST"]})
    assert template.status_code == 201, template.text
    connection = client.post("/v1/connections", json={
        "name": name, "template_id": template.json()["id"], "base_url": stack.upstream})
    assert connection.status_code == 201, connection.text


def test_readme_walkthrough_runs_and_stores_the_upstream_answer(stack: Stack) -> None:
    # Given the running stack, when the README's walk-through runs as written
    done = run_walkthrough(stack.api, stack.key, stack.upstream, stack.env)
    assert done.returncode == 0, done.stderr + done.stdout

    # Then its last command printed the finished job
    job = json.loads(done.stdout.strip().splitlines()[-1])
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    result = job["result"]
    assert result["status_code"] == 200
    assert result["headers"]["content-type"] == "application/json"
    assert result["headers"]["x-demo-upstream"] == "yes"
    assert result["truncated"] is False
    assert result["body_encoding"] == "utf-8"
    assert result["size"] == result["content_length"] == len(result["body"].encode())
    # and the body is the upstream's echo of exactly the request the walk-through defined
    echo = json.loads(result["body"])
    assert echo["method"] == "POST"
    assert echo["path"] == "/echo/hello"
    assert echo["query"] == {"lang": "en"}
    assert echo["headers"]["x-client-key"] == "walk-through-key"  # filled in from the secret
    assert job["secrets_used"] == ["client_key"]
    assert echo["headers"]["user-agent"].startswith("integration-hub/")
    assert echo["headers"]["content-type"] == "application/json"
    assert json.loads(echo["body"]) == {"greeting": "hello"}


def test_a_1mb_body_is_stored_as_its_first_32768_bytes(stack: Stack, client: httpx.Client) -> None:
    # Given a request for 1 MB from the upstream
    _connection(client, stack, "big")
    created = client.post("/v1/connections/big/requests", json={"name": "mb", "method": "GET", "url": "/bytes/1048576"})
    assert created.status_code == 201, created.text

    # When it is executed
    submitted = client.post("/v1/executions", json={"connection": "big", "request": "mb"})
    assert submitted.status_code == 202, submitted.text
    job = _wait_final(client, submitted.json()["id"])

    # Then the stored body is the first 32,768 bytes, flagged truncated
    assert job["status"] == "succeeded", job
    result = job["result"]
    pattern = "0123456789abcdef"
    assert result["truncated"] is True
    assert result["size"] == 32768
    assert result["content_length"] == 1048576
    assert result["body"] == (pattern * 2048)[:32768]


def test_a_redelivered_message_does_not_call_the_upstream_twice(stack: Stack, client: httpx.Client) -> None:
    # Given a job submitted through the API (one message on the queue)
    _connection(client, stack, "redeliver")
    created = client.post("/v1/connections/redeliver/requests",
                          json={"name": "once", "method": "GET", "url": "/echo/redelivery-probe"})
    assert created.status_code == 201, created.text
    submitted = client.post("/v1/executions", json={"connection": "redeliver", "request": "once"})
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]

    # When the broker delivers the same job twice more (as after a lost acknowledgement)
    app = create_app(Settings(_env_file=None, redis_url=stack.env["HUB_REDIS_URL"]))  # type: ignore[call-arg]
    enqueue = celery_enqueue(app)
    enqueue(job_id)
    enqueue(job_id)
    app.close()
    job = _wait_final(client, job_id)

    # Then the job ran once and the upstream saw exactly one call
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    # (both extra deliveries were consumed, and ignored, by the worker)
    ignored = f"job {job_id} not waiting; delivery ignored"
    wait_until(lambda: stack.worker_logs().count(ignored) == 2, "the extra deliveries", timeout=30)
    stats = httpx.get(f"{stack.upstream}/stats", timeout=5).json()
    assert stats["/echo/redelivery-probe"] == 1
