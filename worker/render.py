"""Turning a stored request and the caller's values into the HTTP request to send.

Values are substituted as data: a path parameter is percent-encoded, and a JSON body is
rendered value by value, so a value can neither break the JSON nor be expanded again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from models import errors, rules

WHOLE_VARIABLE = re.compile(r"^\{\{\s*vars\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}$")


@dataclass
class Outgoing:
    """An HTTP request ready to send."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None


def _text(value: str, variables: dict[str, Any]) -> str:
    def variable(match: re.Match[str]) -> str:
        item = variables[match.group(1)]
        return item if isinstance(item, str) else json.dumps(item)

    return rules.VARIABLE.sub(variable, value)


def _json_value(value: Any, variables: dict[str, Any]) -> Any:
    if isinstance(value, str):
        whole = WHOLE_VARIABLE.match(value)
        if whole:
            return variables[whole.group(1)]
        return _text(value, variables)
    if isinstance(value, list):
        return [_json_value(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: _json_value(item, variables) for key, item in value.items()}
    return value


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
) -> Outgoing:
    """The request to send, with every caller placeholder filled in.

    A missing value raises :class:`~models.errors.MissingVariable` (the API checks first, so
    the worker sees this only for a request changed after submission). A secret reference
    raises :class:`~models.errors.SecretMissing`: secrets are resolved by the vault.
    """
    missing = rules.missing_values(
        rules.caller_placeholders(url, headers, query, body), path_params, variables
    )
    if missing:
        raise errors.MissingVariable(f"no value for {', '.join(missing)}")
    rendered_headers = {**auth_header_values, **{k: _text(v, variables) for k, v in headers.items()}}
    rendered_query = {k: _text(v, variables) for k, v in query.items()}
    content = None
    if body is not None:
        content = encode_body(_json_value(body, variables), media_type)
        for name in [h for h in rendered_headers if h.lower() == "content-type"]:
            del rendered_headers[name]
        charset = "; charset=utf-8" if media_type.startswith("text/") else ""
        rendered_headers["Content-Type"] = media_type + charset
    outgoing = Outgoing(
        method=method,
        url=rules.resolve_url(base_url, rules.fill_url(url, path_params, variables)),
        headers=rendered_headers,
        query=rendered_query,
        content=content,
    )
    texts = [outgoing.url, *outgoing.headers.values(), *outgoing.query.values()]
    if content is not None:
        texts.append(content.decode("utf-8", "replace"))
    for text in texts:
        secret = rules.SECRET.search(text)
        if secret:
            raise errors.SecretMissing(f"secret {secret.group(1)!r} is not available")
    return outgoing
