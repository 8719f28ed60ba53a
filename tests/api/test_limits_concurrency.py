"""The limits hold when creations race: 50 connections per tenant, 50 requests per connection;
and other racing writes (same name, same secret) answer as the contract says.

Each racing call has its own ``TestClient`` (its own event loop and worker threads), so the
calls reach the database at the same time; a barrier releases them together. Every wait is
bounded, so a lock that is never released fails the test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from tests.api.helpers import (
    assert_problem,
    connection_body,
    list_all,
    make_connection,
    make_request,
    make_template,
    request_body,
)

RACE_TIMEOUT_S = 45.0
"""Longest a whole race may take; the barrier gets a part of it to gather the threads."""


@dataclass
class Call:
    """One call of a race (a ``POST`` unless told)."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    method: str = "POST"


def race(app: FastAPI, calls: list[Call]) -> list[httpx.Response]:
    """The responses to ``calls``, each sent from its own thread and client, all at once."""
    barrier = threading.Barrier(len(calls), timeout=RACE_TIMEOUT_S / 2)

    def send(call: Call) -> httpx.Response:
        with TestClient(app, raise_server_exceptions=False) as client:
            barrier.wait()
            return client.request(call.method, call.path, json=call.body, headers=call.headers)

    pool = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="race")
    try:
        futures = [pool.submit(send, call) for call in calls]
        _done, pending = wait(futures, timeout=RACE_TIMEOUT_S)
        assert not pending, f"{len(pending)} of {len(calls)} calls did not answer within {RACE_TIMEOUT_S} s"
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    """How many responses had each status code."""
    return Counter(response.status_code for response in responses)


def count_rows(engine: Engine, table_name: str, **where: str) -> int:
    """How many rows of ``table_name`` match ``where``, read with SQLAlchemy Core."""
    table = sa.Table(table_name, sa.MetaData(), autoload_with=engine)
    statement = sa.select(sa.func.count()).select_from(table)
    for column, value in where.items():
        statement = statement.where(table.c[column] == value)
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def test_the_connection_limit_holds_under_concurrent_creation(api):
    # Given: tenant a has 45 connections, tenant b none
    template_a = make_template(api, "a")
    template_b = make_template(api, "b")
    for i in range(45):
        make_connection(api, template_a, name=f"existing-{i:02d}")
    # When: tenant a makes 20 more at once, while tenant b makes 10
    calls_a = [
        Call("/v1/connections", connection_body(template_a["id"], name=f"racing-{i:02d}"), api.headers("a"))
        for i in range(20)
    ]
    calls_b = [
        Call("/v1/connections", connection_body(template_b["id"], name=f"theirs-{i:02d}"), api.headers("b"))
        for i in range(10)
    ]
    responses = race(api.client.app, calls_a + calls_b)
    answers_a, answers_b = responses[:20], responses[20:]
    # Then: exactly 5 of tenant a's were created, and 15 refused with connection_limit_reached
    assert statuses(answers_a) == {201: 5, 409: 15}, [r.text for r in answers_a if r.status_code not in (201, 409)]
    for response in answers_a:
        if response.status_code == 409:
            assert_problem(response, 409, "connection_limit_reached")
    # And: tenant a has exactly 50 connections, in the database and in its list
    assert count_rows(api.engine, "connection", tenant_id=api.tenant_a) == 50
    listed = {item["name"] for item in list_all(api, "/v1/connections", "a", limit=200)}
    assert len(listed) == 50
    assert listed >= {f"existing-{i:02d}" for i in range(45)}
    assert listed - {f"existing-{i:02d}" for i in range(45)} == {
        r.json()["name"] for r in answers_a if r.status_code == 201
    }
    # And: the limit is per tenant: all of tenant b's were created, and b can still make more
    assert statuses(answers_b) == {201: 10}, [r.text for r in answers_b if r.status_code != 201]
    make_connection(api, template_b, tenant="b", name="one-more")
    assert count_rows(api.engine, "connection", tenant_id=api.tenant_b) == 11
    # And: tenant a, full, is still refused one more
    more = api.client.post(
        "/v1/connections", json=connection_body(template_a["id"], name="late"), headers=api.headers("a")
    )
    assert_problem(more, 409, "connection_limit_reached")


def test_the_request_limit_holds_under_concurrent_creation(api):
    # Given: a connection with 45 requests, and another connection of the same tenant with none
    template = make_template(api)
    full = make_connection(api, template, name="full")
    other = make_connection(api, template, name="other")
    for i in range(45):
        make_request(api, full, name=f"existing-{i:02d}")
    # When: 20 more are added to the first at once, while 5 are added to the other
    calls_full = [
        Call(f"/v1/connections/{full['id']}/requests", request_body(name=f"racing-{i:02d}"), api.headers())
        for i in range(20)
    ]
    calls_other = [
        Call(f"/v1/connections/{other['id']}/requests", request_body(name=f"racing-{i:02d}"), api.headers())
        for i in range(5)
    ]
    responses = race(api.client.app, calls_full + calls_other)
    answers_full, answers_other = responses[:20], responses[20:]
    # Then: exactly 5 were added to the first, and 15 refused with request_limit_reached
    assert statuses(answers_full) == {201: 5, 409: 15}, [
        r.text for r in answers_full if r.status_code not in (201, 409)
    ]
    for response in answers_full:
        if response.status_code == 409:
            assert_problem(response, 409, "request_limit_reached")
    # And: the first connection has exactly 50 requests, in the database and in its list
    assert count_rows(api.engine, "request", connection_id=full["id"]) == 50
    assert len(list_all(api, f"/v1/connections/{full['id']}/requests", limit=200)) == 50
    # And: the limit is per connection: every request for the other connection was added
    assert statuses(answers_other) == {201: 5}, [r.text for r in answers_other if r.status_code != 201]
    assert count_rows(api.engine, "request", connection_id=other["id"]) == 5


def test_tenant_b_can_create_while_tenant_a_is_full(api):
    # Given: tenant a has 50 connections
    template_a = make_template(api, "a")
    for i in range(50):
        make_connection(api, template_a, name=f"conn-{i:02d}")
    refused = api.client.post(
        "/v1/connections", json=connection_body(template_a["id"], name="conn-50"), headers=api.headers("a")
    )
    assert_problem(refused, 409, "connection_limit_reached")
    # When: tenant b makes connections, some at the same time as tenant a tries again
    template_b = make_template(api, "b")
    calls = [
        Call("/v1/connections", connection_body(template_b["id"], name=f"conn-{i:02d}"), api.headers("b"))
        for i in range(5)
    ] + [
        Call("/v1/connections", connection_body(template_a["id"], name=f"late-{i:02d}"), api.headers("a"))
        for i in range(5)
    ]
    responses = race(api.client.app, calls)
    # Then: every one of tenant b's is created, with the same names tenant a uses, and a's are refused
    assert statuses(responses[:5]) == {201: 5}, [r.text for r in responses[:5]]
    for response in responses[5:]:
        assert_problem(response, 409, "connection_limit_reached")
    assert count_rows(api.engine, "connection", tenant_id=api.tenant_b) == 5
    assert count_rows(api.engine, "connection", tenant_id=api.tenant_a) == 50


def test_racing_creations_with_one_name_make_one_connection(api):
    # Given: a template
    template = make_template(api)
    # When: ten connections with the same name are made at once
    body = connection_body(template["id"], name="sfdc-prod")
    calls = [Call("/v1/connections", body, api.headers()) for _ in range(10)]
    responses = race(api.client.app, calls)
    # Then: one is created; the other nine are 409 name_taken
    assert statuses(responses) == {201: 1, 409: 9}, [r.text for r in responses if r.status_code not in (201, 409)]
    for response in responses:
        if response.status_code == 409:
            assert_problem(response, 409, "name_taken")
    assert count_rows(api.engine, "connection", tenant_id=api.tenant_a, name="sfdc-prod") == 1


def test_racing_puts_of_one_new_secret_all_succeed(api):
    # Given: a connection
    connection = make_connection(api)
    answers: list[httpx.Response] = []
    for round_ in range(5):  # a race is not certain to interleave on one try
        name = f"token_{round_}"
        # When: twelve clients put the same new secret at once (PUT creates or replaces)
        calls = [
            Call(f"/v1/connections/{connection['id']}/secrets/{name}", {"value": f"value-{i}"}, api.headers(), "PUT")
            for i in range(12)
        ]
        answers += race(api.client.app, calls)
        # Then: the secret exists once
        assert count_rows(api.engine, "secret", connection_id=connection["id"], name=name) == 1
    # And: every put was answered 204, as a put of an existing secret would be
    assert statuses(answers) == {204: len(answers)}, [r.text for r in answers if r.status_code != 204][:3]
