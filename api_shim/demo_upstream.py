"""A small web service on loopback for the dev stack's walk-through and the tests.

Endpoints (any method):

- ``/echo/...``: answers JSON describing the request it got (method, path, query, headers, body).
- ``/bytes/N``: answers N bytes (at most 10 MB) of text, with a Content-Length.
- ``/status/CODE``: answers that status with a small JSON body.
- ``/flaky/KEY/N/CODE``: the first N requests for KEY answer CODE (``?retry_after=S`` adds a
  ``Retry-After`` header), later ones 200: for retries.
- ``/slow/SECONDS``: answers after SECONDS (at most 60).
- ``/stats``: how many requests each path got, for tests that count calls.
- ``/calls``: the time (Unix seconds) and path of the last 20,000 requests, for tests that
  measure rates.
- ``/oauth/...``: a test OAuth 2.0 token server and protected resource (:mod:`api_shim.demo_oauth`).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from api_shim.demo_oauth import OAuthServer

MAX_BYTES = 10 * 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    """Serves the endpoints above."""

    server_version = "hub-demo-upstream/1"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: without this, 40 ms per keep-alive call

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet: the dev stack keeps its own logs."""

    def _send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        bodiless = status in (204, 304)  # HTTP forbids them a body: it would spoil a kept-alive connection
        if not bodiless:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Demo-Upstream", "yes")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and not bodiless:
            self.wfile.write(body)

    def _handle(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        stats: Counter[str] = self.server.stats  # type: ignore[attr-defined]
        if parts.path not in ("/stats", "/calls"):
            with self.server.lock:  # type: ignore[attr-defined]
                stats[parts.path] += 1
                self.server.calls.append((time.time(), parts.path))  # type: ignore[attr-defined]
        segments = [s for s in parts.path.split("/") if s]
        head = segments[0] if segments else ""
        if head == "echo":
            document = {
                "method": self.command,
                "path": parts.path,
                "query": dict(parse_qsl(parts.query)),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body.decode("utf-8", "replace"),
            }
            self._send(200, json.dumps(document).encode())
        elif head == "bytes" and len(segments) == 2 and segments[1].isdigit():
            size = min(int(segments[1]), MAX_BYTES)
            pattern = b"0123456789abcdef"
            self._send(200, (pattern * (size // len(pattern) + 1))[:size], "text/plain")
        elif head == "status" and len(segments) == 2 and segments[1].isdigit():
            code = int(segments[1])
            self._send(code, json.dumps({"status": code}).encode())
        elif head == "flaky" and len(segments) == 4 and segments[2].isdigit() and segments[3].isdigit():
            with self.server.lock:  # type: ignore[attr-defined]
                seen = stats[f"/flaky/{segments[1]}"] = stats[f"/flaky/{segments[1]}"] + 1
            query = dict(parse_qsl(parts.query))
            if seen <= int(segments[2]):
                extra = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
                self._send(int(segments[3]), json.dumps({"attempt": seen}).encode(), headers=extra)
            else:
                self._send(200, json.dumps({"attempt": seen}).encode())
        elif head == "slow" and len(segments) == 2:
            time.sleep(min(float(segments[1]), 60.0))
            self._send(200, json.dumps({"slept": float(segments[1])}).encode())
        elif head == "calls":
            with self.server.lock:  # type: ignore[attr-defined]
                self._send(200, json.dumps(list(self.server.calls)).encode())  # type: ignore[attr-defined]
        elif head == "oauth":
            oauth: OAuthServer = self.server.oauth  # type: ignore[attr-defined]
            reply = oauth.handle(self.command, parts.path, self.headers.items(), body)
            self._send(reply.status, reply.body, headers=reply.headers)
        elif head == "stats":
            with self.server.lock:  # type: ignore[attr-defined]
                self._send(200, json.dumps(dict(stats)).encode())
        else:
            self._send(404, json.dumps({"error": "unknown path", "path": parts.path}).encode())

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_TRACE = _handle


def make_server(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A demo upstream bound to ``host:port`` (0: any free port), not yet serving."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.stats = Counter()  # type: ignore[attr-defined]
    server.lock = threading.Lock()  # type: ignore[attr-defined]
    server.calls = deque(maxlen=20_000)  # type: ignore[attr-defined]
    server.oauth = OAuthServer()  # type: ignore[attr-defined]
    return server


def serve(host: str, port: int) -> None:
    """Serve until interrupted."""
    server = make_server(host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
