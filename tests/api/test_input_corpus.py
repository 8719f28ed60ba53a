"""Bad input through the API: each case gets a clear ``4xx`` problem document.

Oversized bodies, too many or too long headers and query parameters in stored and ad-hoc
requests, huge ``variables`` and ``path_params``, invalid UTF-8, deeply nested JSON, huge
numbers, NUL characters and wrong content types, sent to the in-process API (SQLite, and
PostgreSQL when configured). For each: the status and code the case expects, a problem
document without a stack trace, nothing stored or queued, and the API still serving.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from models.settings import Settings
from tests.api.helpers import assert_problem, make_connection, make_request
from tests.conftest import Api

pytestmark = pytest.mark.reliability

MAX_BODY = Settings.model_fields["max_body_bytes"].default
EXECUTIONS = "/v1/executions"
REQUESTS = "/v1/connections/c/requests"
TEMPLATES = "/v1/templates"
ADHOC = {"method": "GET", "url": "/x"}


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes, what it is, and the answer it must get."""

    path: str
    content: Callable[[], bytes]
    status: int
    code: str
    content_type: str | None = "application/json"
    method: str = "POST"


def dumped(document: Any) -> Callable[[], bytes]:
    """The body: ``document`` as JSON, built when the case runs."""
    return lambda: json.dumps(document).encode()


def raw(text: str | bytes) -> Callable[[], bytes]:
    """The body: these very bytes (UTF-8 for text)."""
    return lambda: text if isinstance(text, bytes) else text.encode()


def submission(**fields: Any) -> dict[str, Any]:
    """An ad-hoc submission of connection ``c`` with ``fields`` added."""
    return {"connection": "c", "adhoc": dict(ADHOC), **fields}


def stored(**fields: Any) -> dict[str, Any]:
    """A stored request body with ``fields`` added."""
    return {"name": "bad", "kind": "studio", "method": "POST", "url": "/x", **fields}


def nested(depth: int, leaf: str = "1") -> str:
    """A JSON array ``depth`` levels deep."""
    return "[" * depth + leaf + "]" * depth


def nested_objects(depth: int) -> str:
    """A JSON object ``depth`` levels deep."""
    return '{"a":' * depth + "1" + "}" * depth


def in_submission(value: str) -> Callable[[], bytes]:
    """An ad-hoc submission whose variable ``a`` is the JSON text ``value``."""
    return raw('{"connection":"c","adhoc":{"method":"GET","url":"/x"},"variables":{"a":%s}}' % value)


def in_stored_body(value: str) -> Callable[[], bytes]:
    """A stored request whose JSON body is the JSON text ``value``."""
    return raw('{"name":"bad","method":"POST","url":"/x","body":%s}' % value)


HUGE = "1" + "0" * 5000
"""10**5000 as a JSON literal: more digits than Python turns into an int by default."""

CASES: dict[str, Case] = {
    # --- size: the whole body, headers, query, variables, path parameters ---
    "body-over-limit-execution": Case(EXECUTIONS, dumped(submission(variables={"a": "x" * (MAX_BODY + 1)})),
                                      413, "payload_too_large"),
    "body-over-limit-request": Case(REQUESTS, dumped(stored(body="x" * (MAX_BODY + 1), media_type="text/plain")),
                                    413, "payload_too_large"),
    "body-over-limit-template": Case(TEMPLATES, dumped({"name": "t" * (4 * MAX_BODY), "service_name": "s",
                                                        "verbs": ["GET"]}), 413, "payload_too_large"),
    "body-10mb-secret": Case("/v1/connections/c/secrets/big", dumped({"value": "s" * 10_000_000}), 413,
                             "payload_too_large", method="PUT"),
    "stored-10000-headers": Case(REQUESTS, dumped(stored(headers={f"X-H{i}": "v" for i in range(10_000)})),
                                 422, "validation_error"),
    "stored-header-value-100kb": Case(REQUESTS, dumped(stored(headers={"X-Long": "v" * 100_000})),
                                      422, "validation_error"),
    "stored-header-name-10kb": Case(REQUESTS, dumped(stored(headers={"X" * 10_000: "v"})), 422, "validation_error"),
    "stored-header-name-crlf": Case(REQUESTS, dumped(stored(headers={"X-A\r\nX-Injected": "v"})), 422,
                                    "validation_error"),
    "stored-header-name-space": Case(REQUESTS, dumped(stored(headers={"Bad Name": "v"})), 422, "validation_error"),
    "stored-10000-query": Case(REQUESTS, dumped(stored(query={f"q{i}": "v" for i in range(10_000)})),
                               422, "validation_error"),
    "stored-query-value-100kb": Case(REQUESTS, dumped(stored(query={"q": "v" * 100_000})), 422, "validation_error"),
    "adhoc-10000-headers": Case(EXECUTIONS, dumped({"connection": "c", "adhoc": {
        **ADHOC, "headers": {f"X-H{i}": "v" for i in range(10_000)}}}), 422, "validation_error"),
    "adhoc-header-value-100kb": Case(EXECUTIONS, dumped({"connection": "c", "adhoc": {
        **ADHOC, "headers": {"X-Long": "v" * 100_000}}}), 422, "validation_error"),
    "adhoc-header-name-crlf": Case(EXECUTIONS, dumped({"connection": "c", "adhoc": {
        **ADHOC, "headers": {"X-A\r\nX-Injected": "v"}}}), 422, "validation_error"),
    "variables-10000": Case(EXECUTIONS, dumped(submission(variables={f"v{i}": i for i in range(10_000)})),
                            422, "validation_error"),
    "variables-value-over-limit": Case(EXECUTIONS, dumped(submission(variables={"a": "v" * (2 * MAX_BODY)})),
                                       413, "payload_too_large"),
    "path-params-10000": Case(EXECUTIONS, dumped(submission(path_params={f"p{i}": "v" for i in range(10_000)})),
                              422, "validation_error"),
    "path-param-value-100kb": Case(EXECUTIONS, dumped({"connection": "c", "adhoc": {"method": "GET", "url": "/x/{p}"},
                                                       "path_params": {"p": "v" * 100_000}}), 422, "validation_error"),
    "url-10kb": Case(EXECUTIONS, dumped({"connection": "c", "adhoc": {"method": "GET", "url": "/" + "x" * 10_000}}),
                     422, "validation_error"),
    # --- encoding ---
    "invalid-utf8-execution": Case(EXECUTIONS, raw(b'{"connection":"c\xff\xfe","adhoc":{"method":"GET","url":"/x"}}'),
                                   422, "validation_error"),
    "invalid-utf8-request": Case(REQUESTS, raw(b'{"name":"\xc3\x28","method":"GET","url":"/x"}'),
                                 422, "validation_error"),
    "overlong-utf8": Case(REQUESTS, raw(b'{"name":"\xc0\xaf","method":"GET","url":"/x"}'), 422, "validation_error"),
    "latin1-bytes": Case(TEMPLATES, raw('{"name":"caf\xe9","service_name":"s","verbs":["GET"]}'.encode("latin-1")),
                         422, "validation_error"),
    "lone-surrogate-escape": Case(REQUESTS, raw('{"name":"s","method":"POST","url":"/x","body":{"a":"\\ud800"}}'),
                                  422, "validation_error"),
    "lone-surrogate-variable": Case(EXECUTIONS, in_submission('"\\udfff"'), 422, "validation_error"),
    # --- nesting ---
    "nested-arrays-100-variable": Case(EXECUTIONS, in_submission(nested(100)), 422, "validation_error"),
    "nested-arrays-900-variable": Case(EXECUTIONS, in_submission(nested(900)), 422, "validation_error"),
    "nested-arrays-10000-variable": Case(EXECUTIONS, in_submission(nested(10_000)), 422, "validation_error"),
    "nested-objects-10000-variable": Case(EXECUTIONS, in_submission(nested_objects(10_000)), 422, "validation_error"),
    "nested-arrays-900-body": Case(REQUESTS, in_stored_body(nested(900)), 422, "validation_error"),
    "nested-arrays-10000-body": Case(REQUESTS, in_stored_body(nested(10_000)), 422, "validation_error"),
    "nested-arrays-100000-body": Case(REQUESTS, in_stored_body(nested(100_000)), 422, "validation_error"),
    "nested-objects-900-body": Case(REQUESTS, in_stored_body(nested_objects(900)), 422, "validation_error"),
    # --- numbers ---
    "1e400-variable": Case(EXECUTIONS, in_submission("1e400"), 422, "validation_error"),
    "minus-1e400-body": Case(REQUESTS, in_stored_body('{"a":-1e400}'), 422, "validation_error"),
    "1e400-path-param": Case(EXECUTIONS, raw('{"connection":"c","adhoc":{"method":"GET","url":"/x/{p}"},'
                                             '"path_params":{"p":1e400}}'), 422, "validation_error"),
    "1e400-timeout": Case(EXECUTIONS, raw(
        '{"connection":"c","adhoc":{"method":"GET","url":"/x"},"timeout_s":1e400}'), 422, "validation_error"),
    "nan-literal-body": Case(REQUESTS, in_stored_body('{"a":NaN}'), 422, "validation_error"),
    "infinity-literal-variable": Case(EXECUTIONS, in_submission("Infinity"), 422, "validation_error"),
    "10e5000-int-variable": Case(EXECUTIONS, in_submission(HUGE), 422, "validation_error"),
    "10e5000-int-body": Case(REQUESTS, in_stored_body(HUGE), 422, "validation_error"),
    "10e5000-int-max-attempts": Case(EXECUTIONS, raw(
        '{"connection":"c","adhoc":{"method":"GET","url":"/x"},"max_attempts":%s}' % HUGE), 422, "validation_error"),
    "10e4000-int-max-attempts": Case(EXECUTIONS, raw(
        '{"connection":"c","adhoc":{"method":"GET","url":"/x"},"max_attempts":%s}' % HUGE[:4001]), 422,
        "validation_error"),
    # --- NUL ---
    "nul-escaped-connection": Case(EXECUTIONS, raw('{"connection":"c\\u0000","adhoc":{"method":"GET","url":"/x"}}'),
                                   422, "validation_error"),
    "nul-escaped-variable-name": Case(EXECUTIONS, dumped(submission(variables={"\x00": 1})), 422, "validation_error"),
    "nul-escaped-body": Case(REQUESTS, dumped(stored(body={"a": ["\x00"]})), 422, "validation_error"),
    "nul-raw-byte": Case(EXECUTIONS, raw(b'{"connection":"c\x00","adhoc":{"method":"GET","url":"/x"}}'),
                         422, "validation_error"),
    "nul-in-path": Case("/v1/connections/c%00/requests", dumped(stored()), 404, "not_found"),
    # --- not JSON, or not the JSON expected ---
    "content-type-text-plain": Case(EXECUTIONS, dumped(submission()), 422, "validation_error", "text/plain"),
    "content-type-form": Case(EXECUTIONS, raw("connection=c&request=r"), 422, "validation_error",
                              "application/x-www-form-urlencoded"),
    "content-type-multipart": Case(EXECUTIONS, raw(b"--x\r\n\r\n--x--\r\n"), 422, "validation_error",
                                   "multipart/form-data; boundary=x"),
    "content-type-xml": Case(REQUESTS, raw("<request/>"), 422, "validation_error", "application/xml"),
    "content-type-bogus": Case(TEMPLATES, raw("{}"), 422, "validation_error", "no/such; = type"),
    "truncated-json": Case(EXECUTIONS, raw('{"connection":"c","adhoc":{'), 422, "validation_error"),
    "empty-body": Case(EXECUTIONS, raw(b""), 422, "validation_error"),
    "json-array": Case(EXECUTIONS, raw("[]"), 422, "validation_error"),
    "json-string": Case(REQUESTS, raw('"GET /x"'), 422, "validation_error"),
    "json-null": Case(TEMPLATES, raw("null"), 422, "validation_error"),
    "duplicate-keys-bad-last": Case(EXECUTIONS, raw('{"connection":"c","connection":{"a":1},"adhoc":'
                                                    '{"method":"GET","url":"/x"}}'), 422, "validation_error"),
}


@pytest.fixture
def corpus(api: Api) -> Api:
    """Tenant ``a`` with a connection ``c`` (GET and POST) and a stored request ``r``."""
    make_request(api, make_connection(api, name="c"), name="r", kind="studio", url="/x")
    return api


def _stored(api: Api) -> dict[str, int]:
    """How many templates, connections, requests and secrets tenant ``a`` has."""
    counts = {}
    for name, path in (("templates", TEMPLATES), ("connections", "/v1/connections"), ("requests", REQUESTS),
                       ("secrets", "/v1/connections/c/secrets")):
        response = api.client.get(path, params={"limit": 200} if name != "secrets" else None, headers=api.headers())
        assert response.status_code == 200, response.text
        counts[name] = len(response.json()["items"])
    return counts


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_a_clear_4xx(corpus: Api, name: str) -> None:
    case = CASES[name]
    before = _stored(corpus)
    headers = corpus.headers()
    if case.content_type is not None:
        headers["Content-Type"] = case.content_type
    # Given one bad input, when it is sent to the API
    response = corpus.client.request(case.method, case.path, content=case.content(), headers=headers)
    # Then it gets the case's status and code in a problem document, without a stack trace
    problem = assert_problem(response, case.status, case.code)
    assert "Traceback" not in response.text and 'File "' not in response.text
    assert len(response.content) < 100_000, "the answer does not echo a huge input"
    assert problem["type"].endswith(case.code)
    # And nothing was stored or queued, and the API keeps serving
    assert _stored(corpus) == before
    assert corpus.queue.sent == []
    assert corpus.client.get("/healthz").status_code == 200
    again = corpus.client.post(EXECUTIONS, json={"connection": "c", "request": "r"}, headers=corpus.headers())
    assert again.status_code == 202, again.text


@pytest.mark.timeout(60)
def test_a_body_without_a_length_is_cut_at_the_limit(corpus: Api) -> None:
    # Given a body streamed without Content-Length (chunked), larger than the limit
    def chunks() -> Any:
        yield b'{"connection":"c","adhoc":{"method":"GET","url":"/x"},"variables":{"a":"'
        for _ in range(MAX_BODY // 65_536 + 2):
            yield b"x" * 65_536
        yield b'"}}'

    headers = {**corpus.headers(), "Content-Type": "application/json"}
    # When it is sent, then it is refused 413 like a body with a length
    response = corpus.client.post(EXECUTIONS, content=chunks(), headers=headers)
    assert_problem(response, 413, "payload_too_large")
    assert corpus.queue.sent == []


def test_a_body_at_the_limit_is_accepted(corpus: Api) -> None:
    # Given a submission of exactly the limit's size, padded with spaces (valid JSON)
    document = json.dumps({"connection": "c", "request": "r"}).encode()
    body = document[:-1] + b" " * (MAX_BODY - len(document)) + b"}"
    assert len(body) == MAX_BODY
    # When it is sent, then it is queued: the limit refuses only what is over it
    response = corpus.client.post(EXECUTIONS, content=body, headers={**corpus.headers(),
                                                                      "Content-Type": "application/json"})
    assert response.status_code == 202, response.text
