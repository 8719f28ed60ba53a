"""Running one job end to end in-process: the database (SQLite and PostgreSQL), a fake
resolver and ``httpx.MockTransport``. No DNS lookup and no socket is used."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from models import errors, jobs, secrets
from models.base import as_utc
from models.tables import Connection, Job, Request
from models.vault import Vault
from tests.conftest import TEST_MASTER_KEY, in_process_runtime, new_tenant, test_settings
from worker.executor import Runtime, run_job

PUBLIC_ADDRESS = "93.184.215.14"
TEMPLATE = {
    "service_name": "Example",
    "integration_method": "rest",
    "auth_type": "none",
    "auth_headers": [{"name": "X-Client-Key", "required": True, "default": None}],
    "verbs": ["GET", "POST"],
}


@dataclass
class Upstream:
    """The fake web service and fake DNS: records every request and lookup."""

    respond: Callable[[httpx.Request], httpx.Response] = lambda request: httpx.Response(
        200, headers={"Content-Type": "application/json"}, content=b'{"ok":true}'
    )
    addresses: list[str] = field(default_factory=lambda: [PUBLIC_ADDRESS])
    requests: list[httpx.Request] = field(default_factory=list)
    lookups: list[tuple[str, int]] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return self.addresses


@dataclass
class World:
    """A tenant with one connection and one request, and a way to run jobs against them."""

    engine: Engine
    database_url: str
    tenant_id: str
    connection_id: str
    request_id: str
    upstream: Upstream

    def runtime(self, **settings: Any) -> Runtime:
        values: dict[str, Any] = {"allow_private_destinations": False, "allow_http": False}
        values.update(settings)
        config = test_settings(self.database_url, **values)
        return in_process_runtime(config, self.engine, httpx.MockTransport(self.upstream.handler),
                                  self.upstream.resolve)

    def put_secret(self, name: str, value: str) -> None:
        with Session(self.engine) as session:
            secrets.put(session, Vault.from_setting(TEST_MASTER_KEY), tenant_id=self.tenant_id,
                        connection_id=self.connection_id, name=name, value=value)
            session.commit()

    def job(self, *, status: str = "queued", params: dict[str, Any] | None = None) -> str:
        with Session(self.engine) as session:
            job = Job(
                tenant_id=self.tenant_id,
                connection_id=self.connection_id,
                request_id=self.request_id,
                action="request",
                status=status,
                params=params or {"path_params": {}, "variables": {}},
                secrets_used=[],
            )
            session.add(job)
            session.commit()
            return job.id

    def load(self, job_id: str) -> Job:
        with Session(self.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def run(self, job_id: str, **settings: Any) -> Job:
        runtime = self.runtime(**settings)
        with runtime.client:
            run_job(job_id, runtime)
        return self.load(job_id)

    def change_request(self, **values: Any) -> None:
        with Session(self.engine) as session:
            request = session.get(Request, self.request_id)
            assert request is not None
            for name, value in values.items():
                setattr(request, name, value)
            session.add(request)
            session.commit()

    def change_connection(self, **values: Any) -> None:
        with Session(self.engine) as session:
            connection = session.get(Connection, self.connection_id)
            assert connection is not None
            for name, value in values.items():
                setattr(connection, name, value)
            session.add(connection)
            session.commit()


@pytest.fixture
def world(engine: Engine, database_url: str) -> Iterator[World]:
    tenant_id, _key = new_tenant(engine, "tenant-a")
    with Session(engine) as session:
        connection = Connection(
            tenant_id=tenant_id,
            name="example",
            base_url="https://api.example.com/v1",
            allowed_hosts=["api.example.com"],
            auth_header_values={"X-Client-Key": "ck-123"},
            template=dict(TEMPLATE),
        )
        session.add(connection)
        session.flush()
        request = Request(
            tenant_id=tenant_id,
            connection_id=connection.id,
            name="create-item",
            kind="studio",
            method="POST",
            url="/accounts/{account_id}/items",
            headers={"Accept": "application/json"},
            query={"since": "{{vars.since}}"},
            body={"name": "{{vars.name}}", "count": "{{vars.count}}"},
            media_type="application/json",
        )
        session.add(request)
        session.commit()
        ids = connection.id, request.id
    yield World(engine, database_url, tenant_id, ids[0], ids[1], Upstream())


PARAMS = {
    "path_params": {"account_id": "acc/1"},
    "variables": {"since": "2026-01-01", "name": 'say "hi" }', "count": 3},
}


def test_successful_job_stores_the_answer(world: World) -> None:
    # Given a queued job for a studio POST with path parameters and variables
    job_id = world.job(params=PARAMS)
    # When the worker runs it
    job = world.run(job_id)
    # Then the service got the rendered request, with the connection's auth header
    assert len(world.upstream.requests) == 1
    sent = world.upstream.requests[0]
    assert sent.method == "POST"
    assert sent.url.scheme == "https"
    assert sent.url.host == "api.example.com"
    assert sent.url.raw_path.split(b"?")[0] == b"/v1/accounts/acc%2F1/items"
    assert dict(sent.url.params) == {"since": "2026-01-01"}
    assert sent.headers["x-client-key"] == "ck-123"
    assert sent.headers["accept"] == "application/json"
    assert sent.headers["content-type"] == "application/json"
    assert json.loads(sent.content) == {"name": 'say "hi" }', "count": 3}
    # And the destination was checked for the host and port it went to
    assert world.upstream.lookups == [("api.example.com", 443)]
    # And the job succeeded once, with its times and the answer in the result format
    assert job.status == "succeeded"
    assert job.attempts == 1
    assert job.error is None
    started, finished = as_utc(job.started_at), as_utc(job.finished_at)
    assert started is not None and finished is not None
    assert started <= finished
    assert job.result is not None
    assert job.result["status_code"] == 200
    assert job.result["headers"] == {"content-type": "application/json", "content-length": "11"}
    assert job.result["body"] == '{"ok":true}'
    assert job.result["body_encoding"] == "utf-8"
    assert job.result["size"] == 11
    assert job.result["truncated"] is False
    assert job.result["content_length"] == 11
    assert isinstance(job.result["elapsed_ms"], (int, float))
    assert job.result["elapsed_ms"] >= 0


def test_redelivered_job_runs_once(world: World) -> None:
    # Given a queued job
    job_id = world.job(params=PARAMS)
    # When the same message is delivered twice
    world.run(job_id)
    job = world.run(job_id)
    # Then the service was called once, and the job counts one attempt
    assert len(world.upstream.requests) == 1
    assert job.status == "succeeded"
    assert job.attempts == 1


@pytest.mark.parametrize("status", ["cancelled", "running", "succeeded", "failed"])
def test_job_that_is_not_queued_is_left_alone(world: World, status: str) -> None:
    # Given a job that is no longer queued
    job_id = world.job(status=status, params=PARAMS)
    # When a delivery of it reaches the worker
    job = world.run(job_id)
    # Then nothing is sent and the row is unchanged
    assert world.upstream.requests == []
    assert job.status == status
    assert job.attempts == 0
    assert job.started_at is None
    assert job.result is None and job.error is None


def test_server_error_answer_is_still_a_success(world: World) -> None:
    # Given a service that answers 500
    world.upstream.respond = lambda request: httpx.Response(500, text="boom")
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then the job succeeded (the service answered) and the 500 is in the result
    assert job.status == "succeeded"
    assert job.result is not None
    assert job.result["status_code"] == 500
    assert job.result["body"] == "boom"
    assert job.error is None


def _failed(job: Job, code: str) -> None:
    assert job.status == "failed"
    assert job.result is None
    assert job.error is not None
    assert job.error["code"] == code
    assert isinstance(job.error["message"], str) and job.error["message"]
    assert job.attempts == 1
    assert job.finished_at is not None


def test_connection_refused_fails_the_job(world: World) -> None:
    # Given a service that cannot be connected to
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    world.upstream.respond = refuse
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it failed with connection_refused
    _failed(job, "connection_refused")


def test_host_resolving_to_a_private_address_is_blocked(world: World) -> None:
    # Given an allowed host that resolves to a private address, and the default guard
    world.upstream.addresses = ["10.0.0.7"]
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id, allow_private_destinations=False)
    # Then it failed with blocked_destination, and the service was never called
    _failed(job, "blocked_destination")
    assert world.upstream.lookups == [("api.example.com", 443)]
    assert world.upstream.requests == []


def test_host_resolving_to_cloud_metadata_among_public_is_blocked(world: World) -> None:
    # Given a host whose addresses include the cloud metadata address
    world.upstream.addresses = [PUBLIC_ADDRESS, "169.254.169.254"]
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it is blocked and nothing is sent
    _failed(job, "blocked_destination")
    assert world.upstream.requests == []


def test_host_not_in_allowed_hosts_is_blocked(world: World) -> None:
    # Given a request aimed at a host the connection does not allow
    world.change_request(url="https://elsewhere.example.net/collect")
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it is blocked and the connection's auth header never leaves the hub
    _failed(job, "blocked_destination")
    assert world.upstream.requests == []


def test_path_parameter_cannot_change_the_host(world: World) -> None:
    # Given a request whose host part comes from a path parameter
    world.change_request(url="https://{tenant}.example.com/x", body=None, query={})
    job_id = world.job(params={"path_params": {"tenant": "api.example.com@evil"}, "variables": {}})
    # When the job runs
    job = world.run(job_id)
    # Then the encoded value does not reach an allowed host, and nothing is sent
    assert job.status == "failed"
    assert world.upstream.requests == []


def test_http_url_fails_when_only_https_is_allowed(world: World) -> None:
    # Given an https-only hub and a request with an http URL to an allowed host
    world.change_request(url="http://api.example.com/v1/items")
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id, allow_http=False)
    # Then it failed before anything was sent
    assert job.status == "failed"
    assert job.error is not None
    assert job.error["code"] in {"blocked_destination", "scheme_not_allowed"}
    assert world.upstream.requests == []


def test_http_url_runs_when_http_is_allowed(world: World) -> None:
    # Given a hub that allows http, and an http URL to an allowed host
    world.change_request(url="http://api.example.com/v1/items")
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id, allow_http=True)
    # Then it went out over http to port 80
    assert job.status == "succeeded"
    assert str(world.upstream.requests[0].url).startswith("http://api.example.com/v1/items")
    assert world.upstream.lookups == [("api.example.com", 80)]


def test_deleted_request_fails_with_reference_gone(world: World) -> None:
    # Given a queued job whose request was deleted after submission
    job_id = world.job(params=PARAMS)
    with Session(world.engine) as session:
        request = session.get(Request, world.request_id)
        session.delete(request)
        session.commit()
    # When the job runs
    job = world.run(job_id)
    # Then it failed with reference_gone and nothing was sent
    _failed(job, "reference_gone")
    assert world.upstream.requests == []


def test_deleted_connection_fails_with_reference_gone(world: World) -> None:
    # Given a queued job whose connection (and so its requests) was deleted
    job_id = world.job(params=PARAMS)
    with Session(world.engine) as session:
        session.delete(session.get(Request, world.request_id))
        session.delete(session.get(Connection, world.connection_id))
        session.commit()
    # When the job runs
    job = world.run(job_id)
    # Then it failed with reference_gone
    _failed(job, "reference_gone")
    assert world.upstream.requests == []


def test_unresolved_secret_fails_with_secret_missing(world: World) -> None:
    # Given a request with a secret reference in a header
    world.change_request(headers={"Authorization": "Bearer {{secrets.api_token}}"})
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it failed with secret_missing and nothing was sent
    _failed(job, "secret_missing")
    assert world.upstream.requests == []


def test_variable_missing_at_run_time_fails_with_missing_variable(world: World) -> None:
    # Given a job whose request gained a variable after the job was submitted
    job_id = world.job(params=PARAMS)
    world.change_request(headers={"X-Extra": "{{vars.added_later}}"})
    # When the job runs
    job = world.run(job_id)
    # Then it failed with missing_variable and nothing was sent
    _failed(job, "missing_variable")
    assert world.upstream.requests == []


def test_verb_the_template_does_not_allow_fails(world: World) -> None:
    # Given a request whose method the connection's template does not allow
    world.change_request(method="DELETE", body=None)
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it failed with verb_not_allowed and nothing was sent
    _failed(job, "verb_not_allowed")
    assert world.upstream.requests == []


def test_unexpected_exception_fails_with_a_generic_message(world: World) -> None:
    # Given a fault inside the hub whose text must not reach the job
    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("internal detail: password=hunter2")

    world.upstream.respond = explode
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it failed with internal_error and the generic message only
    _failed(job, "internal_error")
    assert job.error == {"code": "internal_error", "message": errors.HubError().message}
    assert "hunter2" not in json.dumps(job.error)


def test_secrets_fill_url_headers_query_body_and_auth_headers(world: World) -> None:
    # Given secrets of the connection, referenced everywhere a request can refer to them
    world.put_secret("api_token", "tok/en 1")
    world.put_secret("client_key", "ck-9")
    with Session(world.engine) as session:
        connection = session.get(Connection, world.connection_id)
        assert connection is not None
        connection.auth_header_values = {"X-Client-Key": "{{secrets.client_key}}"}
        session.add(connection)
        session.commit()
    world.change_request(
        method="POST",
        url="/items/{{secrets.api_token}}",
        headers={"Authorization": "Bearer {{secrets.api_token}}"},
        query={"key": "{{secrets.client_key}}"},
        body={"token": "{{secrets.api_token}}", "note": "key={{secrets.client_key}}"},
        media_type="application/json",
    )
    # When a job runs
    job = world.run(world.job(params=PARAMS))
    # Then the service got every value in place, the URL's percent-encoded
    assert job.status == "succeeded", job.error
    sent = world.upstream.requests[0]
    assert sent.url.raw_path.decode().startswith("/v1/items/tok%2Fen%201")
    assert sent.headers["authorization"] == "Bearer tok/en 1"
    assert sent.headers["x-client-key"] == "ck-9"
    assert sent.url.params["key"] == "ck-9"
    assert json.loads(sent.content) == {"token": "tok/en 1", "note": "key=ck-9"}
    # and the job names the secrets it read, without their values
    assert job.secrets_used == ["api_token", "client_key"]
    assert "tok/en 1" not in json.dumps(job.result) + json.dumps(job.secrets_used)


def test_a_variable_cannot_expand_a_secret(world: World) -> None:
    # Given a secret, and a studio request that echoes a caller's variable in its body
    world.put_secret("api_token", "s3cr3t-value")
    world.change_request(method="POST", kind="studio", body={"echo": "{{vars.text}}", "n": "{{vars.text}}!"},
                         media_type="application/json")
    # When a caller passes a secret placeholder as the variable's value
    variables = {**PARAMS["variables"], "text": "{{secrets.api_token}}"}
    job = world.run(world.job(params={"path_params": PARAMS["path_params"], "variables": variables}))
    # Then the placeholder is sent as plain text: the secret was neither read nor sent
    assert job.status == "succeeded", job.error
    sent = world.upstream.requests[0]
    assert json.loads(sent.content) == {"echo": "{{secrets.api_token}}", "n": "{{secrets.api_token}}!"}
    assert b"s3cr3t-value" not in sent.content
    assert job.secrets_used == []


def test_a_secret_of_another_connection_is_missing(world: World) -> None:
    # Given a secret stored on another connection of the same tenant
    with Session(world.engine) as session:
        other = Connection(tenant_id=world.tenant_id, name="other", allowed_hosts=[], auth_header_values={},
                           template={"service_name": "s", "integration_method": "rest", "auth_type": "none",
                                     "auth_headers": [], "verbs": ["GET"]})
        session.add(other)
        session.commit()
        secrets.put(session, Vault.from_setting(TEST_MASTER_KEY), tenant_id=world.tenant_id,
                    connection_id=other.id, name="api_token", value="not-yours")
        session.commit()
    world.change_request(headers={"Authorization": "Bearer {{secrets.api_token}}"})
    # When this connection's request refers to that name
    job = world.run(world.job(params=PARAMS))
    # Then the job fails with secret_missing, and nothing was sent
    _failed(job, "secret_missing")
    assert world.upstream.requests == []
    assert job.secrets_used == ["api_token"]


def test_the_submissions_idempotency_key_is_forwarded(world: World) -> None:
    # Given a job submitted with an Idempotency-Key
    job = world.run(world.job(params={**PARAMS, "idempotency_key": "order-42"}))
    # Then the service received the same key, so it can drop a repeat too
    assert job.status == "succeeded", job.error
    assert world.upstream.requests[0].headers["idempotency-key"] == "order-42"


def _database_down(*_: object, **__: object) -> None:
    """A database that went away mid-job: the driver's text quotes the statement and a value."""
    raise OperationalError("UPDATE job SET result=%(result)s", {"result": "body-7f3a"},
                           Exception("server closed the connection unexpectedly"))


def test_an_answer_the_database_cannot_take_leaves_the_job_to_its_lease(
        world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Given a database that goes down while the job's call is out
    monkeypatch.setattr(jobs, "finish", _database_down)
    job_id = world.job(params=PARAMS)
    # When the job runs, the service answers, and its outcome cannot be recorded
    with caplog.at_level(logging.INFO, logger="hub.worker"):
        job = world.run(job_id)
    # Then the task ends without raising: the job stays running under its lease, for the
    # sweeper to take back once it is past
    assert len(world.upstream.requests) == 1
    assert (job.status, job.attempts, job.error) == ("running", 1, None)
    assert job.lease_until is not None
    # and the worker logged one warning with the error's type, not its text
    (warning,) = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert warning.getMessage() == (f"job {job_id} stopped: the database is unavailable; the sweeper will take it up "
                                    "code=OperationalError")
    assert warning.exc_info is None
    assert "body-7f3a" not in caplog.text and "server closed" not in caplog.text


def test_a_database_error_during_the_job_is_not_the_jobs_failure(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a database connection that breaks as the job reads its secrets, before the call
    monkeypatch.setattr(secrets, "open_secrets", _database_down)
    job_id = world.job(params=PARAMS)
    # When the job runs
    job = world.run(job_id)
    # Then it is not failed internal_error: it stays running under its lease, to run again
    assert world.upstream.requests == []
    assert (job.status, job.attempts, job.error) == ("running", 1, None)
