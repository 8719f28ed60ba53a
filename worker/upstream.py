"""Calling the web service: one streamed request, read up to the response cap.

The cap counts decoded bytes. The worker reads the raw body and decodes gzip and deflate
itself, asking zlib for no more output than the room left under the cap, so a small
compressed response cannot inflate past it (a "gzip bomb" costs the cap, not its inflated
size). A body in an encoding the hub cannot decode (``br``, ``zstd``, stacked encodings) is
kept as it came and marked ``decoded: false``. Past the cap the worker stops reading and
closes the connection; past the attempt's deadline it gives up (:class:`~models.errors.ReadTimeout`),
however steadily the service drips bytes. httpx's and zlib's errors become the hub's here,
and only here.
"""

from __future__ import annotations

import base64
import codecs
import ssl
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from models import errors
from models.settings import Settings
from worker import guard, tls
from worker.render import Outgoing

USER_AGENT = "integration-hub/0.1"
"""Sent unless the request sets its own User-Agent."""

ACCEPT_ENCODING = "gzip, deflate"
"""Sent unless the request sets its own Accept-Encoding: the encodings the hub can decode."""

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_WBITS = {"gzip": _GZIP_WBITS, "x-gzip": _GZIP_WBITS, "deflate": zlib.MAX_WBITS}
"""The content codings the hub decodes, and the zlib ``wbits`` for each."""


@dataclass
class Captured:
    """What the web service answered, the body cut at the cap."""

    status_code: int
    headers: dict[str, str]
    body: bytes
    truncated: bool
    content_length: int | None
    elapsed_ms: float
    decoded: bool = True
    """False when the body is kept as sent in a ``Content-Encoding`` the hub cannot decode."""


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


class _Decoder(Protocol):
    """Turns the raw body, fed chunk by chunk, into the body, handed out a bounded piece at a time."""

    finished: bool
    """The encoded stream has ended: anything the service sends after it is not read."""

    def feed(self, data: bytes) -> None:
        """Add the next raw chunk."""

    def read(self, limit: int) -> bytes:
        """At most ``limit`` (> 0) decoded bytes; fewer only when the input fed so far is used up."""


class _AsSent:
    """No decoding: the body as it came (identity, or an encoding the hub cannot decode)."""

    finished = False

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> None:
        self._pending += data

    def read(self, limit: int) -> bytes:
        piece, self._pending = self._pending[:limit], self._pending[limit:]
        return piece


class _Inflater:
    """gzip or deflate decoding that never produces more than it is asked for.

    Input that zlib has not used yet waits in ``unconsumed_tail``; ``flush()`` is never called,
    because it would inflate all of that at once.
    """

    def __init__(self, wbits: int) -> None:
        self.finished = False
        self._zlib = zlib.decompressobj(wbits)
        self._pending = b""
        # "deflate" should be zlib-wrapped (RFC 9110) but some servers send raw deflate: until
        # the wrapped decoder has accepted the 2-byte zlib header, keep its input to start
        # over as raw.
        self._replay: bytearray | None = bytearray() if wbits == zlib.MAX_WBITS else None

    def feed(self, data: bytes) -> None:
        self._pending += data

    def read(self, limit: int) -> bytes:
        out = bytearray()
        while self._pending and len(out) < limit and not self.finished:
            data = self._pending
            try:
                piece = self._zlib.decompress(data, limit - len(out))
            except zlib.error as exc:
                if self._replay is None:
                    raise errors.ProtocolError("the web service's compressed answer is corrupt") from exc
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
                self._pending, self._replay = bytes(self._replay) + data, None
                continue
            self._pending = self._zlib.unconsumed_tail
            self.finished = self._zlib.eof
            if self._replay is not None:
                self._replay += data[: len(data) - len(self._pending)]
                if piece or len(self._replay) >= 2:
                    self._replay = None
            if not piece and len(self._pending) == len(data):
                break  # no progress: wait for more input
            out += piece
        return bytes(out)


def _decoder(response: httpx.Response) -> tuple[_Decoder, bool]:
    """The decoder for the response's ``Content-Encoding``, and whether it decodes."""
    codings = [
        coding.strip().lower()
        for coding in response.headers.get_list("content-encoding", split_commas=True)
        if coding.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return _AsSent(), True
    if len(codings) == 1 and codings[0] in _WBITS:
        return _Inflater(_WBITS[codings[0]]), True
    return _AsSent(), False


def _timeout(timeout: httpx.Timeout, left: float) -> dict[str, float | None]:
    """The client's timeouts, none longer than ``left`` seconds, as httpcore's extension reads them."""

    def bounded(value: float | None) -> float:
        return left if value is None else min(value, left)

    return httpx.Timeout(
        connect=bounded(timeout.connect),
        read=bounded(timeout.read),
        write=bounded(timeout.write),
        pool=bounded(timeout.pool),
    ).as_dict()


def _check_deadline(ends: float | None) -> None:
    if ends is not None and time.perf_counter() >= ends:
        raise errors.ReadTimeout("the web service did not finish answering within the deadline")


def _raw_chunks(response: httpx.Response) -> Iterator[bytes]:
    """The body as it came off the wire, chunk by chunk."""
    if response.is_stream_consumed and isinstance(response.stream, httpx.SyncByteStream):
        # Only a mock transport's Response(content=...): httpx read and decoded it when it was
        # built, and iter_raw() refuses it, but its stream still holds the raw bytes.
        return iter(response.stream)
    return response.iter_raw()


def _read_body(response: httpx.Response, decoder: _Decoder, cap: int, ends: float | None) -> tuple[bytes, bool]:
    """The first ``cap`` decoded bytes of the body, and whether there was more."""
    body = bytearray()
    _check_deadline(ends)
    for chunk in _raw_chunks(response):
        decoder.feed(chunk)
        # One byte more than the room tells a body of exactly the cap from a longer one.
        body += decoder.read(cap + 1 - len(body))
        if len(body) > cap:
            return bytes(body[:cap]), True
        if decoder.finished:
            break
        _check_deadline(ends)
    return bytes(body), False


def send(client: httpx.Client, outgoing: Outgoing, *, cap: int, deadline_s: float | None = None) -> Captured:
    """Send ``outgoing`` and read at most ``cap`` decoded bytes of the answer.

    With ``deadline_s``, the attempt (connect to last byte read) gives up once that many seconds
    have passed, with :class:`~models.errors.ReadTimeout`: the time is checked before each read
    of the body, and none of the client's timeouts is longer than the deadline, so one wait
    cannot outlast it; on the worker's pinned connections every single read and write is cut to
    the time left as well, so headers dripped byte by byte end on time too.
    """
    started = time.perf_counter()
    ends = None if deadline_s is None else started + deadline_s
    try:
        request = client.build_request(
            outgoing.method,
            outgoing.url,
            headers=outgoing.headers,
            params=outgoing.query or None,
            content=outgoing.content,
        )
        if not any(name.lower() == "accept-encoding" for name in outgoing.headers):
            request.headers["Accept-Encoding"] = ACCEPT_ENCODING
        if deadline_s is not None:
            request.extensions["timeout"] = _timeout(client.timeout, deadline_s)
        with guard.deadline(ends):  # pinned connections cut every wait, headers included
            response = client.send(request, stream=True)
            try:
                decoder, decoded = _decoder(response)
                body, truncated = _read_body(response, decoder, cap, ends)
            finally:
                response.close()
        return Captured(
            status_code=response.status_code,
            headers=_headers(response),
            body=body,
            truncated=truncated,
            content_length=_content_length(response),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
            decoded=decoded,
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
    if isinstance(exc, (httpx.ReadError, httpx.WriteError)):
        return errors.ConnectionReset()
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
    """The job's ``result``: the body as UTF-8 text, else base64; ``decoded`` is false when the
    body is still in a ``Content-Encoding`` the hub cannot decode.

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
        "decoded": captured.decoded,
    }
