"""Calling the web service through ``httpx.MockTransport``: capture, cap, encodings, errors."""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Callable, Iterator

import httpx
import pytest

from models import errors
from models.settings import Settings
from worker import upstream
from worker.render import Outgoing

CAP = 32_768
URL = "https://api.example.com/items"


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    return upstream.build_client(settings, transport=httpx.MockTransport(handler))


def _send(
    handler: Callable[[httpx.Request], httpx.Response], outgoing: Outgoing | None = None
) -> upstream.Captured:
    with _client(handler) as client:
        return upstream.send(client, outgoing or Outgoing(method="GET", url=URL), cap=CAP)


class CountingStream(httpx.SyncByteStream):
    """A response body served chunk by chunk, counting what the reader pulled."""

    def __init__(self, chunks: int, size: int, byte: bytes = b"x") -> None:
        self.chunks = chunks
        self.size = size
        self.byte = byte
        self.pulled = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.byte * self.size

    def close(self) -> None:
        self.closed = True


# --- what is captured --------------------------------------------------------------------


def test_status_headers_and_body_are_captured() -> None:
    # Given a service that answers 201 with headers and a JSON body
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            201,
            headers=[("Content-Type", "application/json"), ("X-Request-Id", "r-1")],
            content=b'{"ok": true}',
        )

    # When a POST with query, headers and content is sent
    captured = _send(
        handler,
        Outgoing(
            method="POST",
            url=URL,
            headers={"X-Client-Key": "ck", "Content-Type": "application/json"},
            query={"a": "1 2"},
            content=b'{"x":1}',
        ),
    )
    # Then the service saw that request, and its answer is captured with lower-cased headers
    assert len(seen) == 1
    assert seen[0].method == "POST"
    assert seen[0].url.path == "/items"
    assert seen[0].url.params["a"] == "1 2"
    assert seen[0].headers["x-client-key"] == "ck"
    assert seen[0].content == b'{"x":1}'
    assert captured.status_code == 201
    assert captured.headers["content-type"] == "application/json"
    assert captured.headers["x-request-id"] == "r-1"
    assert captured.body == b'{"ok": true}'
    assert captured.truncated is False
    assert captured.content_length == len(b'{"ok": true}')
    assert captured.elapsed_ms >= 0


def test_repeated_response_headers_are_merged() -> None:
    # Given a service that sends the same header twice
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[("Vary", "Accept"), ("vary", "Origin")])

    # When it is called
    captured = _send(handler)
    # Then both values are kept under one lower-case name
    assert captured.headers["vary"] == "Accept, Origin"


def test_redirect_is_not_followed() -> None:
    # Given a service that redirects elsewhere
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(302, headers={"Location": "https://internal.example.com/"})

    # When it is called
    captured = _send(handler)
    # Then the redirect is the answer; no second request is made
    assert captured.status_code == 302
    assert calls == [URL]


# --- the response cap --------------------------------------------------------------------


def test_one_megabyte_body_is_cut_at_the_cap() -> None:
    # Given a service that answers with 1 MB
    payload = bytes(range(256)) * 4096

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload)

    # When it is called
    captured = _send(handler)
    # Then exactly the first 32,768 bytes are kept, and the announced size is reported
    assert captured.body == payload[:CAP]
    assert captured.truncated is True
    assert captured.content_length == 1_048_576


def test_body_of_exactly_the_cap_is_not_truncated() -> None:
    # Given a service that answers with exactly 32,768 bytes
    payload = b"y" * CAP

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=payload)

    # When it is called
    captured = _send(handler)
    # Then all of it is kept and it is not marked truncated
    assert captured.body == payload
    assert captured.truncated is False


def test_body_of_exactly_the_cap_in_small_chunks_is_not_truncated() -> None:
    # Given exactly 32,768 bytes streamed in 1 KB chunks
    stream = CountingStream(chunks=32, size=1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream)

    # When it is called
    captured = _send(handler)
    # Then all of it is kept and it is not marked truncated
    assert len(captured.body) == CAP
    assert captured.truncated is False
    assert captured.content_length is None


def test_one_byte_over_the_cap_is_truncated() -> None:
    # Given a body one byte longer than the cap, in small chunks
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([b"a" * 1024] * 32 + [b"b"]))

    # When it is called
    captured = _send(handler)
    # Then the cap is kept and the cut is reported
    assert captured.body == b"a" * CAP
    assert captured.truncated is True


def test_reader_stops_early_on_a_long_stream() -> None:
    # Given a streamed body of 100 chunks of 64 KB (6.4 MB)
    stream = CountingStream(chunks=100, size=64 * 1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(100 * 64 * 1024)}, stream=stream)

    # When it is called
    captured = _send(handler)
    # Then the worker stopped pulling after the cap, and closed the response
    assert stream.pulled <= 2, f"pulled {stream.pulled} of 100 chunks"
    assert stream.closed is True
    assert captured.body == b"x" * CAP
    assert captured.truncated is True
    assert captured.content_length == 100 * 64 * 1024


def test_reader_stops_early_with_small_chunks() -> None:
    # Given a streamed body of 1,000 chunks of 1 KB
    stream = CountingStream(chunks=1000, size=1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=stream)

    # When it is called
    captured = _send(handler)
    # Then about cap / chunk size chunks were read, not all of them
    assert stream.pulled <= CAP // 1024 + 2
    assert len(captured.body) == CAP
    assert captured.truncated is True


def test_cap_counts_decoded_bytes_of_a_gzip_response() -> None:
    # Given a gzip-compressed response that decompresses to 1 MB
    decoded = (b"BEGIN:" + bytes(range(256)) * 4096)[:1_048_576]
    compressed = gzip.compress(decoded)
    assert len(compressed) < CAP  # so only decoding can push it past the cap

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=compressed)

    # When it is called
    captured = _send(handler)
    # Then the body is the first 32,768 decoded bytes, and the cut is reported
    assert captured.body == decoded[:CAP]
    assert captured.truncated is True
    assert captured.content_length == len(compressed)


# --- the result document -----------------------------------------------------------------


def _result(body: bytes, headers: dict[str, str] | None = None) -> dict[str, object]:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=headers, content=body)

    return upstream.result_document(_send(handler))


def test_utf8_body_is_text() -> None:
    # Given a UTF-8 JSON body with non-ASCII text
    body = json.dumps({"name": "Zoë ✓"}, ensure_ascii=False).encode()
    # When the result is built
    result = _result(body, {"Content-Type": "application/json"})
    # Then the body is the text, with its size in bytes
    assert result["body_encoding"] == "utf-8"
    assert result["body"] == '{"name": "Zoë ✓"}'
    assert result["size"] == len(body)
    assert result["truncated"] is False
    assert result["content_length"] == len(body)
    assert result["status_code"] == 200
    assert result["headers"] == {"content-type": "application/json", "content-length": str(len(body))}


def test_non_utf8_body_is_base64() -> None:
    # Given a binary body that is not UTF-8
    body = b"\x89PNG\r\n\x1a\n\x00\xff\xfe" + bytes(range(256))
    # When the result is built
    result = _result(body)
    # Then it is base64 that decodes to the very bytes
    assert result["body_encoding"] == "base64"
    assert isinstance(result["body"], str)
    assert base64.b64decode(result["body"]) == body
    assert result["size"] == len(body)


def test_truncated_non_utf8_body_is_base64_of_the_kept_bytes() -> None:
    # Given a binary body longer than the cap
    body = bytes(range(256)) * 256
    # When the result is built
    result = _result(body)
    # Then the kept bytes are base64
    assert result["body_encoding"] == "base64"
    assert isinstance(result["body"], str)
    assert base64.b64decode(result["body"]) == body[:CAP]
    assert result["size"] == CAP
    assert result["truncated"] is True


@pytest.mark.parametrize(("char", "kept_of_it"), [("é", 1), ("✓", 2), ("😀", 3)])
def test_utf8_body_cut_inside_a_character_stays_valid_text(char: str, kept_of_it: int) -> None:
    # Given a UTF-8 body whose cap falls inside a multibyte character
    encoded = char.encode()
    prefix = b"a" * (CAP - kept_of_it)
    body = prefix + encoded * 100
    assert body[:CAP] == prefix + encoded[:kept_of_it]  # the cut is mid-character
    # When the result is built
    result = _result(body)
    # Then the body is valid UTF-8 text without the partial character, and size counts it
    assert result["body_encoding"] == "utf-8"
    assert result["body"] == prefix.decode()
    assert result["size"] == len(prefix)
    assert result["truncated"] is True


def test_untruncated_body_ending_in_a_partial_character_is_base64() -> None:
    # Given a complete (untruncated) body that ends with half a UTF-8 character
    body = "fine ✓".encode()[:-1]
    # When the result is built
    result = _result(body)
    # Then it is not valid UTF-8, so it is base64 of the bytes
    assert result["body_encoding"] == "base64"
    assert isinstance(result["body"], str)
    assert base64.b64decode(result["body"]) == body


# --- errors ------------------------------------------------------------------------------

SECRET_QUERY_VALUE = "q-7f3a9c-DO-NOT-LEAK"
SECRET_URL = f"https://api.example.com/v1/things?api_key={SECRET_QUERY_VALUE}"


@pytest.mark.parametrize(
    ("raised", "expected", "code"),
    [
        (httpx.ConnectTimeout, errors.ConnectTimeout, "connect_timeout"),
        (httpx.ReadTimeout, errors.ReadTimeout, "read_timeout"),
        (httpx.WriteTimeout, errors.WriteTimeout, "write_timeout"),
        (httpx.PoolTimeout, errors.PoolTimeout, "pool_timeout"),
        (httpx.ConnectError, errors.ConnectionRefused, "connection_refused"),
        (httpx.RemoteProtocolError, errors.ProtocolError, "protocol_error"),
        (httpx.ReadError, errors.ConnectionReset, "connection_reset"),
        (httpx.WriteError, errors.ConnectionReset, "connection_reset"),
    ],
)
def test_transport_errors_become_hub_errors_without_the_url(
    raised: type[httpx.TransportError], expected: type[errors.UpstreamError], code: str
) -> None:
    # Given a transport that fails, with the full URL in httpx's own message
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised(f"failed talking to {request.url}", request=request)

    # When the request is sent
    with pytest.raises(errors.UpstreamError) as caught:
        _send(handler, Outgoing(method="GET", url=SECRET_URL))
    # Then it is the hub's error of that kind, with its stable code, and the URL is not in it
    assert type(caught.value) is expected
    assert caught.value.code == code
    assert SECRET_QUERY_VALUE not in str(caught.value)
    assert SECRET_QUERY_VALUE not in caught.value.message
    assert "api.example.com" not in str(caught.value)


def test_read_timeout_while_streaming_the_body_is_read_timeout() -> None:
    # Given a service that sends headers, then stalls in the middle of the body
    class Stalling(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b"partial"
            raise httpx.ReadTimeout(f"timed out reading {SECRET_URL}")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Stalling())

    # When the request is sent
    with pytest.raises(errors.ReadTimeout) as caught:
        _send(handler, Outgoing(method="GET", url=SECRET_URL))
    # Then it fails as a read timeout, without the URL
    assert caught.value.code == "read_timeout"
    assert SECRET_QUERY_VALUE not in str(caught.value)


def test_tls_failure_is_tls_error() -> None:
    # Given a connect error caused by a failed certificate check
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(
            f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed for {request.url}",
            request=request,
        )

    # When the request is sent
    with pytest.raises(errors.TlsError) as caught:
        _send(handler, Outgoing(method="GET", url=SECRET_URL))
    # Then it is a TLS error, without the URL
    assert caught.value.code == "tls_error"
    assert SECRET_QUERY_VALUE not in str(caught.value)


def test_corrupt_gzip_body_is_protocol_error() -> None:
    # Given a response that claims gzip but is not
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip at all")

    # When the request is sent
    with pytest.raises(errors.ProtocolError) as caught:
        _send(handler)
    # Then it fails as a protocol error
    assert caught.value.code == "protocol_error"


# --- what is sent ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({}, upstream.USER_AGENT), ({"User-Agent": "acme-sync/2"}, "acme-sync/2")],
)
def test_the_hub_names_itself_unless_the_request_does(headers: dict[str, str], expected: str) -> None:
    # Given a request with or without its own User-Agent
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    # When it is sent
    _send(handler, Outgoing(method="GET", url=URL, headers=headers))
    # Then the service sees the request's own User-Agent, else the hub's
    assert seen[0].headers["user-agent"] == expected
