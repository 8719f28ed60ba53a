"""Signed callbacks end to end in-process: a job submitted through the API with a
``callback_url``, run by ``run_job``, then delivered by ``worker.callbacks.deliver`` to a
receiver this test serves on 127.0.0.1.

The web service the job calls is an ``httpx.MockTransport`` behind a fake resolver. Callbacks
to internal addresses come from a fake resolver too, and go to a transport that records what
reaches it: nothing could connect to them even if the guard were broken.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from api_shim.app import create_app
from models import callbacks
from models.base import as_utc, utcnow
from models.secrets import rotate
from models.tables import Job, Tenant
from models.vault import Vault, generate_key
from tests.api.helpers import make_connection, make_request
from tests.conftest import TEST_MASTER_KEY, Api, RecordingQueue, in_process_runtime, test_settings
from worker.callbacks import deliver
from worker.executor import run_job

PUBLIC_ADDRESS = "93.184.215.14"
ATTEMPTS = 3


@dataclass
class Received:
    """One request the receiver got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A callback receiver on 127.0.0.1: records every request, answers ``status``."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.status = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(Received(self.command, self.path, dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/done"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A receiver serving in a thread for the test."""
    receiver = Receiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()
    thread.join(5)


@dataclass
class Guarded:
    """A fake resolver and a transport that record what they were asked: the destination of a
    callback that must never be reached."""

    addresses: list[str]
    lookups: list[tuple[str, int]] = field(default_factory=list)
    sent: list[httpx.Request] = field(default_factory=list)

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append((host, port))
        return self.addresses

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return httpx.Response(204)


@dataclass
class Hub:
    """The API with a connection ``svc``, and a worker in this process."""

    api: Api
    database_url: str
    upstream_calls: list[httpx.Request] = field(default_factory=list)

    def submit(self, callback_url: str) -> str:
        """A job of ``svc``'s ``list`` submitted through the API with ``callback_url``; its id."""
        response = self.api.client.post(
            "/v1/executions", json={"connection": "svc", "request": "list", "callback_url": callback_url},
            headers=self.api.headers(),
        )
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def run(self, job_id: str) -> dict[str, Any]:
        """Run the job as a worker does, against the mock web service; the job as shown."""
        def service(request: httpx.Request) -> httpx.Response:
            self.upstream_calls.append(request)
            return httpx.Response(200, json={"items": [1, 2]})

        settings = test_settings(self.database_url, allow_private_destinations=False, allow_http=False)
        runtime = in_process_runtime(settings, self.api.engine, httpx.MockTransport(service),
                                     lambda host, port: [PUBLIC_ADDRESS])
        with runtime.client:
            run_job(job_id, runtime)
        return self.shown(job_id)

    def deliver(self, job_id: str, guarded: Guarded | None = None, *, allow_private: bool = True,
                **settings_: Any) -> float | None:
        """One callback delivery attempt. Without ``guarded``: real connections (the receiver
        on loopback); with it: its resolver and recording transport."""
        settings = test_settings(self.database_url, allow_private_destinations=allow_private,
                                 callback_attempts=ATTEMPTS, callback_backoff_s=0.01, **settings_)
        if guarded is None:
            runtime = in_process_runtime(settings, self.api.engine, None, lambda host, port: ["127.0.0.1"])
        else:
            runtime = in_process_runtime(settings, self.api.engine, httpx.MockTransport(guarded.handler),
                                         guarded.resolve)
        with runtime.client:
            return deliver(job_id, runtime)

    def shown(self, job_id: str) -> dict[str, Any]:
        """The job as ``GET /v1/executions/{id}`` shows it."""
        response = self.api.client.get(f"/v1/executions/{job_id}", headers=self.api.headers())
        assert response.status_code == 200, response.text
        return dict(response.json())

    def callback_key(self) -> str:
        """The tenant's key, from ``GET /v1/callback-key``."""
        response = self.api.client.get("/v1/callback-key", headers=self.api.headers())
        assert response.status_code == 200, response.text
        assert response.json()["header"] == callbacks.SIGNATURE_HEADER
        assert response.json()["algorithm"] == "hmac-sha256"
        return str(response.json()["key"])


@pytest.fixture
def hub(api: Api, database_url: str) -> Hub:
    """Tenant a's ``svc`` (https://api.example.com/v1) with a stored GET ``list``."""
    make_request(api, make_connection(api, name="svc"), name="list")
    return Hub(api, database_url)


def test_a_finished_job_is_posted_to_its_callback_url_signed(hub: Hub, receiver: Receiver) -> None:
    """The receiver gets the job as the API shows it, with a signature it can check."""
    # Given: a job with a callback URL that a worker ran
    job_id = hub.submit(receiver.url)
    before = hub.run(job_id)
    assert (before["status"], before["callback_state"]) == ("succeeded", "pending")
    assert len(hub.upstream_calls) == 1
    # When: its callback is delivered
    assert hub.deliver(job_id) is None
    # Then: the receiver got one POST carrying the job as GET /v1/executions/{id} showed it
    assert len(receiver.requests) == 1
    got = receiver.requests[0]
    assert (got.method, got.path) == ("POST", "/hooks/done")
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Hub-Job-Id"] == job_id
    assert got.headers["X-Hub-Delivery-Attempt"] == "1"
    assert json.loads(got.body) == before
    # And: its signature checks out with the key GET /v1/callback-key gives, and only for this body
    key = hub.callback_key()
    signature = got.headers[callbacks.SIGNATURE_HEADER]
    assert signature.startswith("sha256=")
    assert callbacks.verify(key, got.body, signature)
    assert not callbacks.verify(key, got.body.replace(b'"succeeded"', b'"failed"'), signature)
    assert not callbacks.verify(key, got.body + b" ", signature)
    # And: the job shows its callback delivered; another delivery message does nothing
    assert hub.shown(job_id)["callback_state"] == "delivered"
    assert hub.deliver(job_id) is None
    assert len(receiver.requests) == 1


def test_a_receiver_that_fails_is_tried_again_then_given_up(hub: Hub, receiver: Receiver) -> None:
    """Non-2xx answers are tried again after a delay, ``callback_attempts`` times in all."""
    # Given: a finished job whose receiver answers 500
    receiver.status = 500
    job_id = hub.submit(receiver.url)
    hub.run(job_id)
    # When: its callback is delivered, attempt after attempt
    delays = [hub.deliver(job_id) for _ in range(ATTEMPTS)]
    # Then: each attempt but the last asked for another after a positive delay, the job pending
    assert all(delay is not None and delay > 0 for delay in delays[:-1]), delays
    assert delays[-1] is None
    assert [r.headers["X-Hub-Delivery-Attempt"] for r in receiver.requests] == ["1", "2", "3"]
    # And: after the last attempt the callback is failed, and no further attempt is made
    assert hub.shown(job_id)["callback_state"] == "failed"
    assert hub.deliver(job_id) is None
    assert len(receiver.requests) == ATTEMPTS


def test_after_one_failure_the_state_stays_pending(hub: Hub, receiver: Receiver) -> None:
    """One failed attempt of several is not the end."""
    # Given: a finished job whose receiver answers 503 once, then 200
    receiver.status = 503
    job_id = hub.submit(receiver.url)
    hub.run(job_id)
    # When: the first attempt fails
    before = utcnow()
    delay = hub.deliver(job_id)
    # Then: the callback is still pending, with a delay before the next attempt
    assert delay is not None and delay > 0
    assert hub.shown(job_id)["callback_state"] == "pending"
    # and the next try's due time is recorded, for the sweeper to send it if its message is lost
    with Session(hub.api.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.callback_due_at is not None
        due = as_utc(job.callback_due_at)
    assert before + timedelta(seconds=delay) <= due <= utcnow() + timedelta(seconds=delay)
    # When: the next attempt is answered 200
    receiver.status = 200
    # Then: it is delivered
    assert hub.deliver(job_id) is None
    assert hub.shown(job_id)["callback_state"] == "delivered"
    assert [r.headers["X-Hub-Delivery-Attempt"] for r in receiver.requests] == ["1", "2"]


def test_rotating_the_callback_key_changes_the_signature(hub: Hub, receiver: Receiver) -> None:
    """After ``POST /v1/callback-key/rotate`` callbacks are signed with the new key alone."""
    # Given: a callback delivered under the tenant's first key
    first_job = hub.submit(receiver.url)
    hub.run(first_job)
    hub.deliver(first_job)
    old = hub.callback_key()
    # When: the tenant rotates its key
    response = hub.api.client.post("/v1/callback-key/rotate", headers=hub.api.headers())
    assert response.status_code == 200, response.text
    new = response.json()["key"]
    # Then: it is a new key, and GET /v1/callback-key shows it
    assert new != old and new.startswith(callbacks.KEY_PREFIX)
    assert hub.callback_key() == new
    # And: the next callback is signed with the new key, not the old one
    second_job = hub.submit(receiver.url)
    hub.run(second_job)
    hub.deliver(second_job)
    first, second = receiver.requests
    assert callbacks.verify(old, first.body, first.headers[callbacks.SIGNATURE_HEADER])
    assert callbacks.verify(new, second.body, second.headers[callbacks.SIGNATURE_HEADER])
    assert not callbacks.verify(old, second.body, second.headers[callbacks.SIGNATURE_HEADER])
    # And: another tenant's key is its own
    other = hub.api.client.get("/v1/callback-key", headers=hub.api.headers("b")).json()["key"]
    assert other not in (old, new)


@pytest.mark.parametrize("address", ["10.0.0.1", "127.0.0.1", "169.254.169.254", "fd00::1"])
def test_a_callback_url_resolving_to_an_internal_address_is_never_called(
    hub: Hub, address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The destination guard refuses a callback host that resolves to an internal address."""
    # Given: a finished job whose callback host resolves to an internal address
    job_id = hub.submit("https://hooks.example.com/done")
    hub.run(job_id)
    guarded = Guarded([address])
    # When: its callback is delivered with private destinations not allowed
    with caplog.at_level(logging.INFO, logger="hub.worker"):
        delay = hub.deliver(job_id, guarded, allow_private=False)
    # Then: the host was looked up, the guard refused it, and nothing was sent
    assert guarded.lookups == [("hooks.example.com", 443)]
    assert guarded.sent == []
    assert "blocked_destination" in caplog.text
    # And: the callback is not delivered (it is tried again later, and refused again)
    assert delay is not None
    assert hub.shown(job_id)["callback_state"] == "pending"


def test_a_callback_url_resolving_to_a_public_address_is_called(hub: Hub) -> None:
    """The same set-up with a public address delivers: the refusal above is the guard's."""
    # Given: a finished job whose callback host resolves to a public address
    job_id = hub.submit("https://hooks.example.com/done")
    hub.run(job_id)
    guarded = Guarded([PUBLIC_ADDRESS])
    # When: its callback is delivered
    assert hub.deliver(job_id, guarded, allow_private=False) is None
    # Then: it was sent to that host and delivered
    assert [str(request.url) for request in guarded.sent] == ["https://hooks.example.com/done"]
    assert hub.shown(job_id)["callback_state"] == "delivered"


def test_rotating_the_master_keys_keeps_the_callback_key(hub: Hub, receiver: Receiver, database_url: str) -> None:
    """``keys rotate`` re-encrypts the callback key; its value, and the signatures, stay."""
    # Given: a tenant's callback key, sealed under the first master key
    key = hub.callback_key()
    new_master = generate_key()
    vault = Vault.from_setting(f"{new_master},{TEST_MASTER_KEY}")
    # When: a new master key is put first and the keys are rotated
    report = rotate(hub.api.engine, vault)
    # Then: the callback key was re-encrypted under the new master key
    assert (report.resealed, report.unreadable) == (1, 0)
    with Session(hub.api.engine) as session:
        tenant = session.get(Tenant, hub.api.tenant_a)
        assert tenant is not None and tenant.callback_key is not None
        assert tenant.callback_key.split(":", 1)[0] == Vault.from_setting(new_master).current_key_id
    assert rotate(hub.api.engine, vault).resealed == 0
    # And: with the new master key alone, the API shows the same key
    queue = RecordingQueue()
    app = create_app(test_settings(database_url, master_keys=new_master), engine=hub.api.engine, enqueue=queue)
    with TestClient(app, raise_server_exceptions=False) as client:
        shown = client.get("/v1/callback-key", headers=hub.api.headers())
    assert shown.status_code == 200, shown.text
    assert shown.json()["key"] == key
    # And: a callback is still signed with it
    job_id = hub.submit(receiver.url)
    hub.run(job_id)
    hub.deliver(job_id, master_keys=new_master)
    got = receiver.requests[-1]
    assert callbacks.verify(key, got.body, got.headers[callbacks.SIGNATURE_HEADER])
    with Session(hub.api.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.callback_state == "delivered"
