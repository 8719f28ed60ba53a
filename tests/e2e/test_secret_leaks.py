"""Issue 8's secret-leak scan. Distinctive canary values are stored as a connection's secret
(used in a header, the query, the body and a URL path), an OAuth client secret (right and
wrong), a user's password and refresh tokens (one the server issued, one it never did); every
kind of job runs through the real processes (API, two workers, beat, the demo upstream and its
OAuth server, Flower); then each canary is looked for, as is in any letter case and inside
base64, in every place it must never be:

- every API response (status line, headers, body), the job results and lists included;
- every log line of the API, the workers, beat, the upstream and Flower, and every other file
  in the stack's data directory (the SQLite database file itself, when there is one);
- every row of every table; every Redis key and value, sampled while the jobs ran and after;
- the broker's messages, bodies decoded: caught in Redis while no worker ran, sampled while
  the workers sent retries and callbacks, and everything published on Redis (Celery's events,
  the hub's announcements);
- Flower's task API (the list and each task's info) and its workers API;
- the callbacks the hub posted.

The stack logs at DEBUG, in the text format but for one worker, which logs JSON: text keeps
exception messages and tracebacks that JSON cuts to the exception's type (JSON holds the same
message and fields, nothing more), and DEBUG holds every INFO line and more.

Each place is shown to hold what it should (the job ids, the tasks, a planted value), and a
control secret that an echoing service returns is found exactly where job results are kept, so
the scan cannot pass by looking at nothing. The test runs a stack of its own
(``tests/e2e/delivery_stack.py``).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from tests import processes
from tests.conftest import TEST_MASTER_KEY
from tests.e2e.delivery_stack import DeliveryStack, fresh_database, running_stack, wait_final
from tests.e2e.leaks import broker_messages, database_rows, leaks, redis_values

pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.timeout(180)]

STACK_ENV = {
    "HUB_TASK_EVENTS": "true",  # the workers send task events from the start, for Flower
    "HUB_LOG_LEVEL": "DEBUG",  # the API and beat (the workers get --loglevel DEBUG)
    "HUB_TOKEN_BACKOFF_S": "0.1",
}


def canary(kind: str) -> str:
    """A value that turns up nowhere by chance."""
    return f"CANARY-{kind}-{secrets.token_hex(10)}"


# -- what runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of job: its submission, and how it must end."""

    submission: dict[str, Any]
    status: str
    outcome: int | str | None
    """The service's status code for a succeeded job, the error code for a failed one."""
    attempts: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


def plain_kinds(planted: str, relay: str) -> dict[str, Kind]:
    """The jobs on the connection ``plain``, whose secret ``api_key`` goes in a header, the query
    and (some) the body; run while no worker runs at first, so their messages wait in Redis."""
    on = {"connection": "plain"}
    return {
        "success, header and query": Kind({**on, "request": "ok"}, "succeeded", 200, 1),
        "success, body": Kind({**on, "request": "post"}, "succeeded", 201, 1),
        "upstream error 500": Kind({**on, "request": "e500"}, "succeeded", 500, 1),
        "upstream error 404": Kind({**on, "request": "e404"}, "succeeded", 404, 1),
        "retried, then success": Kind({**on, "request": "flaky"}, "succeeded", 200, 3),
        "retries exhausted (503)": Kind({**on, "request": "e503"}, "failed", "retries_exhausted", 3),
        "retries exhausted (POST, Idempotency-Key)": Kind({**on, "request": "post503"}, "failed",
                                                          "retries_exhausted", 3, {"Idempotency-Key": planted}),
        "timeout (timeout_s)": Kind({**on, "request": "slow", "timeout_s": 1}, "failed", "read_timeout", 1),
        "timeout (request deadline)": Kind({**on, "request": "slower"}, "failed", "read_timeout", 1),
        "truncated": Kind({**on, "request": "big"}, "succeeded", 200, 1),
        "connect error, secret in path and query": Kind({**on, "request": "dead"}, "failed", "retries_exhausted", 3),
        "redirect carrying the query": Kind({**on, "request": "hop"}, "succeeded", 200, 1),
        "redirect to a closed port": Kind({**on, "request": "hop-dead"}, "failed", "retries_exhausted", 3),
        "missing secret": Kind({**on, "request": "missing"}, "failed", "secret_missing", 1),
        "secret with a line break in a header": Kind({**on, "request": "crlf"}, "failed", "invalid_header", 1),
        "studio, path parameter and variable": Kind({**on, "request": "studio", "path_params": {"code": "202"},
                                                     "variables": {"since": planted}}, "succeeded", 202, 1),
        "ad hoc": Kind({**on, "adhoc": {"method": "PUT", "url": "/status/204", "headers": {"X-Key": "{{secrets.api_key}}"},
                                        "query": {"k": "{{secrets.api_key}}", "v": "{{vars.v}}"},
                                        "body": {"a": "{{secrets.api_key}}"}}, "variables": {"v": planted}},
                       "succeeded", 204, 1),
        "callback": Kind({**on, "request": "ok", "callback_url": f"{relay}/callback"}, "succeeded", 200, 1),
        "cancelled": Kind({**on, "request": "ok"}, "cancelled", None, 0),
    }


OAUTH_KINDS = {
    "auth, client_credentials": Kind({"connection": "oauth-cc", "action": "auth"}, "succeeded", None, 1),
    "OAuth request": Kind({"connection": "oauth-cc", "request": "items"}, "succeeded", 200, 1),
    "auth, password": Kind({"connection": "oauth-pw", "action": "auth"}, "succeeded", None, 1),
    "OAuth request, password": Kind({"connection": "oauth-pw", "request": "items"}, "succeeded", 200, 1),
    "auth, refresh_token": Kind({"connection": "oauth-rt", "action": "auth"}, "succeeded", None, 1),
    "token failure: invalid client": Kind({"connection": "oauth-badclient", "action": "auth"}, "failed",
                                          "token_request_failed", 1),
    "token failure: invalid client, request": Kind({"connection": "oauth-badclient", "request": "items"}, "failed",
                                                   "token_request_failed", 1),
    "token failure: invalid refresh token": Kind({"connection": "oauth-badrefresh", "action": "auth"}, "failed",
                                                 "token_request_failed", 1),
}
"""OAuth jobs that need no fault of the token server: they run with the others."""

LATER_KINDS = {
    "token failure: token endpoint down": Kind({"connection": "oauth-down", "action": "auth"}, "failed",
                                               "token_request_failed", 1),
    "token failure: the server quotes the credentials": Kind({"connection": "oauth-badrefresh", "action": "auth"},
                                                             "failed", "token_request_failed", 1),
    "revoked token, fetched again": Kind({"connection": "oauth-cc", "request": "items"}, "succeeded", 200, 1),
    "rotated refresh token used": Kind({"connection": "oauth-rt", "action": "auth"}, "succeeded", None, 1),
}
"""OAuth jobs that need the token server set up for them alone: they run one at a time, after."""

CONTROL_KINDS = {
    "control: a service that echoes a secret": Kind({"connection": "control", "request": "echo"}, "succeeded", 200, 1),
}
"""A job whose service answers with the secret it got (``/echo``), as a control: the scan must
find that secret in the job's result, wherever results are kept, and nowhere else."""


# -- a web service of the test's own, and what passes through Redis --------------------------------


class Relay(ThreadingHTTPServer):
    """A web service on loopback: ``/hop`` and ``/hop-dead`` redirect (302) to the demo
    upstream's ``/status/200`` or to a closed port, keeping the query they got (and with it a
    secret); ``/callback`` keeps what the hub posts."""

    redirects: dict[str, str]
    callbacks: list[bytes]


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet."""

    def _handle(self) -> None:
        relay: Relay = self.server  # type: ignore[assignment]
        parts = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers: dict[str, str] = {}
        if parts.path == "/callback":
            relay.callbacks.append(str(self.headers).encode() + body)
            status = 200
        elif parts.path in relay.redirects:
            status, headers = 302, {"Location": f"{relay.redirects[parts.path]}?{parts.query}"}
        else:
            status = 404
        self.send_response(status)
        for name, value in {**headers, "Content-Length": "0"}.items():
            self.send_header(name, value)
        self.end_headers()

    do_GET = do_POST = _handle


@contextmanager
def relay(upstream: str, closed_port: int) -> Iterator[Relay]:
    """A :class:`Relay` serving on 127.0.0.1 while the block runs."""
    server = Relay(("127.0.0.1", 0), _RelayHandler)
    server.daemon_threads = True
    server.redirects = {"/hop": f"{upstream}/status/200", "/hop-dead": f"http://127.0.0.1:{closed_port}/gone"}
    server.callbacks = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextmanager
def watched_redis(url: str, every_s: float = 0.2) -> Iterator[tuple[set[bytes], list[tuple[bytes, bytes]]]]:
    """While the block runs: every key and value seen in Redis by a look every ``every_s``
    (messages that sit in the broker for a moment, such as retries' delayed ones, included),
    and every message published on the server, on any channel (channel, data)."""
    seen: set[bytes] = set()
    published: list[tuple[bytes, bytes]] = []
    stop = threading.Event()
    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.psubscribe("*")

    def sample() -> None:
        while not stop.wait(every_s):
            seen.update(redis_values(url))

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message["type"] == "pmessage":
                published.append((message["channel"], message["data"]))

    threads = [threading.Thread(target=target, daemon=True) for target in (sample, listen)]
    for thread in threads:
        thread.start()
    try:
        yield seen, published
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        pubsub.close()
        client.close()


# -- the stack ------------------------------------------------------------------------------------


def start_workers(stack: DeliveryStack, workers: dict[str, dict[str, str]], concurrency: int = 3) -> None:
    """Start workers logging at DEBUG, all at once, each with its own additions to the
    environment; wait until each is ready."""
    names = tuple(workers)
    for name, env in workers.items():
        log = stack.logs / f"{name}.log"
        stack.started[name] = processes.start(
            [*processes.HUB, "worker", "-c", str(concurrency), "-n", f"{name}@%h", "--loglevel", "DEBUG"],
            {**stack.env, **env}, log)
    for name in names:
        log = stack.logs / f"{name}.log"
        processes.wait_until(partial(_ready, log), name, process=stack.started[name], log=log)


def _ready(log: Path) -> bool:
    return b"ready." in log.read_bytes()


def start_flower(stack: DeliveryStack) -> str:
    """Start Flower (its API open, as ``test_task_events`` has it); its URL, once it answers."""
    port = processes.free_port()
    log = stack.logs / "flower.log"
    stack.started["flower"] = processes.start(
        [*processes.HUB, "flower", "--address", "127.0.0.1", "--port", str(port)],
        {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}, log)
    flower = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.http_ok(f"{flower}/healthcheck"), "Flower",
                         process=stack.started["flower"], log=log)
    return flower


class Responses:
    """Every response the API gave a client, as text: status line, headers, body."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def record(self, response: httpx.Response) -> None:
        """An httpx response hook."""
        response.read()
        head = f"HTTP/1.1 {response.status_code} {response.reason_phrase}\n"
        self.seen.append(head.encode() + repr(response.headers.raw).encode() + b"\n\n" + response.content)


def must(response: httpx.Response, status: int) -> httpx.Response:
    """``response``, after checking its status."""
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    return response


# -- setting it up --------------------------------------------------------------------------------


def set_up_oauth_server(idp: httpx.Client, values: dict[str, str]) -> str:
    """The demo OAuth server, reset, with the client ``hub-client`` and the user ``hub-user``
    whose secret and password are canaries; a refresh token it issued to the client."""
    must(idp.post("/reset"), 200)
    must(idp.post("/clients", json={"client_id": "hub-client", "client_secret": values["client secret"]}), 200)
    must(idp.post("/users", json={"username": "hub-user", "password": values["password"]}), 200)
    issued: str = must(idp.post("/refresh-tokens", json={"client_id": "hub-client"}), 200).json()["refresh_token"]
    return issued


def set_up_plain(hub: httpx.Client, upstream: str, relay: str, closed_port: int, planted: str) -> None:
    """The connection ``plain`` and its stored requests; its secrets are written by the caller."""
    template = must(hub.post("/v1/templates", json={
        "name": "plain", "service_name": "Demo", "verbs": ["GET", "POST", "PUT"],
        "auth_headers": [{"name": "X-Api-Key", "required": True}]}), 201).json()
    must(hub.post("/v1/connections", json={
        "name": "plain", "template_id": template["id"], "base_url": upstream, "description": planted,
        "auth_header_values": {"X-Api-Key": "{{secrets.api_key}}"}}), 201)
    key = {"k": "{{secrets.api_key}}"}
    bearer = {"Authorization": "Bearer {{secrets.api_key}}"}
    stored: dict[str, dict[str, Any]] = {
        "ok": {"method": "GET", "url": "/status/200", "headers": bearer, "query": key},
        "post": {"method": "POST", "url": "/status/201", "query": key, "body": {"key": "{{secrets.api_key}}"}},
        "e500": {"method": "GET", "url": "/status/500", "query": key},
        "e404": {"method": "GET", "url": "/status/404", "query": key},
        "flaky": {"method": "GET", "url": f"/flaky/{secrets.token_hex(4)}/2/503", "headers": bearer, "query": key},
        "e503": {"method": "GET", "url": "/status/503", "query": key},
        "post503": {"method": "POST", "url": "/status/503", "query": key, "body": {"key": "{{secrets.api_key}}"}},
        "slow": {"method": "GET", "url": "/slow/3", "query": key},
        "slower": {"method": "GET", "url": "/slow/6", "query": key},
        "big": {"method": "GET", "url": "/bytes/100000", "query": key},
        "dead": {"method": "GET", "url": f"http://127.0.0.1:{closed_port}/hook/{{{{secrets.api_key}}}}", "query": key},
        "hop": {"method": "GET", "url": f"{relay}/hop", "headers": bearer, "query": key},
        "hop-dead": {"method": "GET", "url": f"{relay}/hop-dead", "query": key},
        "missing": {"method": "GET", "url": "/status/200", "headers": {"X-Other": "{{secrets.nope}}"}},
        "crlf": {"method": "GET", "url": "/status/200", "headers": {"X-Note": "{{secrets.crlf}}"}},
        "studio": {"kind": "studio", "method": "GET", "url": "/status/{code}",
                   "query": {**key, "since": "{{vars.since}}"}},
    }
    for name, request in stored.items():
        must(hub.post("/v1/connections/plain/requests", json={"name": name, **request}), 201)


def set_up_control(hub: httpx.Client, upstream: str) -> None:
    """The connection ``control``, whose one request sends its secret to ``/echo``."""
    template = must(hub.post("/v1/templates", json={"name": "control", "service_name": "Echo", "verbs": ["GET"]}),
                    201).json()
    must(hub.post("/v1/connections", json={"name": "control", "template_id": template["id"], "base_url": upstream}), 201)
    must(hub.post("/v1/connections/control/requests", json={
        "name": "echo", "method": "GET", "url": "/echo/control", "headers": {"X-Control": "{{secrets.control}}"}}), 201)


def set_up_oauth(hub: httpx.Client, upstream: str) -> None:
    """The OAuth connections: each grant that works, a wrong client secret, a refresh token the
    server never issued, and one for a token endpoint that will be down."""
    template = must(hub.post("/v1/templates", json={"name": "oauth", "service_name": "Demo OAuth",
                                                    "auth_type": "oauth2", "verbs": ["GET", "POST"]}), 201).json()
    base = {"token_url": f"{upstream}/oauth/token", "client_id": "hub-client", "scope": "api",
            "client_secret": "{{secrets.client_secret}}"}
    settings = {
        "oauth-cc": {"grant_type": "client_credentials", "client_auth_method": "client_secret_basic"},
        "oauth-pw": {"grant_type": "password", "client_auth_method": "client_secret_post",
                     "username": "hub-user", "password": "{{secrets.password}}"},
        "oauth-rt": {"grant_type": "refresh_token", "client_auth_method": "client_secret_post",
                     "refresh_token": "{{secrets.refresh_token}}"},
        "oauth-badclient": {"grant_type": "client_credentials", "client_auth_method": "client_secret_basic"},
        "oauth-badrefresh": {"grant_type": "refresh_token", "client_auth_method": "client_secret_basic",
                             "refresh_token": "{{secrets.refresh_token}}"},
        "oauth-down": {"grant_type": "client_credentials", "client_auth_method": "client_secret_post"},
    }
    for name, oauth2 in settings.items():
        must(hub.post("/v1/connections", json={"name": name, "template_id": template["id"], "base_url": upstream,
                                               "oauth2": {**base, **oauth2}}), 201)
        must(hub.post(f"/v1/connections/{name}/requests",
                      json={"name": "items", "method": "GET", "url": "/oauth/protected/items"}), 201)


def write_secrets(hub: httpx.Client, upstream: str, values: dict[str, str], control: str) -> dict[str, int]:
    """Store each canary where it belongs, as the connections' secrets (and the control's own);
    try writes the API must refuse, each carrying a canary. How many secrets each connection has."""
    stored = {
        "plain": {"api_key": values["secret"], "crlf": values["secret with a line break"] + "\r\nX-Injected: 1"},
        "oauth-cc": {"client_secret": values["client secret"]},
        "oauth-pw": {"client_secret": values["client secret"], "password": values["password"]},
        "oauth-rt": {"client_secret": values["client secret"], "refresh_token": values["issued refresh token"]},
        "oauth-badclient": {"client_secret": values["wrong client secret"]},
        "oauth-badrefresh": {"client_secret": values["client secret"], "refresh_token": values["refresh token"]},
        "oauth-down": {"client_secret": values["client secret"]},
        "control": {"control": control},
    }
    for connection, named in stored.items():
        for name, value in named.items():  # each written, then replaced; and one more, deleted
            must(hub.put(f"/v1/connections/{connection}/secrets/{name}", json={"value": "old-" + value}), 204)
            must(hub.put(f"/v1/connections/{connection}/secrets/{name}", json={"value": value}), 204)
        must(hub.put(f"/v1/connections/{connection}/secrets/spare", json={"value": "spare-" + value}), 204)
        must(hub.delete(f"/v1/connections/{connection}/secrets/spare"), 204)
    secret = values["secret"]
    must(hub.put("/v1/connections/plain/secrets/api_key", json={"value": secret, "extra": secret}), 422)
    must(hub.put("/v1/connections/plain/secrets/1-bad", json={"value": secret}), 422)
    must(hub.put("/v1/connections/plain/secrets/api_key", json={"value": [secret]}), 422)
    must(hub.put("/v1/connections/nowhere/secrets/api_key", json={"value": secret}), 404)
    literal = must(hub.patch("/v1/connections/oauth-cc", json={"oauth2": {
        "grant_type": "client_credentials", "token_url": f"{upstream}/oauth/token", "client_id": "hub-client",
        "client_secret": values["client secret"]}}), 422)
    assert literal.json()["code"] == "secret_reference_required", literal.text
    return {connection: len(named) for connection, named in stored.items()}


def submit(hub: httpx.Client, kinds: dict[str, Kind]) -> dict[str, str]:
    """Submit each kind's job; its id by kind."""
    return {label: must(hub.post("/v1/executions", json=kind.submission, headers=kind.headers), 202).json()["id"]
            for label, kind in kinds.items()}


def run_one(hub: httpx.Client, kind: Kind) -> tuple[str, dict[str, Any]]:
    """Submit one job and wait until it is final: its id and document."""
    job_id = submit(hub, {"one": kind})["one"]
    return job_id, wait_final(hub, [job_id], timeout=30)[job_id]


def run_later_kinds(hub: httpx.Client, idp: httpx.Client, values: dict[str, str]) -> dict[str, str]:
    """The jobs that need the token server to themselves, one at a time: the token endpoint
    down (three 503s: every try of the token request fails), a refusal whose description
    quotes the refresh token and client secret it was sent (as some servers do), a cached
    token the server has revoked, and a connection changed, so its rotated refresh token is
    presented."""
    ids = {}
    must(idp.post("/fail", json={"status": 503, "error": "temporarily_unavailable", "count": 3}), 200)
    ids["token failure: token endpoint down"], _ = run_one(hub, LATER_KINDS["token failure: token endpoint down"])
    quoted = f"refresh token {values['refresh token']} of the client with secret {values['client secret']} is unknown"
    must(idp.post("/fail", json={"status": 400, "error": "invalid_grant", "error_description": quoted}), 200)
    label = "token failure: the server quotes the credentials"
    ids[label], _ = run_one(hub, LATER_KINDS[label])
    must(idp.post("/revoke", json={}), 200)
    ids["revoked token, fetched again"], _ = run_one(hub, LATER_KINDS["revoked token, fetched again"])
    must(hub.patch("/v1/connections/oauth-rt", json={"description": "changed"}), 200)
    ids["rotated refresh token used"], _ = run_one(hub, LATER_KINDS["rotated refresh token used"])
    return ids


def read_everything(hub: httpx.Client, ids: dict[str, str]) -> dict[str, bytes]:
    """Every job, the lists and every other resource through the API (recorded by the client's
    hook); each job's final document, by kind."""
    results = {label: must(hub.get(f"/v1/executions/{job_id}"), 200).content for label, job_id in ids.items()}
    for query in ("", "?limit=200", "?status=failed", "?status=succeeded", "?status=cancelled", "?connection=plain",
                  "?connection=oauth-rt", "?limit=5"):
        must(hub.get(f"/v1/executions{query}"), 200)
    for connection in [c["name"] for c in must(hub.get("/v1/connections"), 200).json()["items"]]:
        must(hub.get(f"/v1/connections/{connection}"), 200)
        must(hub.get(f"/v1/connections/{connection}/secrets"), 200)
        for request in must(hub.get(f"/v1/connections/{connection}/requests"), 200).json()["items"]:
            must(hub.get(f"/v1/connections/{connection}/requests/{request['name']}"), 200)
    for template in must(hub.get("/v1/templates"), 200).json()["items"]:
        must(hub.get(f"/v1/templates/{template['id']}"), 200)
    for path in ("/v1/callback-key", "/metrics", "/healthz", "/readyz"):
        hub.get(path)
    return results


def read_flower(flower: str, job_ids: set[str]) -> list[bytes]:
    """Flower's task list once it shows every job's task, each task's info, and its workers."""
    with httpx.Client(base_url=flower, timeout=20) as client:

        def every_job_shown() -> bool:
            tasks = client.get("/api/tasks").json()
            shown = {t.get("args") for t in tasks.values() if t.get("name") == "hub.execute"}
            return {repr([job_id]) for job_id in job_ids} <= shown

        processes.wait_until(every_job_shown, "every job's task in Flower", timeout=30)
        listing = client.get("/api/tasks")
        pages = [listing.content]
        pages += [must(client.get(f"/api/task/info/{task}"), 200).content for task in listing.json()]
        pages.append(client.get("/api/workers", params={"refresh": "true"}).content)
    return pages


# -- the test -------------------------------------------------------------------------------------


def test_no_secret_is_left_anywhere_after_every_kind_of_job(redis_url: str, tmp_path: Path) -> None:
    values = {label: canary(label.upper().replace(" ", "")) for label in (
        "secret", "secret with a line break", "client secret", "wrong client secret", "password", "refresh token")}
    planted = "PLANTED-" + secrets.token_hex(10)
    control = canary("CONTROL")
    closed_port = processes.free_port()
    responses = Responses()
    with fresh_database(tmp_path) as database_url:
        with running_stack(redis_url, database_url, tmp_path, workers=(), extra_env=STACK_ENV) as stack, \
                relay(stack.upstream, closed_port) as service, \
                stack.client() as hub, httpx.Client(base_url=f"{stack.upstream}/oauth/admin", timeout=10) as idp, \
                watched_redis(redis_url) as (sampled, published):
            hub.event_hooks["response"].append(responses.record)
            relay_url = f"http://127.0.0.1:{service.server_address[1]}"
            flower = start_flower(stack)
            # Given the canaries stored as secrets of a plain connection and of OAuth connections
            values["issued refresh token"] = set_up_oauth_server(idp, values)
            set_up_plain(hub, stack.upstream, relay_url, closed_port, planted)
            set_up_oauth(hub, stack.upstream)
            set_up_control(hub, stack.upstream)
            secret_counts = write_secrets(hub, stack.upstream, values, control)

            # When every kind of job is submitted while no worker runs (their messages wait in Redis)
            kinds = {**plain_kinds(planted, relay_url), **OAUTH_KINDS, **CONTROL_KINDS}
            ids = submit(hub, kinds)
            must(hub.post(f"/v1/executions/{ids['cancelled']}/cancel"), 200)
            waiting = broker_messages(redis_values(redis_url))
            # and they run on two workers, then the ones that need the token server to themselves
            start_workers(stack, {"worker-1": {}, "worker-2": {"HUB_LOG_FORMAT": "json"}})
            jobs = wait_final(hub, list(ids.values()), timeout=60)
            later = run_later_kinds(hub, idp, values)
            ids.update(later)
            jobs.update(wait_final(hub, list(later.values())))
            kinds.update(LATER_KINDS)
            processes.wait_until(lambda: hub.get(f"/v1/executions/{ids['callback']}").json()["callback_state"]
                                 == "delivered", "the callback delivered", timeout=20)
            results = read_everything(hub, ids)
            flower_pages = read_flower(flower, set(ids.values()))
            idp_stats = must(idp.get("/stats"), 200).json()
            redis_after = redis_values(redis_url)
        rows = database_rows(database_url)
        files = {path.name: path.read_bytes() for path in sorted(tmp_path.iterdir()) if path.is_file()}

    # Then each job ran and ended as its kind says
    assert_each_kind_ran(kinds, ids, jobs, idp_stats)
    # and every place holds what it should: the scan looks at something
    values_in_rows = [value for table in rows.values() for row in table for value in row]
    messages = broker_messages(sampled)
    places = {
        "API responses": b"\n".join(responses.seen),
        "job results": b"\n".join(results.values()),
        **{f"file {name}": content for name, content in files.items()},
        "database rows": "\n".join(map(repr, values_in_rows)).encode(),
        "Redis after the jobs": b"\n".join(redis_after),
        "Redis while the jobs ran": b"\n".join(sorted(sampled)),
        "broker messages waiting": json.dumps(waiting).encode(),
        "broker messages while the jobs ran": json.dumps(messages).encode(),
        "Redis pub/sub": b"\n".join(b"%s %s" % pair for pair in published)
        + json.dumps(broker_messages(data for _, data in published)).encode(),
        "Flower": b"\n".join(flower_pages),
        "callbacks": b"\n".join(service.callbacks),
    }
    assert_places_hold_what_they_should(places, ids, planted, waiting, messages, rows, secret_counts)
    # the control secret, which the echoing service put in its job's result, is found exactly where results go
    results_kept = {"API responses", "job results", "database rows", *(["file hub.db"] if "hub.db" in files else [])}
    assert set(leaks({"control": control}, places)) == {f"control in {place}" for place in results_kept}
    # and no canary, issued token, master key or API key is in any of them
    needles = {
        **values,
        "an issued access token": "demo-at-",
        "an issued refresh token": "demo-rt-",
        "the master key": TEST_MASTER_KEY,
        "the tenant's API key": stack.key,
        **service_passwords(redis_url, database_url),
    }
    found = leaks(needles, places)
    assert found == [], "; ".join(found)
    countdowns = sum(1 for m in messages if m["headers"].get("eta"))
    print(f"\nleak scan: {len(values)} canaries + {len(needles) - len(values)} other needles; {len(ids)} jobs; "
          f"{len(responses.seen)} API responses ({sum(map(len, responses.seen))} B); "
          f"{sum(len(c) for n, c in files.items() if n.endswith('.log'))} B of logs; "
          f"{sum(map(len, rows.values()))} rows; {len(redis_after)} Redis keys and values after, "
          f"{len(sampled)} seen while running; {len(waiting)} broker messages waiting, {len(messages)} while "
          f"running ({countdowns} with a countdown); {len(published)} published; "
          f"{len(flower_pages) - 2} Flower tasks; {len(service.callbacks)} callbacks")


def service_passwords(redis_url: str, database_url: str) -> dict[str, str]:
    """The passwords in the Redis and database URLs, where they have one (the embedded Redis does)."""
    found = {"the Redis password": urlsplit(redis_url).password, "the database password": urlsplit(database_url).password}
    return {label: password for label, password in found.items() if password}


def assert_each_kind_ran(kinds: dict[str, Kind], ids: dict[str, str], jobs: dict[str, dict[str, Any]],
                         idp_stats: dict[str, Any]) -> None:
    """Each job's final state, code and attempts are its kind's; the special ones did what
    they are there for."""
    for label, kind in kinds.items():
        job = jobs[ids[label]]
        outcome = (job["error"] or {}).get("code") if kind.status == "failed" else (job["result"] or {}).get("status_code")
        assert (job["status"], outcome) == (kind.status, kind.outcome), f"{label}: {json.dumps(job)} {json.dumps(idp_stats['requests'])}"
        assert kind.attempts is None or job["attempts"] == kind.attempts, f"{label}: {json.dumps(job)}"
    truncated = jobs[ids["truncated"]]["result"]
    assert (truncated["truncated"], truncated["size"], truncated["content_length"]) == (True, 32_768, 100_000)
    assert "invalid_client" in jobs[ids["token failure: invalid client"]]["error"]["message"]
    assert "invalid_grant" in jobs[ids["token failure: invalid refresh token"]]["error"]["message"]
    assert "HTTP 503" in jobs[ids["token failure: token endpoint down"]]["error"]["message"]
    quoted = jobs[ids["token failure: the server quotes the credentials"]]["error"]["message"]
    assert "invalid_grant" in quoted and "[secret]" in quoted, quoted
    assert jobs[ids["rotated refresh token used"]]["result"]["cached"] is False
    assert idp_stats["protected_unauthorized"] >= 1  # the revoked token was refused once, then replaced
    presented = [r["refresh_token_id"] for r in idp_stats["requests"] if r["grant_type"] == "refresh_token"
                 and r["status"] == 200]
    assert len(presented) == 2 and presented[0] != presented[1], presented  # the rotated one, the second time


def assert_places_hold_what_they_should(places: dict[str, bytes], ids: dict[str, str], planted: str,
                                        waiting: list[dict[str, Any]], messages: list[dict[str, Any]],
                                        rows: dict[str, list[tuple[Any, ...]]], secret_counts: dict[str, int]) -> None:
    """The controls: every place the scan reads holds the things that went through it, and the
    search finds a planted value where it was put."""
    # the planted value, a connection's description and a variable, is found where it went
    found = leaks({"planted": planted}, places)
    assert {"planted in API responses", "planted in database rows"} <= set(found), found
    # every job's id is in the responses, the database, Flower, the published announcements and a worker's log
    workers = places["file worker-1.log"] + places["file worker-2.log"]
    for label, job_id in ids.items():
        for place in ("API responses", "job results", "database rows", "Flower", "Redis pub/sub"):
            assert job_id.encode() in places[place], (label, place)
        assert label == "cancelled" or f"job {job_id} running".encode() in workers, label
    # the waiting messages carry every first-wave job's id, in their decoded (base64) bodies
    first_wave = {job_id for label, job_id in ids.items() if label not in LATER_KINDS}
    assert first_wave <= {json.loads(m["body"])[0][0] for m in waiting if m["headers"].get("task") == "hub.execute"}
    # the messages seen while the jobs ran include retries the workers sent with a countdown
    assert any(m["headers"].get("eta") for m in messages if m["headers"].get("task") == "hub.execute"), messages[:3]
    # both workers ran jobs, one logging text, the other JSON; the API and beat logged; the callback arrived
    assert b" running tenant=" in places["file worker-1.log"] and b'"event":"running"' in places["file worker-2.log"]
    assert b"POST /v1/executions" in places["file api.log"]
    assert b"Sending due task" in places["file beat.log"]
    assert ids["callback"].encode() in places["callbacks"]
    assert b"hub.callback" in places["Flower"]
    # the token cache held tokens (sealed) while the scan read Redis, and the database holds every secret (sealed)
    assert b"hub:token:" in places["Redis while the jobs ran"]
    assert len(rows["secret"]) == sum(secret_counts.values()), rows.keys()


def test_the_search_finds_a_value_as_is_or_inside_base64() -> None:
    """The search the scan relies on, on values planted the ways a leak would look."""
    value = canary("SECRET")
    basic = b"Authorization: Basic " + base64.b64encode(f"hub-client:{value}".encode())
    envelope = {"body": base64.b64encode(json.dumps([[value], {}, {}]).encode()).decode(),
                "headers": {"task": "hub.execute"}, "properties": {"body_encoding": "base64"}}
    places = {
        "as is": f"x={value}&y=1".encode(),
        "lower case": value.lower().encode(),
        "basic": basic,
        "url-safe base64": base64.urlsafe_b64encode(b"??>" + value.encode()),
        "decoded message": json.dumps(broker_messages([json.dumps(["tag", envelope]).encode()])).encode(),
        "nowhere": b"CANARY-SECRET-" + secrets.token_hex(10).encode(),
    }
    assert leaks({"v": value}, places) == [f"v in {place}" for place in places if place != "nowhere"]
