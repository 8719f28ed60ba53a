"""``GET /v1/executions/{id}?wait=N`` must not hold a database connection while it waits: with
more waiting requests than the pool has connections, other requests still get one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from api_shim.app import create_app
from models.migrate import upgrade
from tests.api.helpers import make_connection, make_request
from tests.conftest import Api, RecordingQueue, new_tenant, test_settings


@pytest.mark.timeout(60)
def test_waiting_requests_leave_the_pool_to_others(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    # One connection, and a short wait for it: a request that cannot get one fails fast.
    engine = sa.create_engine(url, pool_size=1, max_overflow=0, pool_timeout=1,
                              connect_args={"check_same_thread": False})
    queue = RecordingQueue()
    app = create_app(test_settings(url), engine=engine, enqueue=queue)
    tenant_a, key_a = new_tenant(engine, "tenant-a")
    tenant_b, key_b = new_tenant(engine, "tenant-b")
    with TestClient(app, raise_server_exceptions=False) as client:
        api = Api(client, queue, engine, tenant_a, key_a, tenant_b, key_b)
        connection = make_connection(api)
        make_request(api, connection, name="list")
        body = {"connection": connection["id"], "request": "list"}
        job = client.post("/v1/executions", json=body, headers=api.headers()).json()  # no worker: stays queued

        answers: list[Any] = []

        def wait() -> None:
            answers.append(client.get(f"/v1/executions/{job['id']}", params={"wait": 3}, headers=api.headers()))

        waiting = [threading.Thread(target=wait) for _ in range(3)]
        for thread in waiting:
            thread.start()
        started = threading.Event()
        threading.Timer(0.7, started.set).start()
        started.wait()
        # Three requests wait for the job meanwhile; a submission still gets the connection.
        submitted = client.post("/v1/executions", json=body, headers=api.headers())
        for thread in waiting:
            thread.join(10)
    assert submitted.status_code == 202, submitted.text
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert {answer.json()["status"] for answer in answers} == {"queued"}
    engine.dispose()
