"""The destination guard through the worker, with what it must refuse.

Forms that land on loopback are tried for real: a server listens on 127.0.0.1, so if the
guard let one through, the job would reach it and succeed. Private, metadata and other
internal addresses are never connected to, even if the guard were broken: they come from a
fake resolver and the transport is an httpx.MockTransport that records calls.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from api_shim.demo_upstream import make_server
from models import secrets
from models.tables import Connection, Job, Request
from models.vault import Vault
from tests.conftest import TEST_MASTER_KEY, in_process_runtime, new_tenant, test_settings
from worker.executor import run_job
from worker.guard import system_resolver

LOOPBACK_FORMS = [
    "127.0.0.1", "127.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001", "127.0.0.2",
    "127.255.255.254", "[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0",
    "0", "[::]", "localhost", "LOCALHOST",
]
INTERNAL_ADDRESSES = [
    "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "fd00::1", "fe80::1",
    "ff02::1", "224.0.0.1", "240.0.0.1", "2002:a00:1::1", "64:ff9b::a00:1", "::ffff:10.0.0.1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
]
PUBLIC = "93.184.216.34"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Any]:
    """The demo web service on 127.0.0.1: what a guard failure would reach."""
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def _job(engine: Engine, url: str, hosts: list[str], headers: dict[str, str] | None = None,
         auth_header_values: dict[str, str] | None = None, stored: dict[str, str] | None = None) -> str:
    """A job of a GET to ``url`` on a connection to ``hosts``, with its own secrets ``stored``."""
    tenant_id, _key = new_tenant(engine, f"guard-{abs(hash((url, tuple(hosts))))}")
    with Session(engine) as session:
        connection = Connection(tenant_id=tenant_id, name="c", base_url=None, allowed_hosts=hosts,
                                auth_header_values=auth_header_values or {},
                                template={"service_name": "s", "integration_method": "rest", "auth_type": "none",
                                          "auth_headers": [{"name": name, "required": True}
                                                           for name in auth_header_values or {}],
                                          "verbs": ["GET"]})
        session.add(connection)
        session.commit()
        for name, value in (stored or {}).items():
            secrets.put(session, Vault.from_setting(TEST_MASTER_KEY), tenant_id=tenant_id,
                        connection_id=connection.id, name=name, value=value)
        session.commit()
        request = Request(tenant_id=tenant_id, connection_id=connection.id, name="r", kind="manual", method="GET",
                          url=url, headers=headers or {}, query={}, body=None, media_type="application/json")
        session.add(request)
        session.commit()
        job = Job(tenant_id=tenant_id, connection_id=connection.id, request_id=request.id, action="request",
                  status="queued", params={"path_params": {}, "variables": {}}, secrets_used=[])
        session.add(job)
        session.commit()
        return job.id


def _run(engine: Engine, database_url: str, job_id: str, transport: httpx.BaseTransport | None,
         resolve: Any, **settings: Any) -> Job:
    values = {"allow_private_destinations": False, "allow_http": True, **settings}
    runtime = in_process_runtime(test_settings(database_url, **values), engine, transport, resolve)
    with runtime.client:
        run_job(job_id, runtime)
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


@pytest.mark.parametrize("host", LOOPBACK_FORMS)
def test_loopback_in_any_spelling_is_refused(engine, database_url, upstream, host: str) -> None:
    # Given a request to the loopback server, its address spelt one way or another
    port = upstream.server_address[1]
    plain = host.strip("[]").lower()
    job_id = _job(engine, f"http://{host}:{port}/echo/guard", [plain])
    hits_before = dict(upstream.stats)
    # When the worker runs it with the real resolver and real connections
    job = _run(engine, database_url, job_id, None, system_resolver)
    # Then it is refused before any connection: the server saw nothing
    assert job.status == "failed", job.result
    assert job.error["code"] == "blocked_destination"
    assert dict(upstream.stats) == hits_before


class Recorder:
    """A MockTransport handler that records what reached it."""

    def __init__(self, *answers: httpx.Response) -> None:
        self.answers = list(answers)
        self.seen: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return self.answers.pop(0) if self.answers else httpx.Response(200, json={"ok": True})


@pytest.mark.parametrize("address", INTERNAL_ADDRESSES)
def test_a_name_resolving_to_an_internal_address_is_refused(engine, database_url, address: str) -> None:
    # Given an allowed host whose name resolves to an internal address
    job_id = _job(engine, "https://api.example.com/items", ["api.example.com"])
    recorder = Recorder()
    # When the job runs
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [address])
    # Then it is refused and nothing was sent
    assert (job.status, job.error["code"]) == ("failed", "blocked_destination")
    assert recorder.seen == []


def test_a_redirect_to_loopback_is_refused(engine, database_url) -> None:
    # Given an allowed public host that redirects to 127.0.0.1
    job_id = _job(engine, "https://api.example.com/start", ["api.example.com", "127.0.0.1"])
    recorder = Recorder(httpx.Response(302, headers={"Location": "http://127.0.0.1:9/admin"}))
    # When the job runs, then the second hop is checked and refused: one call was made
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [PUBLIC])
    assert (job.status, job.error["code"]) == ("failed", "blocked_destination")
    assert [str(r.url) for r in recorder.seen] == ["https://api.example.com/start"]


def test_redirects_among_allowed_hosts_are_followed_without_credentials_across_hosts(engine, database_url) -> None:
    # Given a redirect chain over two allowed public hosts
    job_id = _job(engine, "https://api.example.com/a", ["api.example.com", "files.example.com"],
                  headers={"Authorization": "Bearer keep-me-home"})
    recorder = Recorder(httpx.Response(301, headers={"Location": "/b"}),
                        httpx.Response(307, headers={"Location": "https://files.example.com/c"}),
                        httpx.Response(200, json={"done": True}))
    # When the job runs
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [PUBLIC])
    # Then it followed both, and the credential stayed with its own host
    assert job.status == "succeeded" and job.result["status_code"] == 200, job.error
    assert [str(r.url) for r in recorder.seen] == ["https://api.example.com/a", "https://api.example.com/b",
                                                   "https://files.example.com/c"]
    assert [r.headers.get("authorization") for r in recorder.seen] == ["Bearer keep-me-home"] * 2 + [None]


@pytest.mark.parametrize("elsewhere", ["https://files.example.com/c", "https://api.example.com:8443/c",
                                       "http://api.example.com/c"], ids=["host", "port", "scheme"])
def test_a_redirect_to_another_origin_carries_no_credential_of_any_kind(engine, database_url, elsewhere: str) -> None:
    # Given a request whose credentials are a connection auth header, a header filled from a
    # secret, a cookie and a bearer token, on a connection that allows both hosts
    job_id = _job(engine, "https://api.example.com/a", ["api.example.com", "files.example.com"],
                  headers={"X-Api-Key": "{{secrets.key}}", "Authorization": "Bearer t-1", "Cookie": "s=1",
                           "Accept": "application/json"},
                  auth_header_values={"X-Client-Id": "{{secrets.client}}"}, stored={"key": "k-1", "client": "c-1"})
    recorder = Recorder(httpx.Response(302, headers={"Location": "/b"}),
                        httpx.Response(302, headers={"Location": elsewhere}),
                        httpx.Response(200, json={"done": True}))
    # When the service redirects within its origin, then to another host, port or scheme
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [PUBLIC])
    # Then the credentials went along the first hop and none of them to the other origin
    assert job.status == "succeeded" and job.result["status_code"] == 200, job.error
    private = ("x-api-key", "x-client-id", "authorization", "cookie")
    assert [[r.headers.get(name) for name in private] for r in recorder.seen] == [
        ["k-1", "c-1", "Bearer t-1", "s=1"], ["k-1", "c-1", "Bearer t-1", "s=1"], [None] * 4]
    assert [r.headers.get("accept") for r in recorder.seen] == ["application/json"] * 3


def test_more_than_five_redirects_fail(engine, database_url) -> None:
    job_id = _job(engine, "https://api.example.com/loop", ["api.example.com"])
    recorder = Recorder(*[httpx.Response(302, headers={"Location": "/loop"}) for _ in range(10)])
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [PUBLIC])
    assert (job.status, job.error["code"]) == ("failed", "too_many_redirects")
    assert len(recorder.seen) == 6


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111"])
def test_public_destinations_pass(engine, database_url, address: str) -> None:
    job_id = _job(engine, "https://api.example.com/items", ["api.example.com"])
    recorder = Recorder()
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [address])
    assert job.status == "succeeded", job.error
    assert len(recorder.seen) == 1


@pytest.mark.parametrize("url", ["ftp://api.example.com/x", "file:///etc/passwd", "http://api.example.com/x"])
def test_schemes_other_than_https_are_refused(engine, database_url, url: str) -> None:
    # Given a hub that allows https only, then other schemes are refused, http included
    job_id = _job(engine, url, ["api.example.com"])
    recorder = Recorder()
    job = _run(engine, database_url, job_id, httpx.MockTransport(recorder), lambda host, port: [PUBLIC],
               allow_http=False)
    assert (job.status, job.error["code"]) == ("failed", "blocked_destination")
    assert recorder.seen == []


def test_allowing_private_destinations_never_lifts_allowed_hosts(engine, database_url, upstream) -> None:
    # Given private destinations allowed (dev mode), and a loopback host the connection does not list
    port = upstream.server_address[1]
    job_id = _job(engine, f"http://127.0.0.1:{port}/echo/x", ["api.example.com"])
    job = _run(engine, database_url, job_id, None, system_resolver, allow_private_destinations=True)
    # Then it is still refused
    assert (job.status, job.error["code"]) == ("failed", "blocked_destination")


def test_with_private_destinations_allowed_the_pinned_connection_works(engine, database_url, upstream) -> None:
    # Given dev mode and the loopback server in allowed_hosts, then the job reaches it for real
    port = upstream.server_address[1]
    job_id = _job(engine, f"http://localhost:{port}/echo/pinned", ["localhost"])
    job = _run(engine, database_url, job_id, None, system_resolver, allow_private_destinations=True)
    assert job.status == "succeeded", job.error
    assert job.result["status_code"] == 200
