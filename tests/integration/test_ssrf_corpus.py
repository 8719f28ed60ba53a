"""The destination guard's cases again, end to end: submitted through the API, run by the worker.

Each case is a URL that must not be reached, given where a client can give one: a connection's
``base_url`` (and so its allowed hosts), a stored request's URL, an ad-hoc request's URL, a
redirect from the web service, an OAuth token URL and a callback URL. The API runs in-process
(``api`` fixture); the worker is ``run_job`` with the destination guard on
(``allow_private_destinations`` false) and a real :class:`worker.guard.PinnedTransport`.

Nothing here can connect anywhere but loopback, even if the guard were broken:

- Forms of loopback (``127.1``, ``2130706433``, ``[::ffff:127.0.0.1]``, ``localhost``…) point at
  a *canary*: a server on 127.0.0.1 (and ::1) that counts every connection it accepts. A guard
  failure would show there.
- Internal addresses (10/8, 169.254.169.254, fd00::/8, …) are data: a fake resolver answers
  them for test names, or they are URL literals the guard reads.
- Under the pinned transport's own connection code sits a :class:`Fence`: it records every
  connect the guard let through, connects for real only to loopback, and maps the one public
  test address to the loopback web service this test runs. Anything else it refuses without a
  socket.

Controls run the same paths with the guard off and show that the canary is reachable, so the
refusals are the guard's and not the set-up's.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import pytest

from tests.api.helpers import assert_problem, make_connection, make_request, make_template
from tests.conftest import Api, in_process_runtime, test_settings
from worker import guard, tls
from worker.callbacks import deliver
from worker.executor import run_job

pytestmark = pytest.mark.reliability

PUBLIC = "93.184.215.14"
"""A public address, as data: the fake resolver's answer for the web service's name; the
fence maps it to the loopback web service and never connects to it."""
SERVICE = "service.example.test"
"""The web service's name: resolves (fake) to :data:`PUBLIC`, reaches the loopback service."""

LOOPBACK_HOSTS = {
    "127.0.0.1": "dotted",
    "127.1": "short",
    "127.0.1": "three-part",
    "2130706433": "decimal",
    "0x7f000001": "hex",
    "0x7f.0.0.1": "hex-octet",
    "0177.0.0.1": "octal",
    "017700000001": "octal-whole",
    "127.0.0.2": "other-127",
    "[::1]": "ipv6",
    "[0:0:0:0:0:0:0:1]": "ipv6-long",
    "[::ffff:127.0.0.1]": "mapped",
    "[::ffff:7f00:1]": "mapped-hex",
    "localhost": "localhost",
    "LOCALHOST": "localhost-upper",
    "loopback.example.test": "name-to-127",
    "loopback6.example.test": "name-to-::1",
    "rebind.example.test": "name-to-public-and-127",
}
"""URL hosts that land on loopback: where the canary listens."""

NAMES = {
    "loopback.example.test": ["127.0.0.1"],
    "loopback6.example.test": ["::1"],
    "rebind.example.test": [PUBLIC, "127.0.0.1"],
}

INTERNAL = {
    "10.0.0.1": "private-10",
    "172.16.0.1": "private-172",
    "192.168.1.1": "private-192",
    "169.254.169.254": "metadata",
    "100.64.0.1": "shared-cgnat",
    "0.0.0.0": "unspecified",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "fd00::1": "ula",
    "fe80::1": "ipv6-link-local",
    "::ffff:10.0.0.1": "mapped-private",
    "::ffff:169.254.169.254": "mapped-metadata",
    "2002:a00:1::1": "6to4-private",
    "64:ff9b::a9fe:a9fe": "nat64-metadata",
}
"""Internal addresses, given only as data (fake DNS answers)."""

INTERNAL_LITERALS = {
    "169.254.169.254": "metadata",
    "10.0.0.1": "private",
    "192.168.0.1": "private-192",
    "[fd00::1]": "ula",
    "[::ffff:a9fe:a9fe]": "mapped-metadata",
    "[::ffff:10.0.0.1]": "mapped-private",
    "2852039166": "metadata-decimal",
    "0xa9fea9fe": "metadata-hex",
    "0251.0376.0251.0376": "metadata-octal",
    "167772161": "private-decimal",
    "10.1": "private-short",
}
"""Internal addresses spelt in URLs: the guard reads them (or the fake resolver decodes the
numeric spellings, as the C library would); the fence never connects to one."""


# --- the loopback servers --------------------------------------------------------------------


class Canary:
    """A TCP server on 127.0.0.1 and ::1 (same port) that counts the connections it accepts
    and answers each with a small 200."""

    def __init__(self) -> None:
        self.connections = 0
        self._lock = threading.Lock()
        canary = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with canary._lock:
                    canary.connections += 1
                self.request.settimeout(2)
                data = b""
                try:
                    while b"\r\n\r\n" not in data and len(data) < 65_536:
                        chunk = self.request.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
                                         b"Connection: close\r\n\r\ncanary")
                except OSError:
                    pass

        class Server4(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        class Server6(Server4):
            address_family = socket.AF_INET6

        self.servers: list[socketserver.ThreadingTCPServer] = []
        for _ in range(20):
            four = Server4(("127.0.0.1", 0), Handler)
            self.port = four.server_address[1]
            try:
                six = Server6(("::1", self.port), Handler)
            except OSError:
                four.server_close()
                continue
            self.servers = [four, six]
            break
        if not self.servers:  # no IPv6 loopback here: IPv6 forms are refused by the fence then
            four = Server4(("127.0.0.1", 0), Handler)
            self.port = four.server_address[1]
            self.servers = [four]
        self.threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in self.servers]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def canary() -> Iterator[Canary]:
    """The canary, serving for one test."""
    server = Canary()
    server.start()
    yield server
    server.stop()


class Service:
    """The web service on 127.0.0.1: ``/r?to=URL`` answers 302 to URL, anything else 200 JSON;
    it counts the requests it gets. Reached only through the fence's mapping of :data:`PUBLIC`."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                service.requests.append(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                parts = urlsplit(self.path)
                to = parse_qs(parts.query).get("to")
                if parts.path == "/r" and to:
                    self.send_response(302)
                    self.send_header("Location", to[0])
                    body = b""
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    body = b'{"ok":true}'
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 (the names http.server calls)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def service() -> Iterator[Service]:
    """The loopback web service, serving for one test."""
    server = Service()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(5)


# --- the fake resolver and the fence ---------------------------------------------------------


def is_loopback(address: str) -> bool:
    """Whether ``address`` is on 127.0.0.0/8 or ::1 (an IPv4-mapped loopback counts)."""
    ip: Any = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


def fake_resolve(host: str, port: int) -> list[str]:
    """Test DNS: numeric spellings decoded as the C library does (``inet_aton``, no lookup),
    :data:`SERVICE` to :data:`PUBLIC`, the names of :data:`NAMES` and ``internal-N`` names as
    given; any other name to loopback."""
    name = host.lower().rstrip(".")
    try:
        return [socket.inet_ntoa(socket.inet_aton(name))]
    except OSError:
        pass
    if name == SERVICE:
        return [PUBLIC]
    if name in NAMES:
        return NAMES[name]
    if name.startswith("internal-") and name.endswith(".example.test"):
        return [list(INTERNAL)[int(name.split("-")[1].split(".")[0])]]
    return ["127.0.0.1"]


@dataclass
class Fence(httpcore.SyncBackend):
    """The socket layer under the guard's pinned backend: records every connect it is asked
    for; connects to loopback for real, to :data:`PUBLIC` as the loopback web service, and to
    nothing else."""

    service_port: int = 0
    attempts: list[tuple[str, int]] = field(default_factory=list)
    refused: list[tuple[str, int]] = field(default_factory=list)

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        self.attempts.append((host, port))
        if host == PUBLIC and port == 80:
            return super().connect_tcp("127.0.0.1", self.service_port, timeout, local_address, socket_options)
        if is_loopback(host):
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        self.refused.append((host, port))
        raise httpcore.ConnectError("the test fence connects to loopback only")

    def to_loopback(self) -> list[tuple[str, int]]:
        """The connects made to anything but the web service: what a guard failure looks like."""
        return [(host, port) for host, port in self.attempts if host != PUBLIC]


class FencedTransport(guard.PinnedTransport):
    """The worker's pinned transport, its sockets made by :class:`Fence`."""

    def __init__(self, ssl_context: Any, fence: Fence) -> None:
        super().__init__(ssl_context)
        backend = guard.PinnedBackend()
        backend._inner = fence  # the pinning stays the guard's; only the socket layer is the test's
        self._pool = httpcore.ConnectionPool(ssl_context=ssl_context, network_backend=backend)


# --- the hub ---------------------------------------------------------------------------------


@dataclass
class Hub:
    """The API (tenant ``a``) and a worker in this process, guard on unless told otherwise."""

    api: Api
    database_url: str
    canary: Canary
    service: Service
    fence: Fence

    def url(self, host: str, path: str = "/canary") -> str:
        """``http://host:<canary port>path``."""
        return f"http://{host}:{self.canary.port}{path}"

    def connection(self, name: str, base_url: str, *, allowed: list[str] | None = None,
                   template: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        hosts = {"allowed_hosts": allowed} if allowed else {}
        return make_connection(self.api, template, name=name, base_url=base_url, **hosts, **extra)

    def submit(self, body: dict[str, Any]) -> str:
        response = self.api.client.post("/v1/executions", json=body, headers=self.api.headers())
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def runtime(self, *, guard_on: bool = True) -> Any:
        settings = test_settings(self.database_url, allow_private_destinations=not guard_on, allow_http=True,
                                 callback_attempts=1, token_attempts=1, default_max_attempts=1)
        transport = FencedTransport(tls.context(settings), self.fence)
        return in_process_runtime(settings, self.api.engine, transport, fake_resolve)

    def run(self, job_id: str, *, guard_on: bool = True) -> dict[str, Any]:
        runtime = self.runtime(guard_on=guard_on)
        with runtime.client:
            run_job(job_id, runtime)
        return self.shown(job_id)

    def deliver(self, job_id: str, *, guard_on: bool = True) -> None:
        runtime = self.runtime(guard_on=guard_on)
        with runtime.client:
            deliver(job_id, runtime)

    def shown(self, job_id: str) -> dict[str, Any]:
        response = self.api.client.get(f"/v1/executions/{job_id}", headers=self.api.headers())
        assert response.status_code == 200, response.text
        return dict(response.json())

    def assert_blocked(self, job: dict[str, Any]) -> None:
        """The job failed with the guard's code, and nothing but the web service was reached."""
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "blocked_destination", job["error"]
        self.assert_untouched()

    def assert_untouched(self) -> None:
        assert self.canary.connections == 0
        assert self.fence.to_loopback() == []
        assert self.fence.refused == []


@pytest.fixture
def hub(api: Api, database_url: str, canary: Canary, service: Service) -> Hub:
    return Hub(api, database_url, canary, service, Fence(service_port=service.port))


def hostname(url: str) -> str:
    return urlsplit(url).hostname or ""


LOOPBACK_IDS = list(LOOPBACK_HOSTS.values())


# --- connections' base URLs and allowed hosts ------------------------------------------------


@pytest.mark.parametrize("host", list(LOOPBACK_HOSTS), ids=LOOPBACK_IDS)
def test_a_base_url_on_loopback_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given a connection whose base URL is loopback in some spelling, and a stored relative request
    connection = hub.connection("c", hub.url(host, "/api"))
    make_request(hub.api, connection, name="r", url="/items", query={})
    # When a job of it is submitted through the API and run with the guard on
    job = hub.run(hub.submit({"connection": "c", "request": "r"}))
    # Then it failed blocked_destination, and the canary saw no connection
    hub.assert_blocked(job)


@pytest.mark.parametrize("host", list(LOOPBACK_HOSTS), ids=LOOPBACK_IDS)
def test_a_loopback_allowed_host_in_an_adhoc_url_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given a connection to the web service that also lists a loopback host among its allowed hosts
    target = hub.url(host)
    hub.connection("c", f"http://{SERVICE}", allowed=[SERVICE, hostname(target)])
    # When an ad-hoc request to that host is submitted and run
    job = hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": target}}))
    # Then it is refused by the guard, not by the allowed hosts, and nothing was reached
    hub.assert_blocked(job)
    assert "non-public" in job["error"]["message"]


@pytest.mark.parametrize("host", list(LOOPBACK_HOSTS), ids=LOOPBACK_IDS)
def test_a_stored_absolute_url_on_loopback_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given a stored request with an absolute loopback URL among the connection's allowed hosts
    target = hub.url(host, "/admin?x=1")
    connection = hub.connection("c", f"http://{SERVICE}", allowed=[SERVICE, hostname(target)])
    make_request(hub.api, connection, name="r", url=target, query={})
    # When it runs
    job = hub.run(hub.submit({"connection": "c", "request": "r"}))
    # Then it is blocked and the canary untouched
    hub.assert_blocked(job)


@pytest.mark.parametrize("index", range(len(INTERNAL)), ids=list(INTERNAL.values()))
def test_a_name_resolving_to_an_internal_address_ends_in_blocked_destination(hub: Hub, index: int) -> None:
    # Given a connection whose host resolves (fake DNS) to an internal address
    connection = hub.connection("c", f"http://internal-{index}.example.test/api")
    make_request(hub.api, connection, name="r", url="/items", query={})
    # When a job runs, then the guard refused it, and the fence was never asked to connect
    hub.assert_blocked(hub.run(hub.submit({"connection": "c", "request": "r"})))
    assert hub.fence.attempts == []


@pytest.mark.parametrize("host", list(INTERNAL_LITERALS), ids=list(INTERNAL_LITERALS.values()))
def test_an_internal_address_literal_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given an ad-hoc request to an internal address spelt in the URL, among the allowed hosts
    target = f"http://{host}/latest/meta-data/"
    hub.connection("c", f"http://{SERVICE}", allowed=[SERVICE, hostname(target)])
    # When it runs, then it is blocked before any connect
    hub.assert_blocked(hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": target}})))
    assert hub.fence.attempts == []


# --- redirects -------------------------------------------------------------------------------

REDIRECT_TARGETS = {
    **{f"http://{host}:{{port}}/canary": f"loopback-{name}" for host, name in LOOPBACK_HOSTS.items()},
    **{f"http://{host}/latest/meta-data/": f"internal-{name}" for host, name in INTERNAL_LITERALS.items()},
    "http://internal-3.example.test/latest/meta-data/": "name-to-metadata",
}


@pytest.mark.parametrize("location", list(REDIRECT_TARGETS), ids=list(REDIRECT_TARGETS.values()))
def test_a_redirect_to_an_internal_destination_ends_in_blocked_destination(hub: Hub, location: str) -> None:
    # Given the web service answers 302 to a loopback or internal URL, a host the connection allows
    target = location.format(port=hub.canary.port)
    hub.connection("c", f"http://{SERVICE}", allowed=[SERVICE, hostname(target)])
    # When a request that gets that answer runs
    job = hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/r", "query": {"to": target}}}))
    # Then the first hop reached the service once, and the second was refused: by the guard, or,
    # for an octal spelling, by httpx, which will not parse such a Location (protocol_error)
    assert len(hub.service.requests) == 1
    if "0177." in location or "0251." in location:
        assert (job["status"], job["error"]["code"]) == ("failed", "protocol_error"), job
        hub.assert_untouched()
        return
    hub.assert_blocked(job)
    assert "non-public" in job["error"]["message"]


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "169.254.169.254"], ids=["ipv4", "ipv6", "metadata"])
def test_a_redirect_to_a_host_not_allowed_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given a redirect to a host the connection does not list
    target = f"http://{host}:{hub.canary.port}/canary"
    hub.connection("c", f"http://{SERVICE}")
    job = hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/r", "query": {"to": target}}}))
    # Then it is refused by the allowed hosts, before any lookup or connect
    hub.assert_blocked(job)
    assert "allowed hosts" in job["error"]["message"]


# --- OAuth token URLs ------------------------------------------------------------------------


def oauth_connection(hub: Hub, token_url: str, *, base_url: str | None = None) -> None:
    template = make_template(hub.api, name="oauth", auth_type="oauth2")
    hub.connection("c", base_url or f"http://{SERVICE}", template=template, oauth2={
        "grant_type": "client_credentials", "token_url": token_url, "client_id": "hub",
        "client_secret": "{{secrets.client_secret}}"})
    response = hub.api.client.put("/v1/connections/c/secrets/client_secret", json={"value": "s3cr3t-canary"},
                                  headers=hub.api.headers())
    assert response.status_code == 204, response.text


@pytest.mark.parametrize("host", list(LOOPBACK_HOSTS), ids=LOOPBACK_IDS)
def test_a_token_url_on_loopback_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given an OAuth connection whose token URL is loopback in some spelling
    oauth_connection(hub, hub.url(host, "/token"))
    # When its token request (CONNECTAUTH) runs, then it is blocked and the canary untouched
    hub.assert_blocked(hub.run(hub.submit({"connection": "c", "action": "auth"})))


@pytest.mark.parametrize("host", ["127.0.0.1", "2130706433", "[::ffff:127.0.0.1]", "rebind.example.test"],
                         ids=["dotted", "decimal", "mapped", "name-to-public-and-127"])
def test_a_request_whose_token_url_is_loopback_ends_in_blocked_destination(hub: Hub, host: str) -> None:
    # Given an OAuth connection to the public web service whose token URL is loopback
    oauth_connection(hub, hub.url(host, "/token"))
    # When a request of it runs, then the token request is blocked, and so is the job
    hub.assert_blocked(hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/items"}})))
    assert hub.service.requests == []


# --- callback URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("host", list(LOOPBACK_HOSTS), ids=LOOPBACK_IDS)
def test_a_callback_url_on_loopback_is_never_called(hub: Hub, host: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a job of the web service whose callback URL is loopback in some spelling
    hub.connection("c", f"http://{SERVICE}")
    job_id = hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/items"},
                         "callback_url": hub.url(host, "/hook")})
    assert hub.run(job_id)["status"] == "succeeded"
    # When its callback is delivered (one attempt allowed)
    with caplog.at_level(logging.INFO, logger="hub.worker"):
        hub.deliver(job_id)
    # Then the guard refused it, the callback failed, and the canary saw nothing
    assert f"job {job_id} callback failed attempt=1 outcome=blocked_destination" in caplog.text
    assert hub.shown(job_id)["callback_state"] == "failed"
    hub.assert_untouched()


# --- refused at submission -------------------------------------------------------------------

SUBMISSION_REFUSALS = {
    "adhoc-metadata": ({"adhoc": {"method": "GET", "url": "http://169.254.169.254/latest/meta-data/"}},
                       "host_not_allowed"),
    "adhoc-loopback": ({"adhoc": {"method": "GET", "url": "http://127.0.0.1:{port}/canary"}}, "host_not_allowed"),
    "adhoc-ipv6": ({"adhoc": {"method": "GET", "url": "http://[::1]:{port}/canary"}}, "host_not_allowed"),
    "adhoc-userinfo": ({"adhoc": {"method": "GET", "url": f"http://{SERVICE}@127.0.0.1:{{port}}/"}},
                       "host_not_allowed"),
    "adhoc-backslash-userinfo": ({"adhoc": {"method": "GET", "url": f"http://{SERVICE}\\@127.0.0.1:{{port}}/"}},
                                 "host_not_allowed"),
    "adhoc-fragment-at": ({"adhoc": {"method": "GET", "url": f"http://127.0.0.1:{{port}}#@{SERVICE}/"}},
                          "host_not_allowed"),
    "adhoc-host-path-param": ({"adhoc": {"method": "GET", "url": "http://{h}/x"}, "path_params": {"h": "127.0.0.1"}},
                              "host_not_allowed"),
    "adhoc-host-suffix-param": ({"adhoc": {"method": "GET", "url": f"http://{SERVICE}{{{{vars.s}}}}/x"},
                                 "variables": {"s": "@127.0.0.1"}}, "host_not_allowed"),
    "adhoc-gopher": ({"adhoc": {"method": "GET", "url": "gopher://127.0.0.1:6379/_FLUSHALL"}}, "scheme_not_allowed"),
    "adhoc-file": ({"adhoc": {"method": "GET", "url": "file:///etc/passwd"}}, "scheme_not_allowed"),
    "adhoc-dict": ({"adhoc": {"method": "GET", "url": "dict://127.0.0.1:11211/stats"}}, "scheme_not_allowed"),
    "callback-file": ({"adhoc": {"method": "GET", "url": "/x"}, "callback_url": "file:///etc/passwd"},
                      "validation_error"),
    "callback-gopher": ({"adhoc": {"method": "GET", "url": "/x"}, "callback_url": "gopher://127.0.0.1:6379/_x"},
                        "validation_error"),
    "callback-no-host": ({"adhoc": {"method": "GET", "url": "/x"}, "callback_url": "http:///hook"},
                         "validation_error"),
    "callback-relative": ({"adhoc": {"method": "GET", "url": "/x"}, "callback_url": "//127.0.0.1/hook"},
                          "validation_error"),
}


def with_port(value: Any, port: int) -> Any:
    """``value`` with ``{port}`` in its strings replaced by ``port``."""
    if isinstance(value, str):
        return value.replace("{port}", str(port))
    if isinstance(value, dict):
        return {key: with_port(item, port) for key, item in value.items()}
    return value


@pytest.mark.parametrize("case", list(SUBMISSION_REFUSALS))
def test_a_submission_to_a_destination_it_may_not_name_is_refused(hub: Hub, case: str) -> None:
    # Given a connection to the web service only
    hub.connection("c", f"http://{SERVICE}")
    body, code = SUBMISSION_REFUSALS[case]
    # When a submission names a destination it may not, then it is refused with its code, nothing queued
    response = hub.api.client.post("/v1/executions", json={"connection": "c", **with_port(body, hub.canary.port)},
                                   headers=hub.api.headers())
    assert_problem(response, 422, code)
    assert hub.api.queue.sent == []
    hub.assert_untouched()


CREATION_REFUSALS = {
    "base-url-gopher": ({"base_url": "gopher://127.0.0.1:6379/"}, "scheme_not_allowed"),
    "base-url-file": ({"base_url": "file:///etc/passwd"}, "scheme_not_allowed"),
    "base-url-no-host": ({"base_url": "http:///x"}, "invalid_url"),
}


@pytest.mark.parametrize("case", list(CREATION_REFUSALS))
def test_a_connection_to_a_destination_it_may_not_name_is_refused(hub: Hub, case: str) -> None:
    template = make_template(hub.api)
    overrides, code = CREATION_REFUSALS[case]
    response = hub.api.client.post("/v1/connections", json={"name": "c", "template_id": template["id"], **overrides},
                                   headers=hub.api.headers())
    assert_problem(response, 422, code)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://127.0.0.1:6379/_x", "http:///token"],
                         ids=["file", "gopher", "no-host"])
def test_a_token_url_it_may_not_name_is_refused(hub: Hub, url: str) -> None:
    template = make_template(hub.api, name="oauth", auth_type="oauth2")
    response = hub.api.client.post("/v1/connections", headers=hub.api.headers(), json={
        "name": "c", "template_id": template["id"], "base_url": f"http://{SERVICE}",
        "oauth2": {"grant_type": "client_credentials", "token_url": url, "client_id": "hub",
                   "client_secret": "{{secrets.client_secret}}"}})
    assert response.status_code == 422, response.text
    assert response.json()["code"] in ("scheme_not_allowed", "invalid_url")


# --- controls: with the guard off, the same paths reach the canary ---------------------------


@pytest.mark.parametrize("host", ["127.1", "2130706433", "[::ffff:127.0.0.1]", "loopback.example.test"],
                         ids=["short", "decimal", "mapped", "name-to-127"])
def test_control_with_the_guard_off_a_stored_request_reaches_the_canary(hub: Hub, host: str) -> None:
    connection = hub.connection("c", hub.url(host, "/api"))
    make_request(hub.api, connection, name="r", url="/items", query={})
    job = hub.run(hub.submit({"connection": "c", "request": "r"}), guard_on=False)
    assert job["status"] == "succeeded", job
    assert hub.canary.connections == 1


def test_control_with_the_guard_off_a_redirect_reaches_the_canary(hub: Hub) -> None:
    target = hub.url("127.0.0.1")
    hub.connection("c", f"http://{SERVICE}", allowed=[SERVICE, "127.0.0.1"])
    job = hub.run(hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/r", "query": {"to": target}}}),
                  guard_on=False)
    assert job["status"] == "succeeded", job
    assert (len(hub.service.requests), hub.canary.connections) == (1, 1)


def test_control_with_the_guard_off_a_token_request_reaches_the_canary(hub: Hub) -> None:
    oauth_connection(hub, hub.url("0x7f000001", "/token"))
    job = hub.run(hub.submit({"connection": "c", "action": "auth"}), guard_on=False)
    assert job["status"] == "failed" and job["error"]["code"] == "token_request_failed", job  # the canary is no OAuth server
    assert hub.canary.connections == 1


def test_control_with_the_guard_off_a_callback_reaches_the_canary(hub: Hub) -> None:
    hub.connection("c", f"http://{SERVICE}")
    job_id = hub.submit({"connection": "c", "adhoc": {"method": "GET", "url": "/items"},
                         "callback_url": hub.url("localhost", "/hook")})
    assert hub.run(job_id)["status"] == "succeeded"
    hub.deliver(job_id, guard_on=False)
    assert hub.canary.connections == 1
    assert hub.shown(job_id)["callback_state"] == "delivered"
