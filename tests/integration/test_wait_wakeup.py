"""``?wait=N`` is woken by the worker's announcement that the job is final, not by polling."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api_shim import waiters
from api_shim.app import create_app
from models import jobs, metrics
from models.jobs import JobStatus
from tests.conftest import RecordingQueue, new_tenant, test_settings

pytestmark = pytest.mark.integration


def test_a_waiting_request_answers_when_the_worker_announces_the_job(
    engine: Engine, database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an API on real Redis whose waiting requests would read the job again only after 60 s
    monkeypatch.setattr(waiters, "RECHECK_S", 60.0)
    app = create_app(test_settings(database_url, redis_url=redis_url), engine=engine, enqueue=RecordingQueue())
    _tenant, key = new_tenant(engine, "waiting")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        template = client.post("/v1/templates", headers=auth, json={"name": "t", "service_name": "s", "verbs": ["GET"]})
        client.post("/v1/connections", headers=auth,
                    json={"name": "c", "template_id": template.json()["id"], "base_url": "https://api.example.com"})
        client.post("/v1/connections/c/requests", headers=auth, json={"name": "r", "method": "GET", "url": "/x"})
        job_id = client.post("/v1/executions", headers=auth, json={"connection": "c", "request": "r"}).json()["id"]
        for _ in range(50):  # the listener subscribes when the app starts
            if app.state.waiters.listening:
                break
            time.sleep(0.1)
        assert app.state.waiters.listening

        def worker() -> None:  # finishes the job a moment later and announces it, as a worker does
            time.sleep(0.5)
            with Session(engine) as session:
                assert jobs.claim(session, job_id, lease_s=60) == 1
                jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, attempt=1)
            batch = metrics.Batch(redis.Redis.from_url(redis_url))
            batch.announce(job_id)
            batch.flush()

        thread = threading.Thread(target=worker)
        thread.start()
        # When the client waits up to 20 s
        started = time.monotonic()
        answer = client.get(f"/v1/executions/{job_id}", params={"wait": 20}, headers=auth)
        held = time.monotonic() - started
        thread.join()
    # Then it got the finished job long before the 20 s ran out: only the announcement could wake
    # it (not a test of speed: without it, the request is held the whole 20 s)
    assert answer.status_code == 200
    assert answer.json()["status"] == "succeeded"
    assert held < 10, held
