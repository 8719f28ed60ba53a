"""Rendering a stored request and the caller's values into the HTTP request to send."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import pytest

from models import errors
from worker.render import Outgoing, render

BASE = "https://api.example.com"


def _render(**overrides: Any) -> Outgoing:
    values: dict[str, Any] = {
        "method": "GET",
        "url": "/items",
        "headers": {},
        "query": {},
        "body": None,
        "media_type": "application/json",
        "base_url": BASE,
        "auth_header_values": {},
        "path_params": {},
        "variables": {},
    }
    values.update(overrides)
    return render(**values)


def test_path_parameter_is_percent_encoded() -> None:
    # Given a URL with a path parameter and a value holding a slash and a space
    # When the request is rendered
    outgoing = _render(url="/accounts/{account_id}/notes", path_params={"account_id": "a/b c"})
    # Then the value stays one path segment
    assert outgoing.url == "https://api.example.com/accounts/a%2Fb%20c/notes"


def test_path_parameter_cannot_add_a_query_or_fragment() -> None:
    # Given a value that tries to smuggle in a query and a fragment
    # When the request is rendered
    outgoing = _render(url="/accounts/{id}", path_params={"id": "1?admin=true#x"})
    # Then they are encoded inside the segment
    assert outgoing.url == "https://api.example.com/accounts/1%3Fadmin%3Dtrue%23x"


@pytest.mark.parametrize(
    ("base_url", "url"),
    [
        ("https://api.example.com", "/v1/items"),
        ("https://api.example.com/", "/v1/items"),
        ("https://api.example.com/", "v1/items"),
        ("https://api.example.com", "v1/items"),
    ],
)
def test_relative_url_is_joined_to_base_url(base_url: str, url: str) -> None:
    # Given a connection's base URL and a relative request URL, with or without slashes
    # When the request is rendered
    outgoing = _render(base_url=base_url, url=url)
    # Then they are joined with exactly one slash
    assert outgoing.url == "https://api.example.com/v1/items"


def test_base_url_path_is_kept_when_joining() -> None:
    # Given a base URL with a path of its own
    # When a relative URL is rendered against it
    outgoing = _render(base_url="https://api.example.com/services/data/", url="/v58.0/sobjects")
    # Then the base path is kept, not replaced
    assert outgoing.url == "https://api.example.com/services/data/v58.0/sobjects"


def test_absolute_url_ignores_base_url() -> None:
    # Given an absolute request URL
    # When the request is rendered with a base URL
    outgoing = _render(url="https://other.example.com/x")
    # Then the absolute URL is used as is
    assert outgoing.url == "https://other.example.com/x"


def test_variables_fill_query_and_headers() -> None:
    # Given variables used in the query and in a header
    # When the request is rendered
    outgoing = _render(
        query={"since": "{{vars.since}}", "fixed": "1"},
        headers={"X-Trace": "trace-{{ vars.trace }}"},
        variables={"since": "2026-01-01", "trace": "abc"},
    )
    # Then the values are substituted
    assert outgoing.query == {"since": "2026-01-01", "fixed": "1"}
    assert outgoing.headers == {"X-Trace": "trace-abc"}


def test_variable_in_url_is_percent_encoded() -> None:
    # Given a variable in the URL whose value has a slash
    # When the request is rendered
    outgoing = _render(url="/search/{{vars.term}}", variables={"term": "x/../admin"})
    # Then it cannot change the path
    assert outgoing.url == "https://api.example.com/search/x%2F..%2Fadmin"


def test_json_body_variable_with_quotes_and_braces_does_not_break_json() -> None:
    # Given a JSON body with a variable inside a longer string and one as a whole string,
    # and a value full of JSON syntax
    nasty = 'x", "admin": true, "y": {"z": "}'
    # When the request is rendered
    outgoing = _render(
        method="POST",
        body={"note": "says: {{vars.v}}", "whole": "{{vars.v}}"},
        variables={"v": nasty},
    )
    # Then the body is valid JSON that gives the value back, and adds no key
    assert outgoing.content is not None
    assert json.loads(outgoing.content) == {"note": f"says: {nasty}", "whole": nasty}


def test_whole_string_placeholder_keeps_the_json_type() -> None:
    # Given JSON body values that are a placeholder and nothing else
    # When the variables are a number, an object, a list and a boolean
    outgoing = _render(
        method="POST",
        body={"n": "{{vars.n}}", "o": "{{vars.o}}", "items": ["{{vars.l}}"], "b": "{{vars.b}}"},
        variables={"n": 42, "o": {"a": [1, "two"]}, "l": [1, 2], "b": False},
    )
    # Then the JSON body carries them with their own types, not as strings
    assert outgoing.content is not None
    assert json.loads(outgoing.content) == {
        "n": 42,
        "o": {"a": [1, "two"]},
        "items": [[1, 2]],
        "b": False,
    }


def test_variable_value_is_not_expanded_again() -> None:
    # Given a value that itself looks like a placeholder
    # When the request is rendered
    outgoing = _render(
        method="POST",
        body={"a": "{{vars.a}}", "b": "pre {{vars.a}}"},
        variables={"a": "{{vars.b}}", "b": "expanded"},
    )
    # Then it is sent literally
    assert outgoing.content is not None
    assert json.loads(outgoing.content) == {"a": "{{vars.b}}", "b": "pre {{vars.b}}"}


def test_json_body_gets_json_content_type() -> None:
    # Given a JSON body
    # When the request is rendered
    outgoing = _render(method="POST", body={"a": 1}, media_type="application/json-patch+json")
    # Then the Content-Type is the media type, without a charset
    assert outgoing.headers["Content-Type"] == "application/json-patch+json"


def test_form_body_is_urlencoded() -> None:
    # Given a form body with a variable and characters that need encoding
    # When the request is rendered
    outgoing = _render(
        method="POST",
        media_type="application/x-www-form-urlencoded",
        body={"name": "{{vars.name}}", "q": "a&b=c"},
        variables={"name": "Zoë Smith"},
    )
    # Then the body is form-encoded and says so
    assert outgoing.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert outgoing.content is not None
    assert parse_qs(outgoing.content.decode(), strict_parsing=True) == {
        "name": ["Zoë Smith"],
        "q": ["a&b=c"],
    }


@pytest.mark.parametrize("media_type", ["text/plain", "text/html", "text/xml"])
def test_text_body_is_sent_as_utf8(media_type: str) -> None:
    # Given a text body with non-ASCII characters and a variable
    # When the request is rendered
    outgoing = _render(
        method="POST", media_type=media_type, body="héllo {{vars.who}}", variables={"who": "wörld"}
    )
    # Then it is UTF-8 and the Content-Type says so
    assert outgoing.headers["Content-Type"] == f"{media_type}; charset=utf-8"
    assert outgoing.content == "héllo wörld".encode()


def test_user_content_type_header_is_replaced_by_media_type() -> None:
    # Given a stored request whose headers name another Content-Type, in any case
    # When it is rendered with a JSON body
    outgoing = _render(
        method="POST",
        headers={"content-type": "text/evil", "Accept": "application/json"},
        body={"a": 1},
    )
    # Then exactly one Content-Type is sent, the media type's, and other headers stay
    content_types = {k: v for k, v in outgoing.headers.items() if k.lower() == "content-type"}
    assert content_types == {"Content-Type": "application/json"}
    assert outgoing.headers["Accept"] == "application/json"


def test_no_body_means_no_content() -> None:
    # Given a request without a body
    # When it is rendered
    outgoing = _render()
    # Then nothing is sent as content
    assert outgoing.content is None


@pytest.mark.parametrize(
    "where",
    [
        {"url": "/items/{id}"},
        {"url": "/items/{{vars.id}}"},
        {"query": {"q": "{{vars.id}}"}},
        {"headers": {"X-Id": "{{vars.id}}"}},
        {"body": {"nested": ["{{vars.id}}"]}, "method": "POST"},
    ],
    ids=["path", "url-variable", "query", "header", "body"],
)
def test_missing_value_raises_missing_variable(where: dict[str, Any]) -> None:
    # Given a placeholder without a value from the caller
    # When the request is rendered
    with pytest.raises(errors.MissingVariable) as caught:
        _render(**where)
    # Then the error names the placeholder and has the stable code
    assert caught.value.code == "missing_variable"
    assert "id" in str(caught.value)


@pytest.mark.parametrize(
    "where",
    [
        {"headers": {"Authorization": "Bearer {{secrets.api_key}}"}},
        {"query": {"key": "{{secrets.api_key}}"}},
        {"body": {"key": "{{ secrets.api_key }}"}, "method": "POST"},
        {"url": "/x?key={{secrets.api_key}}"},
        {"auth_header_values": {"X-Client-Key": "{{secrets.api_key}}"}},
    ],
    ids=["header", "query", "body", "url", "auth-header"],
)
def test_unresolved_secret_reference_raises_secret_missing(where: dict[str, Any]) -> None:
    # Given a secret reference that nothing resolved
    # When the request is rendered
    with pytest.raises(errors.SecretMissing) as caught:
        _render(**where)
    # Then the job cannot send it: secret_missing, naming the secret
    assert caught.value.code == "secret_missing"
    assert "api_key" in str(caught.value)


def test_auth_header_values_are_sent_as_headers() -> None:
    # Given a connection's auth header values and a request with its own headers
    # When the request is rendered
    outgoing = _render(
        auth_header_values={"X-Client-Key": "ck-123", "X-Api-Version": "58.0"},
        headers={"Accept": "application/json"},
    )
    # Then every one is sent
    assert outgoing.headers == {
        "X-Client-Key": "ck-123",
        "X-Api-Version": "58.0",
        "Accept": "application/json",
    }


def test_method_and_query_are_passed_through() -> None:
    # Given a DELETE with a fixed query
    # When it is rendered
    outgoing = _render(method="DELETE", query={"hard": "true"})
    # Then the method and query are those of the request
    assert outgoing.method == "DELETE"
    assert outgoing.query == {"hard": "true"}


def test_placeholders_fill_values_not_keys() -> None:
    # Given a JSON key and a query name that look like placeholders, and no values for them
    # When the request is rendered
    outgoing = _render(method="POST", body={"{{vars.field}}": "v"}, query={"{{vars.name}}": "1"})
    # Then keys are data like any other text: sent as written, and no value is required
    assert outgoing.content is not None
    assert json.loads(outgoing.content) == {"{{vars.field}}": "v"}
    assert outgoing.query == {"{{vars.name}}": "1"}


