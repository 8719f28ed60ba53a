"""``Idempotency-Key`` on ``POST /v1/executions``: one key, one job, for 24 hours."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlmodel import Session

from models.base import utcnow
from models.tables import IdempotencyKey
from tests.api.helpers import assert_problem, list_all, make_connection, make_request, make_template


@pytest.fixture
def connection(api):
    connection = make_connection(api, make_template(api, verbs=["GET", "POST"]), name="svc",
                                 base_url="https://api.example.com")
    make_request(api, connection, name="create", method="POST", url="/things", body={"a": 1})
    return connection


def submit(api, key, tenant="a", **body):
    body = body or {"connection": "svc", "request": "create"}
    return api.client.post("/v1/executions", json=body, headers={**api.headers(tenant), "Idempotency-Key": key})


def test_the_same_key_and_body_give_back_the_first_job(api, connection):
    # Given a submission with a key
    first = submit(api, "k-1")
    assert first.status_code == 202
    # When the client sends it again (a retry after a timeout, say), keys in another order too
    again = api.client.post("/v1/executions", json={"request": "create", "connection": "svc"},
                            headers={**api.headers(), "Idempotency-Key": "k-1"})
    # Then it gets the first job with 200, and there is still one job, queued once
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert [job["id"] for job in list_all(api, "/v1/executions")] == [first.json()["id"]]
    assert api.queue.sent == [first.json()["id"]]


def test_the_same_key_with_another_body_is_refused(api, connection):
    assert submit(api, "k-2").status_code == 202
    response = submit(api, "k-2", connection="svc", request="create", variables={"x": "1"})
    assert_problem(response, 422, "idempotency_key_reused")
    assert len(list_all(api, "/v1/executions")) == 1


def test_keys_are_per_tenant(api, connection):
    # Given tenant b with a connection of the same name
    make_request(api, make_connection(api, make_template(api, "b", verbs=["POST"]), "b", name="svc",
                                      base_url="https://api.example.com"), "b", name="create", method="POST",
                 url="/things")
    # When both use the same key, then each gets a job of its own
    a, b = submit(api, "shared"), submit(api, "shared", tenant="b")
    assert (a.status_code, b.status_code) == (202, 202)
    assert a.json()["id"] != b.json()["id"]


def test_a_key_older_than_a_day_names_a_new_job(api, connection):
    first = submit(api, "k-old").json()
    with Session(api.engine) as session:
        session.execute(sa.update(IdempotencyKey).values(created_at=utcnow() - timedelta(hours=25)))
        session.commit()
    again = submit(api, "k-old")
    assert again.status_code == 202
    assert again.json()["id"] != first["id"]


@pytest.mark.parametrize("key", ["", "x" * 256, "a\tb"])
def test_a_malformed_key_is_refused(api, connection, key):
    response = submit(api, key)
    assert_problem(response, 422, "validation_error")
    assert api.queue.sent == []


def test_concurrent_submissions_with_one_key_make_one_job(api, connection):
    # Given ten clients sending the same submission with the same key at once
    barrier = threading.Barrier(10)
    answers: list[tuple[int, str]] = []

    def send() -> None:
        with TestClient(api.client.app) as client:
            barrier.wait(timeout=10)
            response = client.post("/v1/executions", json={"connection": "svc", "request": "create"},
                                   headers={**api.headers(), "Idempotency-Key": "race"})
            answers.append((response.status_code, response.json().get("id", response.text)))

    threads = [threading.Thread(target=send) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Then exactly one job exists, one answer was 202 and the rest 200, all naming that job
    assert sorted(status for status, _ in answers) == [200] * 9 + [202]
    assert len({job_id for _, job_id in answers}) == 1
    assert len(list_all(api, "/v1/executions")) == 1
