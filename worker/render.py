"""Turning a stored request and the values of one job into the HTTP request to send.

Values are substituted as data, in one pass: a path parameter or a value in the URL is
percent-encoded, a JSON body is rendered value by value, and no filled-in value is read again,
so a value can neither break the JSON nor expand another placeholder (a variable holding
``{{secrets.X}}`` stays that text).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

from models import errors, rules


@dataclass
class Outgoing:
    """An HTTP request ready to send."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


@dataclass
class Values:
    """What fills the placeholders of one job: the caller's variables and the opened secrets."""

    variables: Mapping[str, Any]
    secrets: Mapping[str, str]
    token: str | None = None

    def lookup(self, match: re.Match[str]) -> Any:
        """The value a placeholder match stands for."""
        if match.group("var") is not None:
            return self.variables[match.group("var")]
        if match.group("secret") is not None:
            return self.secrets[match.group("secret")]
        if self.token is None:
            raise errors.MissingVariable("{{token}} needs a connection that uses OAuth 2.0")
        return self.token

    def fill(self, text: str, encode: Callable[[str], str] = str) -> str:
        """``text`` with its placeholders filled in, each value passed through ``encode``."""

        def one(match: re.Match[str]) -> str:
            item = self.lookup(match)
            return encode(item if isinstance(item, str) else json.dumps(item))

        return rules.FILLED.sub(one, text)

    def json_value(self, value: Any) -> Any:
        """A JSON value filled in value by value; a string that is one placeholder takes the
        value itself (a variable keeps its JSON type)."""
        if isinstance(value, str):
            whole = rules.FILLED.fullmatch(value)
            return self.lookup(whole) if whole else self.fill(value)
        if isinstance(value, list):
            return [self.json_value(item) for item in value]
        if isinstance(value, dict):
            return {key: self.json_value(item) for key, item in value.items()}
        return value


def _url_encode(value: str) -> str:
    return quote(value, safe="")


def encode_body(body: Any, media_type: str) -> bytes:
    """``body`` encoded as ``media_type`` says."""
    if media_type in rules.JSON_MEDIA_TYPES:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    if media_type == rules.FORM_MEDIA_TYPE:
        return urlencode(body).encode()
    return str(body).encode()


def render(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    query: dict[str, str],
    body: Any,
    media_type: str,
    base_url: str | None,
    auth_header_values: dict[str, str],
    path_params: dict[str, Any],
    variables: dict[str, Any],
    secrets: Mapping[str, str] | None = None,
    token: str | None = None,
) -> Outgoing:
    """The request to send, with every placeholder filled in.

    A missing variable raises :class:`~models.errors.MissingVariable` (the API checks first,
    so the worker sees this only for a request changed after submission); a secret that was
    not opened raises :class:`~models.errors.SecretMissing`.
    """
    secrets = secrets or {}
    missing = rules.missing_values(rules.caller_placeholders(url, headers, query, body), path_params, variables)
    if missing:
        raise errors.MissingVariable(f"no value for {', '.join(missing)}")
    for name in sorted(rules.secret_names(url, headers, query, body, auth_header_values)):
        if name not in secrets:
            raise errors.SecretMissing(f"the connection has no secret {name!r}")
    values = Values(variables, secrets, token)
    rendered_headers = {k: values.fill(v) for k, v in {**auth_header_values, **headers}.items()}
    for name, value in rendered_headers.items():
        if "\r" in value or "\n" in value or "\x00" in value:
            raise errors.InvalidHeader(f"the value of header {name!r} would hold a line break")
    content = None
    if body is not None:
        content = encode_body(values.json_value(body), media_type)
        for name in [h for h in rendered_headers if h.lower() == "content-type"]:
            del rendered_headers[name]
        charset = "; charset=utf-8" if media_type.startswith("text/") else ""
        rendered_headers["Content-Type"] = media_type + charset
    # Path parameters and variables in the URL are percent-encoded by fill_url; any text it
    # produced is encoded, so the second fill (secrets) cannot see a placeholder it made.
    filled_url = values.fill(rules.fill_url(url, path_params, variables), _url_encode)
    return Outgoing(
        method=method,
        url=rules.resolve_url(base_url, filled_url),
        headers=rendered_headers,
        query={k: values.fill(v) for k, v in query.items()},
        content=content,
    )
