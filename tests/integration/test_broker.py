"""The queue: what a task message carries (on fakeredis and on a real Redis), and what happens
when the broker or Redis is down."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from unittest import mock

import fakeredis
import kombu.transport.redis as kombu_redis
import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from api_shim.app import create_app as create_api
from api_shim.queue import celery_enqueue
from models.errors import BrokerUnavailable
from tests.conftest import new_tenant, test_settings
from worker.celery_app import create_app
from worker.sweeper import Senders, sweep

CLOSED = "redis://127.0.0.1:1/0"  # nothing listens on port 1 of loopback


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[Celery, redis.Redis]]:
    """A Celery app with a queue of its own, and a client of its broker: fakeredis, then real Redis."""
    queue = f"hub.test.{uuid.uuid4().hex}"
    if request.param == "fakeredis":
        with mock.patch.object(kombu_redis.Channel, "connection_class", fakeredis.FakeRedisConnection):
            app = create_app(test_settings("sqlite://", redis_url="redis://fake-broker:6379/0", queue_name=queue))
            # fakeredis answers kombu's periodic health-check PING differently from a server
            app.conf.broker_transport_options = {**app.conf.broker_transport_options, "health_check_interval": 0}
            client = fakeredis.FakeRedis(host="fake-broker", port=6379, db=0)
            yield app, client
    else:
        url = request.getfixturevalue("redis_url")
        app = create_app(test_settings("sqlite://", redis_url=url, queue_name=queue))
        client = redis.Redis.from_url(url)
        yield app, client
    client.delete(queue)
    client.close()
    app.close()


def test_a_task_message_carries_the_job_id_and_nothing_else(broker: tuple[Celery, redis.Redis]) -> None:
    app, client = broker
    # Given the API's way of queueing a job, when it queues one
    celery_enqueue(app)("0194-job-id")

    # Then the one message on the queue names the execute task and its only argument is the id
    raw = client.lrange(app.conf.task_default_queue, 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["task"] == "hub.execute"
    assert args == ["0194-job-id"]
    assert kwargs == {}


def test_an_unreachable_broker_is_broker_unavailable() -> None:
    # Given a Celery app whose broker does not answer
    app = create_app(test_settings("sqlite://", redis_url=CLOSED))
    # When a job is queued, then the API's error says the broker is unavailable
    with pytest.raises(BrokerUnavailable):
        celery_enqueue(app)("some-job")
    app.close()


def test_readyz_reports_redis_and_database(engine: Engine, database_url: str, redis_url: str) -> None:
    # Given the API on the real database and Redis, then it is ready
    up = create_api(test_settings(database_url, redis_url=redis_url), engine=engine)
    with TestClient(up) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "broker": "ok"}

    # Given Redis down, then it is not ready, and says what is missing
    down = create_api(test_settings(database_url, redis_url=CLOSED), engine=engine)
    with TestClient(down) as client:
        not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.headers["content-type"] == "application/problem+json"
    body = not_ready.json()
    assert body["code"] == "not_ready"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["redis"].startswith("unavailable")


@pytest.mark.integration
def test_a_job_submitted_while_the_broker_is_down_is_sent_by_the_sweeper_when_it_is_back(
    engine: Engine, database_url: str, redis_url: str
) -> None:
    # Given the API with the real Celery sender and a broker that does not answer
    settings = test_settings(database_url, redis_url=CLOSED)
    app = create_api(settings, engine=engine, enqueue=celery_enqueue(create_app(settings)))
    _tenant, key = new_tenant(engine, "queue-down")
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as client:
        template = client.post("/v1/templates", headers=auth, json={"name": "t", "service_name": "s", "verbs": ["GET"]})
        client.post("/v1/connections", headers=auth,
                    json={"name": "c", "template_id": template.json()["id"], "base_url": "http://127.0.0.1:9"})
        client.post("/v1/connections/c/requests", headers=auth, json={"name": "r", "method": "GET", "url": "/x"})
        # When a job is submitted
        submitted = client.post("/v1/executions", headers=auth, json={"connection": "c", "request": "r"})
        # Then the caller gets a 202 and the job is stored, waiting, not failed and not lost
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        assert [job["id"] for job in client.get("/v1/executions?status=queued", headers=auth).json()["items"]] == [job_id]

    # When the broker is back (a real Redis) and the sweeper runs
    queue = f"hub.test.{uuid.uuid4().hex}"
    live = create_app(test_settings(database_url, redis_url=redis_url, queue_name=queue))
    send = celery_enqueue(live)
    report = sweep(engine, settings, Senders(dispatch=send, notify=send))
    # Then the job's id is on the queue, once
    broker = redis.Redis.from_url(redis_url)
    try:
        raw = broker.lrange(queue, 0, -1)
        assert report.redispatched == 1
        assert [json.loads(base64.b64decode(json.loads(m)["body"]))[0] for m in raw] == [[job_id]]
    finally:
        broker.delete(queue)
        broker.close()
        live.close()
