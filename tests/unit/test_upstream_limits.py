"""The upstream reader's limits: bounded decoding, the attempt's deadline, Accept-Encoding.

Transport behaviour (what reaches the socket, how long a read blocks) is tested against real
servers on 127.0.0.1, each in a thread that the fixture shuts down; client logic through
``httpx.MockTransport``.
"""

from __future__ import annotations

import gzip
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from models import errors
from models.settings import Settings
from worker import upstream
from worker.render import Outgoing

CAP = 32_768
URL = "https://api.example.com/items"
BOMB_SIZE = 200 * 1024 * 1024
PEAK_LIMIT = 8 * 1024 * 1024
DEADLINE_MESSAGE = "the web service did not finish answering within the deadline"

Respond = Callable[[BaseHTTPRequestHandler, threading.Event], None]
"""Answers one request on a test server; the event is set when the test is over."""


def _settings(**overrides: float) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg, arg-type]


def _send(
    handler: Callable[[httpx.Request], httpx.Response], outgoing: Outgoing | None = None
) -> upstream.Captured:
    with upstream.build_client(_settings(), transport=httpx.MockTransport(handler)) as client:
        return upstream.send(client, outgoing or Outgoing(method="GET", url=URL), cap=CAP)


def _answer(body: bytes, encoding: str | None = None, chunk: int | None = None) -> upstream.Captured:
    """What the reader captures of ``body``, sent with ``Content-Encoding: encoding``, in
    chunks of ``chunk`` bytes (one chunk if None)."""
    size = chunk or max(len(body), 1)
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    headers = {"Content-Encoding": encoding} if encoding else {}
    return _send(lambda request: httpx.Response(200, headers=headers, content=iter(chunks)))


def _peak_while(call: Callable[[], upstream.Captured]) -> tuple[upstream.Captured, int]:
    """The result of ``call`` and the most memory Python held at once during it."""
    tracemalloc.start()
    try:
        captured = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return captured, peak


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A gzip of 200 MB of zeros (about 200 KB), compressed a megabyte at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    parts = [compressor.compress(zeros) for _ in range(BOMB_SIZE // len(zeros))]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture
def serve() -> Iterator[Callable[[Respond], str]]:
    """Starts HTTP servers on 127.0.0.1 that answer GET with ``respond``; gives their URL.

    At teardown every handler is told to stop, and every server and its threads are joined.
    """
    stopping = threading.Event()
    running: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(respond: Respond) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    respond(self, stopping)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading, as it should

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    stopping.set()
    for server, thread in running:
        server.shutdown()
        server.server_close()  # joins the handler threads
        thread.join(timeout=5)
        assert not thread.is_alive()


def _send_to(url: str, *, deadline_s: float | None = None, **timeouts: float) -> upstream.Captured:
    with upstream.build_client(_settings(**timeouts)) as client:
        return upstream.send(client, Outgoing(method="GET", url=url), cap=CAP, deadline_s=deadline_s)


# --- bounded decoding ----------------------------------------------------------------------


def test_gzip_bomb_from_a_real_server_costs_the_cap_not_its_size(
    serve: Callable[[Respond], str], bomb: bytes
) -> None:
    # Given a server that answers with a gzip that inflates to 200 MB of zeros
    def respond(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(bomb)))
        handler.end_headers()
        handler.wfile.write(bomb)

    url = serve(respond)
    # When the worker calls it
    captured, peak = _peak_while(lambda: _send_to(url))
    # Then it keeps the first 32,768 decoded bytes, and never held much more than that
    assert captured.body == bytes(CAP)
    assert captured.truncated is True
    assert captured.decoded is True
    assert captured.content_length == len(bomb)
    assert peak < PEAK_LIMIT, f"peak {peak:,} bytes"


def test_gzip_bomb_in_one_chunk_costs_the_cap_not_its_size(bomb: bytes) -> None:
    # Given a mock service that streams the whole 200 MB gzip bomb as one chunk
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=iter([bomb]))

    # When the worker calls it
    captured, peak = _peak_while(lambda: _send(handler))
    # Then it keeps the first 32,768 decoded bytes, and never held much more than that
    assert captured.body == bytes(CAP)
    assert captured.truncated is True
    assert peak < PEAK_LIMIT, f"peak {peak:,} bytes"


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZIP", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
    ],
    ids=["gzip", "x-gzip", "upper-case", "deflate-zlib", "deflate-raw"],
)
def test_compressed_bodies_are_decoded(encoding: str, encode: Callable[[bytes], bytes], chunk: int | None) -> None:
    # Given a body compressed as the service says, whole or in small chunks
    body = b'{"items": ["' + b"abc" * 2000 + b'"]}'
    # When it is read
    captured = _answer(encode(body), encoding, chunk)
    # Then the decoded body is captured whole
    assert captured.body == body
    assert captured.truncated is False
    assert captured.decoded is True


@pytest.mark.parametrize(("size", "truncated"), [(CAP, False), (CAP + 1, True)])
@pytest.mark.parametrize("encode", [gzip.compress, zlib.compress], ids=["gzip", "deflate"])
def test_cap_boundary_of_a_compressed_body(encode: Callable[[bytes], bytes], size: int, truncated: bool) -> None:
    # Given a compressed body that inflates to exactly the cap, or one byte past it
    body = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    # When it is read
    captured = _answer(encode(body), "gzip" if encode is gzip.compress else "deflate")
    # Then only a body past the cap is cut
    assert captured.body == body[:CAP]
    assert captured.truncated is truncated


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("encoding", "content"),
    [
        ("gzip", b"not gzip at all"),
        ("gzip", _flip_middle(gzip.compress(b"hello, world " * 50))),
        ("deflate", b"\x00\x01not deflate either"),
    ],
    ids=["gzip-garbage", "gzip-corrupted", "deflate-garbage"],
)
def test_corrupt_compressed_body_is_protocol_error(encoding: str, content: bytes) -> None:
    # Given a body that is not what its Content-Encoding says
    # When it is read
    with pytest.raises(errors.ProtocolError) as caught:
        _answer(content, encoding)
    # Then the job fails as a protocol error, not with zlib's own error
    assert caught.value.code == "protocol_error"
    assert isinstance(caught.value.__cause__, zlib.error)


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, br", "compress"])
def test_body_in_an_encoding_the_hub_cannot_decode_is_kept_as_sent(encoding: str) -> None:
    # Given a body in an encoding the hub does not decode
    raw = b"\x1b\x8b\x02\x80\xfe\xffcompressed somehow\x03"
    # When it is read
    captured = _answer(raw, encoding)
    result = upstream.result_document(captured)
    # Then the bytes are kept as they came, and the result says they are not decoded
    assert captured.body == raw
    assert captured.decoded is False
    assert result["decoded"] is False
    assert result["body_encoding"] == "base64"
    assert result["headers"]["content-encoding"] == encoding


@pytest.mark.parametrize("encoding", [None, "identity"])
def test_uncompressed_body_is_decoded(encoding: str | None) -> None:
    # Given a plain body, with no Content-Encoding or identity
    # When it is read
    result = upstream.result_document(_answer(b"plain text", encoding))
    # Then it is the body, and it counts as decoded
    assert result["body"] == "plain text"
    assert result["decoded"] is True


def test_ten_megabytes_from_a_real_server_are_cut_at_the_cap(serve: Callable[[Respond], str]) -> None:
    # Given a server that sends a 10 MB body
    block = bytes(range(256)) * 256
    blocks = 160

    def respond(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(block) * blocks))
        handler.end_headers()
        for _ in range(blocks):
            handler.wfile.write(block)

    url = serve(respond)
    # When the worker calls it
    captured = _send_to(url)
    # Then it keeps the first 32,768 bytes and reports the announced size
    assert captured.body == block[:CAP]
    assert captured.truncated is True
    assert captured.content_length == 10_485_760


# --- the deadline --------------------------------------------------------------------------


def test_a_service_that_drips_bytes_is_cut_off_at_the_deadline(serve: Callable[[Respond], str]) -> None:
    # Given a server that sends its headers, then one byte every 0.2 s, each well within the
    # read timeout, until the client goes away (or a minute passes)
    def respond(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.end_headers()
        ends = time.monotonic() + 60
        while not stopping.wait(0.2) and time.monotonic() < ends:
            handler.wfile.write(b".")

    url = serve(respond)
    # When the worker calls it with a deadline of 1.5 s and a read timeout of 5 s
    started = time.monotonic()
    with pytest.raises(errors.ReadTimeout) as caught:
        _send_to(url, deadline_s=1.5, read_timeout_s=5.0)
    # Then it gives up as a read timeout past the deadline, long before the server stops
    assert caught.value.code == "read_timeout"
    assert caught.value.message == DEADLINE_MESSAGE
    assert time.monotonic() - started < 10


def _hang(handler: BaseHTTPRequestHandler, stopping: threading.Event) -> None:
    stopping.wait(60)  # reads the request, never answers


def test_a_service_that_never_answers_is_a_read_timeout(serve: Callable[[Respond], str]) -> None:
    # Given a server that never sends its headers
    url = serve(_hang)
    # When the worker calls it with a read timeout of 0.5 s
    with pytest.raises(errors.ReadTimeout) as caught:
        _send_to(url, read_timeout_s=0.5)
    # Then it fails as a read timeout
    assert caught.value.code == "read_timeout"


def test_no_single_wait_outlasts_the_deadline(serve: Callable[[Respond], str]) -> None:
    # Given a server that never sends its headers
    url = serve(_hang)
    # When the worker calls it with a deadline of 1 s and a read timeout of 30 s
    started = time.monotonic()
    with pytest.raises(errors.ReadTimeout) as caught:
        _send_to(url, deadline_s=1.0, read_timeout_s=30.0)
    # Then the wait for the headers ends with the deadline, not the read timeout
    assert caught.value.code == "read_timeout"
    assert time.monotonic() - started < 10


def test_without_a_deadline_a_slow_answer_is_read_whole() -> None:
    # Given a service whose body arrives in pieces, and no deadline
    def pieces() -> Iterator[bytes]:
        for piece in (b"slow ", b"but ", b"complete"):
            time.sleep(0.05)
            yield piece

    # When it is read
    captured = _send(lambda request: httpx.Response(200, content=pieces()))
    # Then all of it is captured
    assert captured.body == b"slow but complete"


def test_request_deadline_setting_defaults_to_a_minute() -> None:
    # Given no configuration / When the settings are read / Then an attempt may take 60 s
    assert _settings().request_deadline_s == 60.0


# --- what is sent ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, ["gzip, deflate"]),
        ({"Accept-Encoding": "br"}, ["br"]),
        ({"accept-encoding": "identity"}, ["identity"]),
    ],
)
def test_accept_encoding_is_sent_unless_the_request_sets_it(headers: dict[str, str], expected: list[str]) -> None:
    # Given a request with or without its own Accept-Encoding
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    # When it is sent
    _send(handler, Outgoing(method="GET", url=URL, headers=headers))
    # Then the service sees the request's own, else the encodings the hub decodes, once
    assert seen[0].headers.get_list("accept-encoding") == expected
