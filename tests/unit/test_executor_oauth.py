"""Jobs of OAuth 2.0 connections, end to end in-process, on SQLite and PostgreSQL.

One ``httpx.MockTransport`` plays both the token endpoint (``login.example.com``) and the web
service (``api.example.com``); a fake resolver answers a public documentation address, so the
guard runs as in production and nothing leaves the process. Workers of one test share one
fakeredis token cache, as workers share Redis.

The end of the file submits auth executions through the HTTP API.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl

import fakeredis
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import secrets
from models.schemas import OAuth2Settings
from models.tables import Connection, Job, Request
from models.vault import Vault
from tests.api.helpers import assert_problem, connection_body, error_locs, make_connection, make_template
from tests.conftest import TEST_MASTER_KEY, Api, in_process_runtime, new_tenant, test_settings
from worker.executor import Runtime, run_job

PUBLIC_ADDRESS = "93.184.216.34"
TOKEN_HOST = "login.example.com"
SERVICE_HOST = "api.example.com"
TOKEN_URL = f"https://{TOKEN_HOST}/token"
CLIENT_SECRET = "cs-VALUE-9b8a7c"
OLD_REFRESH_TOKEN = "rt-OLD-1f2e3d"

TEMPLATE = {
    "service_name": "Example",
    "integration_method": "rest",
    "auth_type": "oauth2",
    "auth_headers": [],
    "verbs": ["GET", "POST"],
}
OAUTH2: dict[str, Any] = {
    **{name: None for name in OAuth2Settings.model_fields},
    "grant_type": "client_credentials",
    "token_url": TOKEN_URL,
    "client_id": "cid",
    "client_secret": "{{secrets.client_secret}}",
    "client_auth_method": "client_secret_post",
    "scope": "api",
    "audience": None,
    "extra_params": {},
}
RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

Responder = Callable[[httpx.Request], httpx.Response]


def ok_json(document: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, headers={"Content-Type": "application/json"}, content=json.dumps(document).encode())


@dataclass
class Remote:
    """The token endpoint and the web service behind one mock transport, and a fake DNS."""

    token_answers: list[Responder] = field(default_factory=list)
    """Answers the token endpoint gives in turn; once used up, it grants ``tok-N``."""
    refused_tokens: set[str] = field(default_factory=set)
    """Access tokens the service answers 401 to."""
    token_requests: list[httpx.Request] = field(default_factory=list)
    service_requests: list[httpx.Request] = field(default_factory=list)
    lookups: list[tuple[str, int]] = field(default_factory=list)
    addresses: dict[str, list[str]] = field(default_factory=dict)
    rotate_refresh_token: bool = False

    def handler(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == TOKEN_HOST and request.url.path == "/token":
            self.token_requests.append(request)
            if self.token_answers:
                return self.token_answers.pop(0)(request)
            return self.grant(request)
        if request.url.host == SERVICE_HOST:
            self.service_requests.append(request)
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if bearer in self.refused_tokens:
                return ok_json({"error": "invalid_token"}, 401)
            return ok_json({"items": []})
        return httpx.Response(404)

    def grant(self, request: httpx.Request) -> httpx.Response:
        number = len(self.token_requests)
        document: dict[str, Any] = {"access_token": f"tok-{number}", "token_type": "Bearer",
                                    "expires_in": 3600, "scope": "api"}
        if self.rotate_refresh_token:
            document["refresh_token"] = f"rt-NEW-{number}"
        return ok_json(document)

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return self.addresses.get(host, [PUBLIC_ADDRESS])

    def token_forms(self) -> list[dict[str, str]]:
        """The form bodies of the token requests, in order."""
        return [dict(parse_qsl(request.content.decode(), keep_blank_values=True)) for request in self.token_requests]

    def bearers(self) -> list[str]:
        """The Authorization header of each service call, in order."""
        return [request.headers.get("authorization", "") for request in self.service_requests]


@dataclass
class Hub:
    """A tenant with an OAuth 2.0 connection and a stored GET /items, and workers to run jobs."""

    engine: Engine
    database_url: str
    tenant_id: str
    connection_id: str
    request_id: str
    remote: Remote
    redis: fakeredis.FakeRedis
    vault: Vault = field(default_factory=lambda: Vault.from_setting(TEST_MASTER_KEY))

    def runtime(self, **settings: Any) -> Runtime:
        values: dict[str, Any] = {"allow_private_destinations": False, "allow_http": False, "token_backoff_s": 0.01}
        values.update(settings)
        config = test_settings(self.database_url, **values)
        return in_process_runtime(config, self.engine, httpx.MockTransport(self.remote.handler),
                                  self.remote.resolve, redis_client=self.redis)

    def run(self, job_id: str, **settings: Any) -> Job:
        """Run the job in a fresh worker (sharing this hub's token cache); the job row after."""
        runtime = self.runtime(**settings)
        with runtime.client:
            run_job(job_id, runtime)
        return self.load(job_id)

    def job(self, *, action: str = "request") -> str:
        with Session(self.engine) as session:
            job = Job(
                tenant_id=self.tenant_id,
                connection_id=self.connection_id,
                request_id=self.request_id if action == "request" else None,
                action=action,
                status="queued",
                params={"path_params": {}, "variables": {}} if action == "request" else {},
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

    def put_secret(self, name: str, value: str) -> None:
        with Session(self.engine) as session:
            secrets.put(session, self.vault, tenant_id=self.tenant_id, connection_id=self.connection_id,
                        name=name, value=value)
            session.commit()

    def secret(self, name: str) -> str:
        with Session(self.engine) as session:
            return secrets.open_secrets(session, self.vault, tenant_id=self.tenant_id,
                                        connection_id=self.connection_id, names=[name])[name]

    def change_connection(self, **values: Any) -> None:
        with Session(self.engine) as session:
            connection = session.get(Connection, self.connection_id)
            assert connection is not None
            for name, value in values.items():
                setattr(connection, name, value)
            session.add(connection)
            session.commit()

    def new_version(self) -> None:
        """What a change of the connection does: its version moves, so its cached token is unused."""
        with Session(self.engine) as session:
            connection = session.get(Connection, self.connection_id)
            assert connection is not None
            self.change_connection(version=connection.version + 1)

    def change_request(self, **values: Any) -> None:
        with Session(self.engine) as session:
            request = session.get(Request, self.request_id)
            assert request is not None
            for name, value in values.items():
                setattr(request, name, value)
            session.add(request)
            session.commit()


@pytest.fixture
def hub(engine: Engine, database_url: str) -> Iterator[Hub]:
    tenant_id, _key = new_tenant(engine, "tenant-a")
    with Session(engine) as session:
        connection = Connection(
            tenant_id=tenant_id,
            name="crm",
            base_url=f"https://{SERVICE_HOST}",
            allowed_hosts=[SERVICE_HOST, TOKEN_HOST],
            auth_header_values={},
            oauth2=dict(OAUTH2),
            template=dict(TEMPLATE),
        )
        session.add(connection)
        session.flush()
        request = Request(
            tenant_id=tenant_id,
            connection_id=connection.id,
            name="list-items",
            kind="manual",
            method="GET",
            url="/items",
            headers={"Accept": "application/json"},
            query={},
            body=None,
            media_type="application/json",
        )
        session.add(request)
        session.commit()
        ids = connection.id, request.id
    hub = Hub(engine, database_url, tenant_id, ids[0], ids[1], Remote(), fakeredis.FakeRedis())
    hub.put_secret("client_secret", CLIENT_SECRET)
    yield hub


def failed(job: Job, code: str) -> str:
    """Assert that the job failed with ``code``; its error message."""
    assert job.status == "failed", (job.status, job.error, job.result)
    assert job.result is None
    assert job.error is not None
    assert job.error["code"] == code, job.error
    assert job.finished_at is not None
    return str(job.error["message"])


def stored_text(job: Job) -> str:
    """Everything a client can read of the job's outcome."""
    return json.dumps([job.result, job.error, job.secrets_used])


# --- the token on the service call ---------------------------------------------------------


def test_the_service_call_carries_the_token_from_the_token_endpoint(hub: Hub) -> None:
    # Given an OAuth 2.0 connection and a queued job of its GET /items
    job_id = hub.job()
    # When a worker runs it
    job = hub.run(job_id)
    # Then one token request went to the token endpoint, as the connection defines it
    assert len(hub.remote.token_requests) == 1
    sent = hub.remote.token_requests[0]
    assert sent.method == "POST"
    assert str(sent.url) == TOKEN_URL
    assert hub.remote.token_forms()[0] == {"grant_type": "client_credentials", "client_id": "cid",
                                           "client_secret": CLIENT_SECRET, "scope": "api"}
    # And the service got the token as a Bearer Authorization header
    assert len(hub.remote.service_requests) == 1
    call = hub.remote.service_requests[0]
    assert call.method == "GET"
    assert str(call.url) == f"https://{SERVICE_HOST}/items"
    assert call.headers["authorization"] == "Bearer tok-1"
    # And both destinations went through the guard
    assert (TOKEN_HOST, 443) in hub.remote.lookups and (SERVICE_HOST, 443) in hub.remote.lookups
    # And the job succeeded with the service's answer
    assert job.status == "succeeded", job.error
    assert job.result is not None and job.result["status_code"] == 200


def test_a_second_job_uses_the_cached_token(hub: Hub) -> None:
    # Given two queued jobs, run by two workers sharing the token cache
    first, second = hub.job(), hub.job()
    # When both run
    jobs = [hub.run(first), hub.run(second)]
    # Then one token request was made, and both service calls carried that token
    assert len(hub.remote.token_requests) == 1
    assert hub.remote.bearers() == ["Bearer tok-1", "Bearer tok-1"]
    assert [job.status for job in jobs] == ["succeeded", "succeeded"]
    # And only the job that requested the token read the client secret
    assert jobs[0].secrets_used == ["client_secret"]
    assert jobs[1].secrets_used == []


def test_token_placeholder_in_a_request_header_is_filled(hub: Hub) -> None:
    # Given a request that passes the token in a header of its own
    hub.change_request(headers={"Accept": "application/json", "X-Access-Token": "{{token}}"})
    # When a job of it runs
    job = hub.run(hub.job())
    # Then that header holds the token, and the Bearer header is added as well
    call = hub.remote.service_requests[0]
    assert call.headers["x-access-token"] == "tok-1"
    assert call.headers["authorization"] == "Bearer tok-1"
    assert job.status == "succeeded"


@pytest.mark.parametrize(
    ("header", "value", "expected"),
    [("Authorization", "Custom abc", "Custom abc"), ("authorization", "OAuth {{token}}", "OAuth tok-1")],
)
def test_a_request_that_sets_its_own_authorization_keeps_it(hub: Hub, header: str, value: str, expected: str) -> None:
    # Given a request with its own Authorization header
    hub.change_request(headers={header: value})
    # When a job of it runs
    job = hub.run(hub.job())
    # Then the service got that header, once, and no Bearer header beside it
    call = hub.remote.service_requests[0]
    assert call.headers.get_list("authorization") == [expected]
    assert job.status == "succeeded"


def test_secrets_used_names_the_client_secret_and_the_job_shows_no_credential(hub: Hub) -> None:
    # Given a queued job of an OAuth 2.0 connection
    job_id = hub.job()
    # When it runs and fetches a token
    job = hub.run(job_id)
    # Then the job names the client secret it read
    assert job.secrets_used == ["client_secret"]
    # And nothing stored on the job shows the secret or the access token
    shown = stored_text(job)
    assert CLIENT_SECRET not in shown
    assert "tok-1" not in shown


def test_auth_headers_go_with_the_token_request_and_the_service_call(hub: Hub) -> None:
    # Given a template that requires a client key header, given as a secret by the connection
    hub.change_connection(
        template={**TEMPLATE, "auth_headers": [{"name": "X-Client-Key", "required": True, "default": None}]},
        auth_header_values={"X-Client-Key": "{{secrets.client_key}}"},
    )
    hub.put_secret("client_key", "ck-VALUE-31")
    # When a job runs
    job = hub.run(hub.job())
    # Then both the token request and the service call carried the header with the secret's value
    assert hub.remote.token_requests[0].headers["x-client-key"] == "ck-VALUE-31"
    assert hub.remote.service_requests[0].headers["x-client-key"] == "ck-VALUE-31"
    # And the job names both secrets it read, showing neither
    assert job.status == "succeeded"
    assert job.secrets_used == ["client_key", "client_secret"]
    assert "ck-VALUE-31" not in stored_text(job)


def test_private_key_jwt_client_signs_its_token_request(hub: Hub) -> None:
    # Given a private_key_jwt connection whose EC P-256 key is a secret
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = ECKey.import_key(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    hub.change_connection(oauth2={**OAUTH2, "client_auth_method": "private_key_jwt", "client_secret": None,
                                  "private_key": "{{secrets.private_key}}"})
    hub.put_secret("private_key", pem)
    # When a job runs
    job = hub.run(hub.job())
    # Then the token request carried an assertion that verifies with the public key, and no secret
    form = hub.remote.token_forms()[0]
    assert "client_secret" not in form
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    claims = jwt.decode(form["client_assertion"], public, algorithms=["ES256"]).claims
    assert claims["iss"] == claims["sub"] == "cid"
    assert claims["aud"] in (TOKEN_URL, [TOKEN_URL])
    # And the job used the granted token, having read only the key
    assert hub.remote.bearers() == ["Bearer tok-1"]
    assert job.status == "succeeded"
    assert job.secrets_used == ["private_key"]
    assert "BEGIN PRIVATE KEY" not in stored_text(job)


def test_concurrent_workers_on_a_cold_cache_make_one_token_request(hub: Hub) -> None:
    # Given four queued jobs and a token endpoint that takes 0.3 s to answer
    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(0.3)
        return hub.remote.grant(request)

    hub.remote.token_answers = [slow] * 4
    job_ids = [hub.job() for _ in range(4)]
    # When four workers run them at the same time
    threads = [threading.Thread(target=hub.run, args=(job_id,)) for job_id in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    # Then one token request was made, and every service call carried its token
    assert len(hub.remote.token_requests) == 1
    assert hub.remote.bearers() == ["Bearer tok-1"] * 4
    jobs = [hub.load(job_id) for job_id in job_ids]
    assert [job.status for job in jobs] == ["succeeded"] * 4
    # And exactly one of them read the client secret
    assert sorted(job.secrets_used for job in jobs) == [[], [], [], ["client_secret"]]


# --- a refused token -----------------------------------------------------------------------


def test_a_cached_token_the_service_refuses_is_replaced_and_the_call_retried_once(hub: Hub) -> None:
    # Given a token cached by an earlier job, which the service has since revoked
    assert hub.run(hub.job()).status == "succeeded"
    hub.remote.refused_tokens.add("tok-1")
    calls_before = len(hub.remote.service_requests)
    # When the next job runs
    job = hub.run(hub.job())
    # Then it dropped the token, requested one new token, and called the service again with it
    assert len(hub.remote.token_requests) == 2
    assert hub.remote.bearers()[calls_before:] == ["Bearer tok-1", "Bearer tok-2"]
    # And the job succeeded with the retried call's answer
    assert job.status == "succeeded", job.error
    assert job.result is not None and job.result["status_code"] == 200
    assert job.secrets_used == ["client_secret"]
    # And the new token is what the cache now holds
    assert hub.run(hub.job()).status == "succeeded"
    assert len(hub.remote.token_requests) == 2
    assert hub.remote.bearers()[-1] == "Bearer tok-2"


def test_the_refused_call_is_retried_only_once(hub: Hub) -> None:
    # Given a cached token, and a service that refuses every token
    hub.run(hub.job())
    hub.remote.refused_tokens.update({"tok-1", "tok-2", "tok-3"})
    calls_before = len(hub.remote.service_requests)
    # When the next job runs
    job = hub.run(hub.job())
    # Then it tried the cached token and one fresh token, no more
    assert hub.remote.bearers()[calls_before:] == ["Bearer tok-1", "Bearer tok-2"]
    assert len(hub.remote.token_requests) == 2
    # And the job succeeded with the service's 401
    assert job.status == "succeeded"
    assert job.result is not None and job.result["status_code"] == 401


def test_a_401_to_a_freshly_fetched_token_is_not_retried(hub: Hub) -> None:
    # Given a service that refuses the token the job will fetch
    hub.remote.refused_tokens.add("tok-1")
    # When the job runs on a cold cache
    job = hub.run(hub.job())
    # Then one token request and one call were made
    assert len(hub.remote.token_requests) == 1
    assert hub.remote.bearers() == ["Bearer tok-1"]
    # And the service's 401 is the job's result
    assert job.status == "succeeded"
    assert job.result is not None and job.result["status_code"] == 401


# --- token endpoint failures ---------------------------------------------------------------


def test_a_refused_token_request_fails_the_job_without_calling_the_service(hub: Hub) -> None:
    # Given a token endpoint that refuses the client
    hub.remote.token_answers = [lambda request: ok_json(
        {"error": "invalid_client", "error_description": "unknown client"}, 400)]
    # When a job runs
    job = hub.run(hub.job())
    # Then it failed with token_request_failed, saying what the server said
    message = failed(job, "token_request_failed")
    assert "invalid_client" in message
    assert "unknown client" in message
    # And the token request was not retried, the service was not called, and no secret is shown
    assert len(hub.remote.token_requests) == 1
    assert hub.remote.service_requests == []
    assert CLIENT_SECRET not in stored_text(job)
    assert job.secrets_used == ["client_secret"]


def test_an_unavailable_token_endpoint_is_retried_until_it_answers(hub: Hub) -> None:
    # Given a token endpoint that answers 503 twice, then grants a token
    unavailable = lambda request: httpx.Response(503)  # noqa: E731
    hub.remote.token_answers = [unavailable, unavailable]
    # When a job runs
    job = hub.run(hub.job())
    # Then it made three token requests and called the service with the granted token
    assert len(hub.remote.token_requests) == 3
    assert hub.remote.bearers() == ["Bearer tok-3"]
    assert job.status == "succeeded", job.error


@pytest.mark.parametrize("attempts", [3, 4])
def test_a_token_endpoint_that_stays_unavailable_fails_the_job(hub: Hub, attempts: int) -> None:
    # Given a token endpoint that always answers 503
    hub.remote.token_answers = [lambda request: httpx.Response(503)] * 10
    # When a job runs with token_attempts set
    job = hub.run(hub.job(), token_attempts=attempts)
    # Then it made that many token requests and failed with token_request_failed
    assert len(hub.remote.token_requests) == attempts
    message = failed(job, "token_request_failed")
    assert "503" in message
    assert hub.remote.service_requests == []


def test_a_token_endpoint_that_times_out_is_retried(hub: Hub) -> None:
    # Given a token endpoint that times out once, then grants a token
    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    hub.remote.token_answers = [timeout]
    # When a job runs
    job = hub.run(hub.job())
    # Then the second token request's token was used
    assert len(hub.remote.token_requests) == 2
    assert hub.remote.bearers() == ["Bearer tok-2"]
    assert job.status == "succeeded"


def test_a_failed_token_request_leaves_no_token_cached(hub: Hub) -> None:
    # Given a job that failed to get a token
    hub.remote.token_answers = [lambda request: ok_json({"error": "invalid_client"}, 401)]
    failed(hub.run(hub.job()), "token_request_failed")
    # When the next job runs, the endpoint now granting tokens
    job = hub.run(hub.job())
    # Then that job requested its own token and succeeded
    assert len(hub.remote.token_requests) == 2
    assert hub.remote.bearers() == ["Bearer tok-2"]
    assert job.status == "succeeded"


@pytest.mark.parametrize(("expires_in", "action"), [(b"1e400", "request"), (b"1e400", "auth"),
                                                     (b"1e300", "request"), (b'"NaN"', "auth")])
def test_an_unusable_expires_in_does_not_break_the_job(hub: Hub, expires_in: bytes, action: str) -> None:
    # Given a token endpoint whose expires_in is out of any real range
    body = b'{"access_token": "tok-x", "token_type": "Bearer", "expires_in": ' + expires_in + b"}"
    hub.remote.token_answers = [lambda request: httpx.Response(200, headers={"Content-Type": "application/json"},
                                                               content=body)]
    # When a job runs
    job = hub.run(hub.job(action=action))
    # Then the granted token is still usable: the job succeeds rather than failing with internal_error
    assert job.status == "succeeded", job.error


# --- refresh-token rotation ----------------------------------------------------------------


def use_refresh_token_grant(hub: Hub) -> None:
    hub.change_connection(oauth2={**OAUTH2, "grant_type": "refresh_token",
                                  "refresh_token": "{{secrets.refresh_token}}"})
    hub.put_secret("refresh_token", OLD_REFRESH_TOKEN)


def test_a_rotated_refresh_token_replaces_the_stored_one(hub: Hub) -> None:
    # Given a refresh_token connection, and a server that rotates refresh tokens
    use_refresh_token_grant(hub)
    hub.remote.rotate_refresh_token = True
    # When a job gets a token
    first = hub.run(hub.job())
    # Then it sent the stored refresh token, and the server's new one is now the stored secret
    assert first.status == "succeeded", first.error
    assert hub.remote.token_forms()[0]["grant_type"] == "refresh_token"
    assert hub.remote.token_forms()[0]["refresh_token"] == OLD_REFRESH_TOKEN
    assert hub.secret("refresh_token") == "rt-NEW-1"
    assert sorted(first.secrets_used) == ["client_secret", "refresh_token"]
    assert "rt-NEW-1" not in stored_text(first)
    # When the cached token no longer serves (a new connection version) and another job runs
    hub.new_version()
    second = hub.run(hub.job())
    # Then the token request sent the new refresh token, never the old one again
    assert second.status == "succeeded", second.error
    sent = [form["refresh_token"] for form in hub.remote.token_forms()]
    assert sent == [OLD_REFRESH_TOKEN, "rt-NEW-1"]
    assert hub.secret("refresh_token") == "rt-NEW-2"


def test_a_rotated_refresh_token_is_used_after_a_refused_token(hub: Hub) -> None:
    # Given a refresh_token connection whose cached token the service has revoked
    use_refresh_token_grant(hub)
    hub.remote.rotate_refresh_token = True
    hub.run(hub.job())
    hub.remote.refused_tokens.add("tok-1")
    # When the next job is refused and fetches a new token
    job = hub.run(hub.job())
    # Then the retry's token request sent the rotated refresh token
    assert job.status == "succeeded"
    assert [form["refresh_token"] for form in hub.remote.token_forms()] == [OLD_REFRESH_TOKEN, "rt-NEW-1"]
    assert hub.secret("refresh_token") == "rt-NEW-2"


def test_an_answer_without_a_refresh_token_keeps_the_stored_one(hub: Hub) -> None:
    # Given a refresh_token connection, and a server that does not rotate
    use_refresh_token_grant(hub)
    # When a job gets a token, and after a new version another one does
    hub.run(hub.job())
    assert hub.secret("refresh_token") == OLD_REFRESH_TOKEN
    hub.new_version()
    job = hub.run(hub.job())
    # Then the stored refresh token is unchanged and was sent both times
    assert job.status == "succeeded"
    assert hub.secret("refresh_token") == OLD_REFRESH_TOKEN
    assert [form["refresh_token"] for form in hub.remote.token_forms()] == [OLD_REFRESH_TOKEN] * 2


# --- action auth ---------------------------------------------------------------------------


def test_auth_action_reports_the_token_without_showing_it(hub: Hub) -> None:
    # Given a queued auth job of the connection
    job_id = hub.job(action="auth")
    # When it runs
    job = hub.run(job_id)
    # Then it made the token request and no service call
    assert len(hub.remote.token_requests) == 1
    assert hub.remote.service_requests == []
    # And its result says what was granted, when it expires, and that it was not cached
    assert job.status == "succeeded", job.error
    assert job.result is not None
    assert job.result["token_type"] == "Bearer"
    assert job.result["scope"] == "api"
    assert job.result["cached"] is False
    expires_at = job.result["expires_at"]
    assert isinstance(expires_at, str) and RFC3339_UTC.match(expires_at), expires_at
    when = datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    assert abs((when - datetime.now(timezone.utc)).total_seconds() - 3600) < 60
    assert job.secrets_used == ["client_secret"]
    # And the token itself is nowhere in the job
    assert "tok-1" not in stored_text(job)


def test_a_second_auth_job_reports_the_cached_token(hub: Hub) -> None:
    # Given an auth job that has run
    first = hub.run(hub.job(action="auth"))
    # When another auth job runs
    second = hub.run(hub.job(action="auth"))
    # Then it made no token request and says the token came from the cache
    assert len(hub.remote.token_requests) == 1
    assert first.result is not None and second.result is not None
    assert first.result["cached"] is False
    assert second.result["cached"] is True
    assert second.result["expires_at"] == first.result["expires_at"]
    assert second.result["token_type"] == "Bearer"
    # And neither shows the token
    assert "tok-1" not in stored_text(first) + stored_text(second)
    # And a request job after it uses that token without a new token request
    hub.run(hub.job())
    assert hub.remote.bearers() == ["Bearer tok-1"]


def test_auth_action_reports_a_refused_token_request(hub: Hub) -> None:
    # Given a token endpoint that refuses the grant
    hub.remote.token_answers = [lambda request: ok_json({"error": "invalid_grant", "error_description": "bad"}, 400)]
    # When an auth job runs
    job = hub.run(hub.job(action="auth"))
    # Then it failed with the server's error
    message = failed(job, "token_request_failed")
    assert "invalid_grant" in message and "bad" in message


def test_auth_action_on_a_connection_without_oauth_is_invalid_oauth2(hub: Hub) -> None:
    # Given a connection that uses no authentication
    hub.change_connection(template={**TEMPLATE, "auth_type": "none"}, oauth2=None)
    # When an auth job of it runs
    job = hub.run(hub.job(action="auth"))
    # Then it failed with invalid_oauth2, and nothing was sent
    failed(job, "invalid_oauth2")
    assert hub.remote.token_requests == []
    assert hub.remote.service_requests == []


# --- where the token request may go --------------------------------------------------------


@pytest.mark.parametrize("action", ["request", "auth"])
def test_a_token_url_outside_the_allowed_hosts_is_blocked(hub: Hub, action: str) -> None:
    # Given a connection whose token endpoint host is not among its allowed hosts
    hub.change_connection(allowed_hosts=[SERVICE_HOST])
    # When a job runs
    job = hub.run(hub.job(action=action))
    # Then it failed as blocked_destination, with no token request and no service call
    failed(job, "blocked_destination")
    assert hub.remote.token_requests == []
    assert hub.remote.service_requests == []


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "127.0.0.1"])
def test_a_token_host_resolving_to_a_private_address_is_blocked(hub: Hub, address: str) -> None:
    # Given a token endpoint host that resolves to a non-public address
    hub.remote.addresses[TOKEN_HOST] = [address]
    # When a job runs under the default guard
    job = hub.run(hub.job())
    # Then the client secret never left: no token request, and the job is blocked
    failed(job, "blocked_destination")
    assert hub.remote.token_requests == []
    assert hub.remote.service_requests == []
    assert (TOKEN_HOST, 443) in hub.remote.lookups


def test_an_http_token_url_is_blocked_when_only_https_is_allowed(hub: Hub) -> None:
    # Given a token URL with the http scheme on an https-only hub
    hub.change_connection(oauth2={**OAUTH2, "token_url": f"http://{TOKEN_HOST}/token"})
    # When a job runs
    job = hub.run(hub.job(), allow_http=False)
    # Then the client secret is not sent in clear
    failed(job, "blocked_destination")
    assert hub.remote.token_requests == []


def test_a_missing_client_secret_fails_with_secret_missing(hub: Hub) -> None:
    # Given a connection whose client_secret refers to a secret that does not exist
    hub.change_connection(oauth2={**OAUTH2, "client_secret": "{{secrets.not_there}}"})
    # When a job runs
    job = hub.run(hub.job())
    # Then it failed with secret_missing before any token request
    message = failed(job, "secret_missing")
    assert "not_there" in message
    assert hub.remote.token_requests == []


# --- through the API -----------------------------------------------------------------------

API_OAUTH2: dict[str, Any] = {
    "grant_type": "client_credentials",
    "token_url": TOKEN_URL,
    "client_id": "cid",
    "client_secret": "{{secrets.client_secret}}",
    "client_auth_method": "client_secret_post",
    "scope": "api",
    "audience": None,
    "extra_params": {},
}


def submit(api: Api, **body: Any) -> httpx.Response:
    return api.client.post("/v1/executions", json=body, headers=api.headers())


def test_api_auth_execution_of_an_oauth2_connection_is_queued(api: Api) -> None:
    # Given an OAuth 2.0 template and a connection made from it through the API
    template = make_template(api, auth_type="oauth2")
    connection = make_connection(api, template, name="crm", base_url=f"https://{SERVICE_HOST}", oauth2=API_OAUTH2)
    # When an auth execution is submitted
    response = submit(api, connection="crm", action="auth")
    # Then it is accepted as a queued auth job of that connection, with no request
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["action"] == "auth"
    assert job["status"] == "queued"
    assert job["connection_id"] == connection["id"]
    assert job["request_id"] is None
    # And its id went to the workers
    assert api.queue.sent == [job["id"]]
    fetched = api.client.get(f"/v1/executions/{job['id']}", headers=api.headers())
    assert fetched.status_code == 200 and fetched.json()["action"] == "auth"


def test_api_auth_execution_of_a_no_auth_connection_is_invalid_oauth2(api: Api) -> None:
    # Given a connection whose template uses no authentication
    make_connection(api, name="plain")
    # When an auth execution is submitted
    response = submit(api, connection="plain", action="auth")
    # Then it is refused with invalid_oauth2 and nothing is queued
    assert_problem(response, 422, "invalid_oauth2")
    assert api.queue.sent == []


def test_api_literal_client_secret_is_secret_reference_required(api: Api) -> None:
    # Given an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    literal = "literal-SECRET-4242"
    # When a connection is made with the client secret written in clear
    response = api.client.post(
        "/v1/connections",
        json=connection_body(template["id"], name="crm", oauth2={**API_OAUTH2, "client_secret": literal}),
        headers=api.headers(),
    )
    # Then it is refused, pointing at the field, without echoing the value
    problem = assert_problem(response, 422, "secret_reference_required")
    assert ["body", "oauth2", "client_secret"] in error_locs(problem)
    assert literal not in response.text
    assert api.client.get("/v1/connections/crm", headers=api.headers()).status_code == 404


def test_api_password_grant_without_username_is_invalid_oauth2(api: Api) -> None:
    # Given an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    # When a password-grant connection is made without a username
    oauth2 = {**API_OAUTH2, "grant_type": "password", "password": "{{secrets.password}}"}
    response = api.client.post("/v1/connections", json=connection_body(template["id"], name="crm", oauth2=oauth2),
                               headers=api.headers())
    # Then it is refused with invalid_oauth2 at the username field
    problem = assert_problem(response, 422, "invalid_oauth2")
    assert ["body", "oauth2", "username"] in error_locs(problem)
