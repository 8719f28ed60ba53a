"""A canary secret, used through every endpoint by real processes, then looked for everywhere
it must never be: every API response, the API's and the worker's logs, every column of every
table, and every key and value in Redis (the broker's messages included)."""

from __future__ import annotations

import secrets as random_secrets
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.conftest import Stack
from tests.e2e.leaks import database_dump, found_in, redis_dump

pytestmark = pytest.mark.e2e


class Recorder:
    """An API client that keeps the text of every response."""

    def __init__(self, stack: Stack) -> None:
        self.client = httpx.Client(base_url=stack.api, headers=stack.headers(), timeout=20)
        self.seen: list[str] = []

    def __call__(self, method: str, path: str, expect: int, **kwargs: object) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)  # type: ignore[arg-type]
        self.seen.append(f"{method} {path} -> {response.status_code} {dict(response.headers)} {response.text}")
        assert response.status_code == expect, self.seen[-1]
        return response


@pytest.fixture
def call(stack: Stack) -> Iterator[Recorder]:
    recorder = Recorder(stack)
    yield recorder
    recorder.client.close()


def test_a_secret_value_appears_nowhere_but_in_the_request_to_its_service(stack: Stack, call: Recorder) -> None:
    canary = "CANARY-" + random_secrets.token_hex(12)
    # Given a template with a required auth header, and a connection that fills it from a secret
    template = call("POST", "/v1/templates", 201, json={
        "name": "canary", "service_name": "Canary", "verbs": ["GET", "POST"],
        "auth_headers": [{"name": "X-Client-Key", "required": True}]}).json()
    call("GET", "/v1/templates", 200)
    call("GET", f"/v1/templates/{template['id']}", 200)
    connection = call("POST", "/v1/connections", 201, json={
        "name": "canary", "template_id": template["id"], "base_url": stack.upstream,
        "auth_header_values": {"X-Client-Key": "{{secrets.client_key}}"}}).json()
    # When the secret is stored, replaced, listed, and a refused write tries to echo it
    call("PUT", "/v1/connections/canary/secrets/client_key", 204, json={"value": "first-" + canary})
    call("PUT", f"/v1/connections/{connection['id']}/secrets/client_key", 204, json={"value": canary})
    call("PUT", "/v1/connections/canary/secrets/spare", 204, json={"value": "spare-" + canary})
    call("PUT", "/v1/connections/canary/secrets/client_key", 422, json={"value": canary, "extra": canary})
    call("PUT", "/v1/connections/canary/secrets/1-bad-name", 422, json={"value": canary})
    call("GET", "/v1/connections/canary/secrets", 200)
    call("DELETE", "/v1/connections/canary/secrets/spare", 204)
    call("GET", "/v1/connections", 200)
    call("GET", "/v1/connections/canary", 200)
    call("PATCH", "/v1/connections/canary", 200, json={"description": "uses a canary"})
    # and requests that use it in a header, the query and the body run as jobs
    call("POST", "/v1/connections/canary/requests", 201, json={
        "name": "use", "method": "POST", "url": "/status/201",
        "headers": {"Authorization": "Bearer {{secrets.client_key}}"},
        "query": {"k": "{{secrets.client_key}}"}, "body": {"key": "{{secrets.client_key}}"}})
    call("POST", "/v1/connections/canary/requests", 201, json={
        "name": "missing", "method": "GET", "url": "/status/200", "headers": {"X-Other": "{{secrets.nope}}"}})
    call("GET", "/v1/connections/canary/requests", 200)
    call("GET", "/v1/connections/canary/requests/use", 200)
    call("PATCH", "/v1/connections/canary/requests/use", 200, json={"headers": {"X-Key": "{{secrets.client_key}}"}})
    jobs = [call("POST", "/v1/executions", 202, json={"connection": "canary", "request": name}).json()
            for name in ("use", "missing")]
    finished = [call("GET", f"/v1/executions/{job['id']}?wait=20", 200).json() for job in jobs]
    call("GET", "/v1/executions", 200)
    call("GET", "/v1/executions?connection=canary", 200)
    call("DELETE", "/v1/connections/canary/requests/missing", 204)
    call("DELETE", f"/v1/templates/{template['id']}", 204)

    # Then the jobs ran: one reached the service with the secret, one failed without it
    assert finished[0]["status"] == "succeeded", finished[0]
    assert finished[0]["result"]["status_code"] == 201
    assert finished[0]["secrets_used"] == ["client_key"]
    assert finished[1]["status"] == "failed"
    assert finished[1]["error"]["code"] == "secret_missing"
    # and the canary is in no response
    assert not [text for text in call.seen if canary in text]
    # no log line of the API, the worker or the upstream
    for log in ("api.log", "upstream.log"):
        assert canary not in (stack.logs / log).read_text(errors="replace"), log
    assert canary not in stack.worker_logs()
    # no column of any table
    assert found_in(canary, database_dump(stack.env["HUB_DATABASE_URL"])) == []
    # and no key or value in Redis, where the broker's messages live
    assert canary.encode() not in redis_dump(stack.env["HUB_REDIS_URL"])
