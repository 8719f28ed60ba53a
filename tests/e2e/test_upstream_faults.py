"""Issue 8's fault matrix, the upstream's part: web services that reset connections, hang,
trickle or answer garbage, and a token endpoint that is down, then back, against the real
stack (API, two worker processes, beat) on a database and a queue of its own.

The faulty services are a raw-socket server in the test process, on loopback only: one path
per behaviour on one port, and a port of its own for each behaviour that never reads the
request (the connection is all it can count) and for the token endpoint (so that it can be
closed and opened again). It counts every connection and request per behaviour.

For every behaviour each job is checked as a user would check it: its final state and error
code through the API, the same in its database row, its attempts, and how many calls the
service saw, against what the retry policy allows (``worker/retries.py``: only connect
errors and 429/502/503/504 are retried, and only for repeatable requests). Afterwards no job
is left waiting or running, and the workers still run a normal job.
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlmodel import col

from models.tables import Job
from tests import processes
from tests.conftest import _normalize
from tests.e2e.delivery_stack import FINAL, TIMINGS, DeliveryStack, fresh_database, running_stack, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DEADLINE_S = float(TIMINGS["HUB_REQUEST_DEADLINE_S"])
MAX_ATTEMPTS = int(TIMINGS["HUB_DEFAULT_MAX_ATTEMPTS"])
TOKEN_ATTEMPTS = 3
"""``HUB_TOKEN_ATTEMPTS``: the worker's tries of one token request (the default)."""
TRICKLE_S = 0.5
"""A trickling service sends one byte this often, each within the read timeout, for far
longer than the deadline."""

SILENT, RESET_ON_ACCEPT, REFUSED = "silent", "reset-on-accept", "refused"
"""Behaviours with a port of their own: one that never reads the request, one that resets
each connection as it accepts it, and one where nothing listens."""


# -- the faulty services ---------------------------------------------------------------------------


@dataclass
class Seen:
    """One request a fault server read."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST instead of a FIN (``SO_LINGER`` 0)."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        conn.close()


def _read_request(conn: socket.socket) -> Seen | None:
    """The request on ``conn``, its body read per ``Content-Length``; None if the client went away."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk or len(data) > 1 << 20:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return Seen(method, target.split("?", 1)[0], headers, body[:length])


def _answer(status: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A well-formed response that closes the connection."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class FaultServer:
    """Faulty web services on 127.0.0.1, each connection served by a thread of its own.

    The main port routes ``/{behaviour}/{job}`` to :attr:`BEHAVIOURS` after reading the
    request; ``reset-on-accept`` resets and ``silent`` holds every connection without reading
    a byte; ``token`` is an OAuth 2.0 token endpoint that can be told to fail, or closed. A
    request to ``/protected/{job}`` on the main port gets 200 with a token that ``token``
    issued, else 401. Connections held open are let go when the server stops.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.seen: list[Seen] = []
        self.connections: Counter[str] = Counter()
        self.token_mode = "up"
        self.token_fail_next = 0
        self.token_requests: list[str] = []
        """How each token request was answered: ``up``, ``503`` or ``hang``."""
        self.token_in_flight = 0
        self.token_most_in_flight = 0
        self.issued: set[str] = set()
        self._listeners: dict[str, tuple[socket.socket, threading.Event]] = {}
        self._threads: list[threading.Thread] = []
        self._serves: dict[str, Callable[[socket.socket], None]] = {
            "main": self._serve_main, RESET_ON_ACCEPT: _reset, SILENT: self.hold, "token": self._serve_token}
        self.ports: dict[str, int] = {}
        for name in self._serves:
            self._listen(name)

    def url(self, name: str = "main") -> str:
        """The base URL of the listener ``name``."""
        return f"http://127.0.0.1:{self.ports[name]}"

    # -- listeners --

    def _listen(self, name: str) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.ports.get(name, 0)))
        listener.listen(64)
        listener.settimeout(0.1)
        self.ports[name] = listener.getsockname()[1]
        closed = threading.Event()
        self._listeners[name] = (listener, closed)
        self._start(self._accept, name, listener, closed, self._serves[name])

    def close(self, name: str) -> None:
        """Stop listening on ``name``'s port: connecting to it is refused until :meth:`reopen`."""
        listener, closed = self._listeners.pop(name)
        closed.set()
        listener.close()

    def reopen(self, name: str) -> None:
        """Listen on ``name``'s port again."""
        self._listen(name)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, name: str, listener: socket.socket, closed: threading.Event,
                serve: Callable[[socket.socket], None]) -> None:
        while not closed.is_set() and not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                self.connections[name] += 1
            conn.settimeout(10)
            self._start(self._guarded, serve, conn)

    @staticmethod
    def _guarded(serve: Callable[[socket.socket], None], conn: socket.socket) -> None:
        try:
            serve(conn)
        except OSError:  # the worker gave up and closed its end
            pass
        finally:
            conn.close()

    def hold(self, conn: socket.socket) -> None:
        """Keep the connection open, answering nothing, until the server stops."""
        self.stopping.wait()

    def stop(self) -> None:
        """Close every listener and every connection held open; wait for the threads (bounded)."""
        self.stopping.set()
        for name in list(self._listeners):
            self.close(name)
        for thread in self._threads:
            thread.join(2)

    # -- what it saw --

    def calls(self, path: str) -> list[Seen]:
        """The requests read for ``path``."""
        with self.lock:
            return [seen for seen in self.seen if seen.path == path]

    # -- the main port --

    def _serve_main(self, conn: socket.socket) -> None:
        seen = _read_request(conn)
        if seen is None:
            return
        with self.lock:
            self.seen.append(seen)
        behaviour = seen.path.strip("/").split("/", 1)[0]
        if behaviour == "protected":
            with self.lock:
                granted = seen.headers.get("authorization", "").removeprefix("Bearer ") in self.issued
            conn.sendall(_answer("200 OK", b'{"ok": true}') if granted else _answer("401 Unauthorized", b""))
            return
        BEHAVIOURS[behaviour].serve(self, conn)

    def trickle(self, conn: socket.socket, first: bytes, byte: bytes) -> None:
        """Send ``first``, then ``byte`` every :data:`TRICKLE_S` for 20 s or until the worker leaves."""
        conn.sendall(first)
        ends = time.monotonic() + 20
        while time.monotonic() < ends and not self.stopping.wait(TRICKLE_S):
            conn.sendall(byte)

    # -- the token endpoint --

    def set_token(self, mode: str, *, fail_next: int = 0) -> None:
        """How the token endpoint answers from now on: ``up``, ``503`` or ``hang``, after
        ``fail_next`` answers of 503."""
        with self.lock:
            self.token_mode, self.token_fail_next = mode, fail_next

    def _serve_token(self, conn: socket.socket) -> None:
        """Answer a token request as :attr:`token_mode` says: ``up`` (a token), ``503``, or
        ``hang`` (no answer until the worker gives up); the next :attr:`token_fail_next`
        requests get 503 whatever the mode."""
        seen = _read_request(conn)
        if seen is None:
            return
        with self.lock:
            self.token_in_flight += 1
            self.token_most_in_flight = max(self.token_most_in_flight, self.token_in_flight)
            mode = "503" if self.token_fail_next > 0 else self.token_mode
            self.token_fail_next = max(0, self.token_fail_next - 1)
        try:
            time.sleep(0.1)  # a window in which a second, concurrent token request would show
            if mode == "hang":
                conn.recv(1)  # until the worker closes its end (or 10 s)
                answer = b""
            elif mode == "503":
                answer = _answer("503 Service Unavailable", b'{"error": "temporarily_unavailable"}')
            else:
                token = f"fault-at-{random.getrandbits(64):016x}"
                with self.lock:
                    self.issued.add(token)
                answer = _answer("200 OK", json.dumps({"access_token": token, "token_type": "Bearer",
                                                       "expires_in": 3600}).encode(),
                                 {"Content-Type": "application/json"})
            with self.lock:
                self.token_requests.append(mode)
            conn.sendall(answer)
        finally:
            with self.lock:
                self.token_in_flight -= 1


@dataclass(frozen=True)
class Behaviour:
    """One fault: how the service treats a request it read, and how the hub should end the job."""

    serve: Callable[[FaultServer, socket.socket], None]
    status: str
    code: str | None
    """The job's ``error.code`` (None: succeeded, ``result_status`` the answer's status)."""
    result_status: int | None = None


def _after(seconds: float, then: Callable[[socket.socket], None]) -> Callable[[FaultServer, socket.socket], None]:
    def serve(server: FaultServer, conn: socket.socket) -> None:
        server.stopping.wait(seconds)
        then(conn)

    return serve


def _send(raw: bytes, *, reset: bool = False) -> Callable[[FaultServer, socket.socket], None]:
    def serve(server: FaultServer, conn: socket.socket) -> None:
        conn.sendall(raw)
        if reset:
            time.sleep(0.2)
            _reset(conn)

    return serve


_HUGE_HEADERS = b"".join(b"X-Pad-%06d: %s\r\n" % (n, b"a" * 1000) for n in range(1024))  # 1 MB
_JUNK = random.Random(8).randbytes(4096)

BEHAVIOURS: dict[str, Behaviour] = {
    # resets: not retried (the service may have acted on the request), whatever the method
    "reset-after-read": Behaviour(_after(0, _reset), "failed", "connection_reset"),
    "reset-mid-response": Behaviour(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100, reset=True),
                                    "failed", "connection_reset"),
    # hangs and trickles: cut at the deadline, not retried
    "hang": Behaviour(lambda server, conn: server.hold(conn), "failed", "read_timeout"),
    "trickle-body": Behaviour(lambda server, conn: server.trickle(
        conn, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x"), "failed", "read_timeout"),
    "trickle-headers": Behaviour(lambda server, conn: server.trickle(
        conn, b"HTTP/1.1 200 OK\r\nX-Trickle: ", b"x"), "failed", "read_timeout"),
    # garbage: not HTTP, not retried
    "bad-status-line": Behaviour(_send(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"), "failed", "protocol_error"),
    "header-without-colon": Behaviour(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-No-Colon\r\n\r\nok"),
                                      "failed", "protocol_error"),
    "binary-junk": Behaviour(_send(_JUNK), "failed", "protocol_error"),
    "huge-headers": Behaviour(_send(b"HTTP/1.1 200 OK\r\n" + _HUGE_HEADERS + b"Content-Length: 0\r\n\r\n"),
                              "failed", "protocol_error"),
    "length-short": Behaviour(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"),
                              "failed", "protocol_error"),
    "length-negative": Behaviour(_send(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello"),
                                 "failed", "protocol_error"),
    "bad-chunked": Behaviour(_send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
                             "failed", "protocol_error"),
    # more body than announced: the announced part is the answer, the rest is never read
    "length-long": Behaviour(_send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello, and more"),
                             "succeeded", None, 200),
}
"""The main port's behaviours, by the first segment of the path."""

VARIANTS = {"get": ("get", None), "post": ("post", None), "post-key": ("post", "fault-key")}
"""Each behaviour gets three jobs: a GET, a POST, and a POST with an Idempotency-Key (the
one POST the policy would let the hub repeat)."""


# -- the stack -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faults() -> Iterator[FaultServer]:
    """The fault server, stopped (and every held connection let go) after the module."""
    server = FaultServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def hub(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryStack]:
    """API, two workers of two slots each and beat, on a fresh database and queue."""
    logs = tmp_path_factory.mktemp("faults")
    with fresh_database(logs) as database_url, running_stack(redis_url, database_url, logs) as stack:
        yield stack


def _create(client: httpx.Client, name: str, base_url: str, *, oauth2: dict[str, Any] | None = None) -> None:
    """A template, a connection ``name`` to ``base_url`` and its two studio requests, ``get``
    and ``post`` of ``/{fault}/{job}``, made through the API."""
    template = client.post("/v1/templates", json={"name": name, "service_name": "Faulty",
                                                  "auth_type": "oauth2" if oauth2 else "none",
                                                  "verbs": ["GET", "POST"]})
    assert template.status_code == 201, template.text
    created = client.post("/v1/connections", json={"name": name, "template_id": template.json()["id"],
                                                   "base_url": base_url, "oauth2": oauth2})
    assert created.status_code == 201, created.text
    for method in ("GET", "POST"):
        stored = client.post(f"/v1/connections/{name}/requests", json={
            "name": method.lower(), "kind": "studio", "method": method, "url": "/{fault}/{job}",
            "body": {"order": 1} if method == "POST" else None})
        assert stored.status_code == 201, stored.text


def _oauth_connection(client: httpx.Client, faults: FaultServer, name: str) -> None:
    """A connection ``name`` to the fault server whose token comes from its token endpoint
    (client credentials, the secret stored through the API)."""
    _create(client, name, faults.url(), oauth2={
        "grant_type": "client_credentials", "token_url": f"{faults.url('token')}/token", "client_id": "fault-client",
        "client_secret": "{{secrets.client_secret}}", "client_auth_method": "client_secret_basic", "scope": "api"})
    stored = client.put(f"/v1/connections/{name}/secrets/client_secret", json={"value": "fault-secret"})
    assert stored.status_code == 204, stored.text


def _submit(client: httpx.Client, connection: str, fault: str, job: str, variant: str) -> str:
    """Submit the job ``job`` of ``fault`` as ``variant`` (see :data:`VARIANTS`); its id."""
    request, key = VARIANTS[variant]
    headers = {"Idempotency-Key": f"{key}-{fault}-{job}"} if key else {}
    submitted = client.post("/v1/executions", headers=headers, json={
        "connection": connection, "request": request, "path_params": {"fault": fault, "job": job}})
    assert submitted.status_code == 202, submitted.text
    job_id: str = submitted.json()["id"]
    return job_id


def _rows(stack: DeliveryStack, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The jobs' rows, read from the stack's database directly."""
    engine = sa.create_engine(_normalize(stack.env["HUB_DATABASE_URL"]))
    try:
        with engine.connect() as connection:
            found = connection.execute(
                sa.select(col(Job.id), col(Job.status), col(Job.attempts), col(Job.error), col(Job.lease_until))
                .where(col(Job.id).in_(ids))).mappings().all()
    finally:
        engine.dispose()
    return {row["id"]: dict(row) for row in found}


def _left_in_flight(stack: DeliveryStack) -> int:
    """Jobs of the stack's database still waiting or running."""
    engine = sa.create_engine(_normalize(stack.env["HUB_DATABASE_URL"]))
    try:
        with engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(Job)
                                          .where(col(Job.status).in_(("queued", "running", "retrying")))).scalar_one())
    finally:
        engine.dispose()


def _assert_final(stack: DeliveryStack, jobs: dict[str, dict[str, Any]],
                  expected: dict[str, tuple[str, str | None, int]]) -> None:
    """Each job, through the API and in its row, ended as ``expected`` says: ``(status, error
    code, attempts)``."""
    rows = _rows(stack, list(expected))
    for job_id, (status, code, attempts) in expected.items():
        job, row = jobs[job_id], rows[job_id]
        assert (job["status"], (job["error"] or {}).get("code"), job["attempts"]) == (status, code, attempts), job
        assert (row["status"], (row["error"] or {}).get("code"), row["attempts"]) == (status, code, attempts), row
        assert row["status"] in FINAL and row["lease_until"] is None, row


def _assert_nothing_stuck(stack: DeliveryStack, faults: FaultServer, client: httpx.Client) -> None:
    """No job is left waiting or running, and the workers still run a normal job."""
    assert _left_in_flight(stack) == 0
    job_id = _submit(client, "faulty", "length-long", f"after-{time.monotonic_ns()}", "get")
    job = wait_final(client, [job_id], timeout=20)[job_id]
    assert job["status"] == "succeeded" and job["result"]["body"] == "hello", job
    for worker in ("worker-1", "worker-2"):
        assert "Traceback" not in stack.log(worker), stack.log(worker)[-3000:]


# -- the matrix ------------------------------------------------------------------------------------


@pytest.mark.timeout(80)
def test_every_faulty_upstream_ends_each_job_final_after_the_calls_the_policy_allows(
        hub: DeliveryStack, faults: FaultServer) -> None:
    """Resets, hangs, trickles and garbage, each to a GET, a POST and a POST with an
    Idempotency-Key, all at once: every job ends, with the fault's code, after one attempt and
    one call (none of these is retried); a refused connection is retried as the policy says."""
    # Given connections to the fault server's main port, to its ports that never read, and to
    # a port where nothing listens
    tag = time.monotonic_ns()
    with hub.client() as client:
        _create(client, "faulty", faults.url())
        for name in (SILENT, RESET_ON_ACCEPT):
            _create(client, name, faults.url(name))
        _create(client, REFUSED, f"http://127.0.0.1:{processes.free_port()}")

        # When every behaviour gets its three jobs at once
        ids: dict[tuple[str, str], str] = {}
        started = time.monotonic()
        for fault in [*BEHAVIOURS, SILENT, RESET_ON_ACCEPT, REFUSED]:
            for variant in VARIANTS:
                ids[fault, variant] = _submit(client, fault if fault not in BEHAVIOURS else "faulty", fault,
                                              f"{variant}-{tag}", variant)
        jobs = wait_final(client, list(ids.values()), timeout=60)
        took = time.monotonic() - started

        # Then each job ended as its behaviour says, through the API and in the database, after
        # one attempt: a reset, a timeout or garbage is not retried, whatever the method
        expected: dict[str, tuple[str, str | None, int]] = {}
        for (fault, variant), job_id in ids.items():
            if fault in BEHAVIOURS:
                expected[job_id] = (BEHAVIOURS[fault].status, BEHAVIOURS[fault].code, 1)
            elif fault == SILENT:
                expected[job_id] = ("failed", "read_timeout", 1)
            elif fault == REFUSED:  # a connect error: retried, but never a POST without a key
                expected[job_id] = ("failed", "connection_refused", 1) if variant == "post" else \
                    ("failed", "retries_exhausted", MAX_ATTEMPTS)
        _assert_final(hub, jobs, expected)
        for variant in VARIANTS:
            answered = jobs[ids["length-long", variant]]["result"]
            assert (answered["status_code"], answered["body"]) == (200, "hello"), answered
        for variant in ("get", "post-key"):
            assert jobs[ids[REFUSED, variant]]["error"]["last"]["code"] == "connection_refused"
        # and each hang and trickle was cut at the deadline, not when the service stopped
        for job_id, (_status, code, _attempts) in expected.items():
            if code == "read_timeout":
                assert DEADLINE_S - 0.1 <= _took(jobs[job_id]) < DEADLINE_S + 10, jobs[job_id]

        # and the service read exactly one request per job, with the Idempotency-Key where given
        for fault in BEHAVIOURS:
            for variant, (method, key) in VARIANTS.items():
                calls = faults.calls(f"/{fault}/{variant}-{tag}")
                assert [call.method for call in calls] == [method.upper()], (fault, variant, calls)
                assert calls[0].headers.get("idempotency-key") == (f"{key}-{fault}-{variant}-{tag}" if key else None)
        # and the port that never reads saw one connection per job
        assert faults.connections[SILENT] == len(VARIANTS), faults.connections

        # and a connection reset as it is accepted ended each job either as a failed call (the
        # request may have gone out: not retried) or, when the reset beat the end of the
        # connect, as a connect error, retried as the policy says: one connection per attempt
        reset = {variant: jobs[ids[RESET_ON_ACCEPT, variant]] for variant in VARIANTS}
        _assert_final(hub, jobs, {job["id"]: (job["status"], (job["error"] or {}).get("code"), job["attempts"])
                                  for job in reset.values()})
        for variant, job in reset.items():
            retried = variant != "post"
            assert job["status"] == "failed" and job["attempts"] <= (MAX_ATTEMPTS if retried else 1), job
            assert job["error"]["code"] in ({"connection_reset", "protocol_error"} |
                                            ({"retries_exhausted"} if retried else {"connection_refused"})), job
        assert faults.connections[RESET_ON_ACCEPT] == sum(job["attempts"] for job in reset.values())

        print(f"fault matrix: {len(jobs)} jobs final in {took:.1f} s")

        # and nothing is stuck: no job waits or runs, the workers still answer
        _assert_nothing_stuck(hub, faults, client)


def _took(job: dict[str, Any]) -> float:
    """Seconds from a job's (last) start to its end, as the API shows them."""
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


# -- the token endpoint ----------------------------------------------------------------------------


@pytest.mark.timeout(80)
def test_jobs_fail_while_the_token_endpoint_is_down_and_succeed_once_it_is_back(
        hub: DeliveryStack, faults: FaultServer) -> None:
    """A token endpoint answering 503, then refusing connections, then back after two more
    503s: the jobs sent while it is down fail ``token_request_failed`` after the worker's
    token tries, one token request at a time; once it is back, one token request serves all."""
    # Given a connection whose OAuth token comes from the fault server's token endpoint
    tag = time.monotonic_ns()
    with hub.client() as client:
        _oauth_connection(client, faults, "guarded")

        def run(phase: str) -> dict[str, dict[str, Any]]:
            ids = {_submit(client, "guarded", "protected", f"{phase}-{variant}-{tag}", variant): variant
                   for variant in VARIANTS}
            return wait_final(client, list(ids), timeout=40)

        # When jobs run while the token endpoint answers 503
        faults.set_token("503")
        down = run("down")
        asked_down = len(faults.token_requests)
        # and while it refuses connections
        faults.close("token")
        refused = run("refused")
        asked_refused = len(faults.token_requests)
        # and once it is back, after two more 503s
        faults.reopen("token")
        faults.set_token("up", fail_next=2)
        back = run("back")

        # Then the jobs sent while it was down failed token_request_failed, after one attempt
        # each (a failed token request is not retried as a job), without calling the service
        _assert_final(hub, {**down, **refused}, {job_id: ("failed", "token_request_failed", 1)
                                                 for job_id in [*down, *refused]})
        assert "503" in str([job["error"] for job in down.values()])
        assert "connection_refused" in str([job["error"] for job in refused.values()])
        # and the endpoint got the worker's 3 tries per job while it answered, none while closed
        assert asked_down == TOKEN_ATTEMPTS * len(down), faults.token_requests
        assert asked_refused == asked_down
        # and once back, every job succeeded with the service's 200, on one token request (the
        # third try of the first job; the other jobs waited for its token)
        _assert_final(hub, back, {job_id: ("succeeded", None, 1) for job_id in back})
        assert {job["result"]["status_code"] for job in back.values()} == {200}
        assert faults.token_requests[asked_refused:] == ["503", "503", "up"]
        # and the token endpoint never had two requests at once: one refresh at a time
        assert faults.token_most_in_flight == 1
        # and the protected service saw only the jobs that had a token, once each
        for phase in ("down", "refused", "back"):
            for variant in VARIANTS:
                assert len(faults.calls(f"/protected/{phase}-{variant}-{tag}")) == (phase == "back")

        # and nothing is stuck
        _assert_nothing_stuck(hub, faults, client)


@pytest.mark.timeout(60)
def test_a_token_endpoint_that_never_answers_fails_the_job_token_request_failed(
        hub: DeliveryStack, faults: FaultServer) -> None:
    """A token endpoint that takes token requests and never answers: the job's token tries
    are each cut at the deadline, and the job fails ``token_request_failed`` after one
    attempt, not ``worker_lost`` while its worker still waits for the token."""
    # Given a connection whose token endpoint never answers
    tag = time.monotonic_ns()
    with hub.client() as client:
        _oauth_connection(client, faults, "hung")
        faults.set_token("hang")
        before = len(faults.token_requests)
        try:
            # When a POST runs (the one request the sweeper will not send again)
            job_id = _submit(client, "hung", "protected", f"hang-post-{tag}", "post")
            job = wait_final(client, [job_id], timeout=40)[job_id]
        finally:
            faults.set_token("up")

        # Then it failed token_request_failed, after its one attempt and the worker's token tries,
        # each cut at the deadline; the service saw no call
        _assert_final(hub, {job_id: job}, {job_id: ("failed", "token_request_failed", 1)})
        assert faults.token_requests[before:] == ["hang"] * TOKEN_ATTEMPTS
        assert _took(job) >= TOKEN_ATTEMPTS * DEADLINE_S
        assert faults.calls(f"/protected/hang-post-{tag}") == []
        _assert_nothing_stuck(hub, faults, client)
