"""OAuth 2.0 token requests: authlib builds them (grant body, client authentication), httpx
sends them, and the answer becomes a :class:`Token` or a hub error.

Client authentication: ``client_secret_basic``, ``client_secret_post`` and ``private_key_jwt``
(RFC 7523, RS256 or ES256 from a PEM key held in a secret). ``scope``, ``audience``,
``extra_params`` and the connection's custom auth headers go with every token request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import httpx
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from joserfc.jwk import ECKey, RSAKey

from models import errors
from worker import upstream
from worker.render import Outgoing, Values

MAX_TOKEN_RESPONSE = 65_536
MAX_EXPIRES_IN = 366 * 24 * 3600.0
CREDENTIAL_FIELDS = ("client_id", "client_secret", "username", "password", "refresh_token", "private_key")


class TokenEndpointUnavailable(errors.TokenRequestFailed):
    """The token endpoint did not answer usefully (timeout, connection error, 429 or 5xx)."""


@dataclass(frozen=True)
class Token:
    """An access token as the token endpoint granted it."""

    access_token: str
    token_type: str
    expires_in: float | None
    scope: str | None
    refresh_token: str | None

    def __repr__(self) -> str:
        return f"Token(token_type={self.token_type!r}, expires_in={self.expires_in}, scope={self.scope!r})"


@dataclass(frozen=True)
class TokenRequest:
    """A token request ready to send."""

    url: str
    headers: dict[str, str]
    body: str
    secrets: tuple[str, ...] = ()
    """The secret values the request carries, kept out of any error the server's words make."""

    def __repr__(self) -> str:
        return f"TokenRequest(url={self.url!r})"


def build(oauth2: Mapping[str, Any], *, secrets: Mapping[str, str], auth_headers: Mapping[str, str]) -> TokenRequest:
    """The token request that ``oauth2`` (a connection's settings) defines, its secret
    references filled in from ``secrets``."""
    values = Values(variables={}, secrets=secrets)
    field = {name: values.fill(oauth2[name]) if oauth2.get(name) else None for name in CREDENTIAL_FIELDS}
    grant = oauth2["grant_type"]
    params: dict[str, Any] = {name: values.fill(value) for name, value in (oauth2.get("extra_params") or {}).items()}
    for name in ("scope", "audience"):
        if oauth2.get(name):
            params[name] = values.fill(oauth2[name])
    if grant == "password":
        params.update(username=field["username"], password=field["password"])
    elif grant == "refresh_token":
        params["refresh_token"] = field["refresh_token"]
    body = prepare_token_request(grant, **params)

    method = oauth2.get("client_auth_method") or "client_secret_basic"
    if method == "private_key_jwt":
        key, alg = _signing_key(field["private_key"] or "")
        client = ClientAuth(field["client_id"], key, PrivateKeyJWT(oauth2["token_url"], alg=alg))
    elif method == "client_secret_basic":
        client = ClientAuth(field["client_id"], field["client_secret"], _client_secret_basic)
    else:
        client = ClientAuth(field["client_id"], field["client_secret"], method)
    headers = {
        "Accept": "application/json",
        "Content-Type": "application/x-www-form-urlencoded",
        **{name: values.fill(value) for name, value in auth_headers.items()},
    }
    url, headers, body = client.prepare("POST", oauth2["token_url"], headers, body)
    return TokenRequest(url=url, headers=headers, body=body, secrets=tuple(secrets.values()))


def _client_secret_basic(
    client: ClientAuth, method: str, uri: str, headers: dict[str, str], body: str
) -> tuple[str, dict[str, str], str]:
    """HTTP Basic client authentication as RFC 6749 2.3.1 has it: the id and secret are
    form-encoded before base64 (authlib's own encoder skips that step)."""
    pair = f"{quote_plus(client.client_id or '')}:{quote_plus(client.client_secret or '')}"
    headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    return uri, headers, body


def _signing_key(pem: str) -> tuple[RSAKey | ECKey, str]:
    """The private key of a ``private_key_jwt`` client, and the algorithm it signs with."""
    try:
        loaded = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        # from None: the parser's message could quote the key
        raise errors.TokenRequestFailed("the private_key secret is not a PEM private key") from None
    if isinstance(loaded, ec.EllipticCurvePrivateKey):
        return ECKey.import_key(pem), "ES256"
    return RSAKey.import_key(pem), "RS256"


def send(client: httpx.Client, request: TokenRequest, *, deadline_s: float | None = None) -> Token:
    """Send the token request; the granted token, or the hub's error for the answer."""
    outgoing = Outgoing(method="POST", url=request.url, headers=request.headers, content=request.body.encode())
    try:  # the same bounded, deadline-keeping reader as every call to a service
        response = upstream.send(client, outgoing, cap=MAX_TOKEN_RESPONSE, deadline_s=deadline_s)
    except errors.UpstreamError as exc:
        raise TokenEndpointUnavailable(f"token endpoint: {exc.code}") from exc
    if response.status_code == 429 or response.status_code >= 500:
        raise TokenEndpointUnavailable(f"token endpoint answered HTTP {response.status_code}")
    document = _json(response)
    if response.status_code >= 400 or "error" in document:
        # A server's words may quote what it was sent: its refresh token, even the client secret.
        error = redacted(str(document.get("error") or f"HTTP {response.status_code}"), request.secrets)[:100]
        description = document.get("error_description")
        message = f"{error}: {redacted(str(description), request.secrets)[:300]}" if description else error
        raise errors.TokenRequestFailed(f"the token endpoint refused the request ({message})")
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise errors.TokenRequestFailed("the token endpoint's answer has no access_token")
    try:
        expires_in: float | None = float(document["expires_in"]) if document.get("expires_in") is not None else None
    except (TypeError, ValueError):
        expires_in = None
    if expires_in is not None and not 0 <= expires_in <= MAX_EXPIRES_IN:
        expires_in = None  # NaN, infinite, negative or absurd: treated as unknown
    refresh_token = document.get("refresh_token")
    return Token(
        access_token=access_token,
        token_type=str(document.get("token_type") or "Bearer"),
        expires_in=expires_in,
        scope=str(document["scope"]) if document.get("scope") else None,
        refresh_token=refresh_token if isinstance(refresh_token, str) and refresh_token else None,
    )


def redacted(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` in it, as is or form-encoded, replaced by ``[secret]``."""
    forms = {form for secret in secrets if secret for form in (secret, quote_plus(secret))}
    for form in sorted(forms, key=len, reverse=True):  # the longest first: one secret may hold another
        text = text.replace(form, "[secret]")
    return text


def _json(response: upstream.Captured) -> dict[str, Any]:
    if response.truncated:
        raise errors.TokenRequestFailed("the token endpoint's answer is too large")
    try:
        document = json.loads(response.body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        if response.status_code >= 400:
            return {}
        raise errors.TokenRequestFailed("the token endpoint's answer is not a JSON object")
    return document
