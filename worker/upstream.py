"""Calling the web service: one streamed request, read up to the response cap.

The cap counts decoded bytes (``iter_bytes`` undoes gzip, deflate, brotli), so a small
compressed response cannot inflate past it. Past the cap the worker stops reading and closes
the connection. httpx's errors become the hub's here, and only here.
"""

from __future__ import annotations

import base64
import codecs
import ssl
import time
from dataclasses import dataclass
from typing import Any

import httpx

from models import errors
from models.settings import Settings
from worker import tls
from worker.render import Outgoing

USER_AGENT = "integration-hub/0.1"
"""Sent unless the request sets its own User-Agent."""


@dataclass
class Captured:
    """What the web service answered, the body cut at the cap."""

    status_code: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    content_length: int | None
    elapsed_ms: float


def build_client(
    settings: Settings, transport: httpx.BaseTransport | None = None, verify: ssl.SSLContext | None = None
) -> httpx.Client:
    """The worker's HTTP client: explicit timeouts, no redirects followed, no proxy from the
    environment, the CAs of ``HUB_TLS_CA_FILE`` if set (or ``verify``, a context of its own)."""
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.read_timeout_s,
        write=settings.write_timeout_s,
        pool=settings.pool_timeout_s,
    )
    return httpx.Client(
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
        transport=transport,
        verify=verify or tls.context(settings),
        headers={"User-Agent": USER_AGENT},
    )


def _headers(response: httpx.Response) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name, value in response.headers.multi_items():
        key = name.lower()
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    return merged


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None


def send(client: httpx.Client, outgoing: Outgoing, *, cap: int) -> Captured:
    """Send ``outgoing`` and read at most ``cap`` decoded bytes of the answer."""
    started = time.perf_counter()
    try:
        request = client.build_request(
            outgoing.method,
            outgoing.url,
            headers=outgoing.headers,
            params=outgoing.query or None,
            content=outgoing.content,
        )
        response = client.send(request, stream=True)
        try:
            body = bytearray()
            truncated = False
            for chunk in response.iter_bytes():
                room = cap - len(body)
                if len(chunk) > room:
                    body += chunk[:room]
                    truncated = True
                    break
                body += chunk
        finally:
            response.close()
        return Captured(
            status_code=response.status_code,
            headers=_headers(response),
            body=bytes(body),
            truncated=truncated,
            content_length=_content_length(response),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )
    except httpx.HTTPError as exc:
        raise translate(exc) from exc


def translate(exc: httpx.HTTPError) -> errors.UpstreamError:
    """The hub's error for an httpx error. Messages name the failure, never the URL."""
    if isinstance(exc, httpx.ConnectTimeout):
        return errors.ConnectTimeout()
    if isinstance(exc, httpx.ReadTimeout):
        return errors.ReadTimeout()
    if isinstance(exc, httpx.WriteTimeout):
        return errors.WriteTimeout()
    if isinstance(exc, httpx.PoolTimeout):
        return errors.PoolTimeout()
    if _caused_by_tls(exc) or (isinstance(exc, httpx.ConnectError) and "certificate" in str(exc)):
        return errors.TlsError()  # a failed handshake, or a peer refusing our certificate after it
    if isinstance(exc, httpx.ConnectError):
        return errors.ConnectionRefused()
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.LocalProtocolError, httpx.DecodingError)):
        return errors.ProtocolError()
    return errors.UpstreamError()


def _caused_by_tls(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def result_document(captured: Captured) -> dict[str, Any]:
    """The job's ``result``: the body as UTF-8 text, else base64.

    A body cut at the cap may end inside a UTF-8 character: the incomplete tail is dropped
    so the text stays valid, and ``size`` counts the bytes kept.
    """
    body = captured.body
    try:
        decoder = codecs.getincrementaldecoder("utf-8")()
        text = decoder.decode(body, final=not captured.truncated)
        encoding, shown, size = "utf-8", text, len(text.encode())
    except UnicodeDecodeError:
        encoding, shown, size = "base64", base64.b64encode(body).decode(), len(body)
    return {
        "status_code": captured.status_code,
        "headers": captured.headers,
        "body": shown,
        "body_encoding": encoding,
        "size": size,
        "truncated": captured.truncated,
        "content_length": captured.content_length,
        "elapsed_ms": captured.elapsed_ms,
    }
