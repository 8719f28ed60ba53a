"""Token requests: what ``oauth.build`` puts on the wire for each grant and client
authentication, and what ``oauth.send`` makes of each answer of the token endpoint.

The token endpoint is ``httpx.MockTransport``; keys for ``private_key_jwt`` are generated for
the test run, and the client assertion is verified with joserfc, not with the code that made it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote_plus, unquote_plus

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import ECKey, RSAKey

from models import errors
from worker import oauth

TOKEN_URL = "https://login.example.com/oauth2/token"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

# Distinctive credential values: an error message or repr that holds one is a leak.
CLIENT_ID = "cid-7d1e"
CLIENT_SECRET = "cs-SECRET-7f3a9e"
USERNAME = "alice"
PASSWORD = "pw-SECRET-51c2b"
REFRESH_TOKEN = "rt-SECRET-c0ffee"
ACCESS_TOKEN = "at-SECRET-0a0b0c"
CREDENTIALS = (CLIENT_SECRET, PASSWORD, REFRESH_TOKEN)

GRANTS = ["client_credentials", "password", "refresh_token"]
METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]


@dataclass(frozen=True)
class KeyPair:
    """A private key PEM for the ``private_key`` secret and the public key that verifies it."""

    private_pem: str
    public_pem: str
    alg: str

    def public(self) -> RSAKey | ECKey:
        return (RSAKey if self.alg == "RS256" else ECKey).import_key(self.public_pem)


def _pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, alg: str) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return KeyPair(private, public, alg)


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return _pair(ec.generate_private_key(ec.SECP256R1()), "ES256")


def settings_for(grant: str, method: str, **overrides: Any) -> dict[str, Any]:
    """A connection's ``oauth2`` block whose credentials are all secret references."""
    oauth2: dict[str, Any] = {
        "grant_type": grant,
        "token_url": TOKEN_URL,
        "client_id": "{{secrets.client_id}}",
        "client_secret": None if method == "private_key_jwt" else "{{secrets.client_secret}}",
        "client_auth_method": method,
        "scope": None,
        "audience": None,
        "extra_params": {},
        "refresh_token": "{{secrets.refresh_token}}" if grant == "refresh_token" else None,
        "username": USERNAME if grant == "password" else None,
        "password": "{{ secrets.password }}" if grant == "password" else None,
        "private_key": "{{secrets.private_key}}" if method == "private_key_jwt" else None,
    }
    oauth2.update(overrides)
    return oauth2


def opened(private_pem: str = "") -> dict[str, str]:
    """The secrets a worker would have opened for the connection."""
    return {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "password": PASSWORD,
        "refresh_token": REFRESH_TOKEN,
        "private_key": private_pem,
    }


def form(body: str) -> dict[str, str]:
    """A form-encoded body as a dict; every field must appear once."""
    parsed = parse_qs(body, keep_blank_values=True, strict_parsing=True)
    assert all(len(values) == 1 for values in parsed.values()), parsed
    return {name: values[0] for name, values in parsed.items()}


def basic_credentials(headers: dict[str, str], encoding: str = "utf-8") -> str:
    """The decoded ``user:password`` of an ``Authorization: Basic`` header."""
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    return base64.b64decode(encoded, validate=True).decode(encoding)


# --- oauth.build ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grant", GRANTS)
def test_build_puts_the_grant_and_the_client_authentication_on_the_wire(
    grant: str, method: str, rsa_key: KeyPair
) -> None:
    # Given a connection's oauth2 settings for this grant and client authentication
    oauth2 = settings_for(grant, method)
    # When the token request is built from the opened secrets
    request = oauth.build(oauth2, secrets=opened(rsa_key.private_pem), auth_headers={})
    body = form(request.body)
    # Then it is a form POST to the token URL asking for JSON
    assert request.url == TOKEN_URL
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert request.headers["Accept"] == "application/json"
    assert body["grant_type"] == grant
    # And the grant's own fields carry the secrets' values, not their references
    if grant == "password":
        assert body["username"] == USERNAME
        assert body["password"] == PASSWORD
    else:
        assert "username" not in body and "password" not in body
    if grant == "refresh_token":
        assert body["refresh_token"] == REFRESH_TOKEN
    else:
        assert "refresh_token" not in body
    assert "{{" not in request.body and "secrets." not in request.body
    # And the client authenticates the way the method says, and only that way
    if method == "client_secret_basic":
        assert basic_credentials(request.headers) == f"{CLIENT_ID}:{CLIENT_SECRET}"
        assert "client_secret" not in body
        assert "client_assertion" not in body
    elif method == "client_secret_post":
        assert "Authorization" not in request.headers
        assert body["client_id"] == CLIENT_ID
        assert body["client_secret"] == CLIENT_SECRET
    else:
        assert "Authorization" not in request.headers
        assert "client_secret" not in body
        assert CLIENT_SECRET not in request.body
        assert body["client_assertion_type"] == JWT_BEARER
        assert body["client_assertion"].count(".") == 2


@pytest.mark.parametrize("key_name", ["rsa_key", "ec_key"])
def test_private_key_jwt_assertion_verifies_with_the_public_key(
    key_name: str, request: pytest.FixtureRequest
) -> None:
    # Given a private_key_jwt client whose PEM key is an RSA 2048 or EC P-256 secret
    pair: KeyPair = request.getfixturevalue(key_name)
    oauth2 = settings_for("client_credentials", "private_key_jwt")
    # When the token request is built
    before = int(time.time())
    built = oauth.build(oauth2, secrets=opened(pair.private_pem), auth_headers={})
    body = form(built.body)
    # Then the client assertion is a JWT signed with the key's algorithm, verifiable with the public key
    assert body["client_assertion_type"] == JWT_BEARER
    token = jwt.decode(body["client_assertion"], pair.public(), algorithms=[pair.alg])
    assert token.header["alg"] == pair.alg
    # And it names the client as issuer and subject, and the token endpoint as audience
    claims = token.claims
    assert claims["iss"] == CLIENT_ID
    assert claims["sub"] == CLIENT_ID
    aud = claims["aud"]
    assert aud == TOKEN_URL or aud == [TOKEN_URL]
    # And it is current, expires later, and carries a unique id
    assert before - 5 <= claims["iat"] <= time.time() + 5
    assert claims["exp"] > claims["iat"]
    assert isinstance(claims.get("jti"), str) and claims["jti"]


def test_private_key_jwt_assertion_does_not_verify_with_another_key(rsa_key: KeyPair) -> None:
    # Given an assertion signed with one RSA key
    built = oauth.build(settings_for("client_credentials", "private_key_jwt"),
                        secrets=opened(rsa_key.private_pem), auth_headers={})
    assertion = form(built.body)["client_assertion"]
    other = _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    # When it is checked with another public key
    # Then the signature does not verify (the check above is not vacuous)
    with pytest.raises(BadSignatureError):
        jwt.decode(assertion, other.public(), algorithms=["RS256"])


def test_two_assertions_have_different_ids(ec_key: KeyPair) -> None:
    # Given a private_key_jwt client
    oauth2 = settings_for("client_credentials", "private_key_jwt")
    # When two token requests are built
    first, second = (form(oauth.build(oauth2, secrets=opened(ec_key.private_pem), auth_headers={}).body)
                     for _ in range(2))
    # Then each assertion has its own jti (a server may refuse a replayed one)
    decode = ec_key.public()
    ids = {jwt.decode(b["client_assertion"], decode, algorithms=["ES256"]).claims["jti"] for b in (first, second)}
    assert len(ids) == 2


def test_a_private_key_that_is_not_pem_is_a_token_request_failure() -> None:
    # Given a private_key secret that is not a PEM key
    oauth2 = settings_for("client_credentials", "private_key_jwt")
    not_a_key = "-----BEGIN PRIVATE KEY-----\nk3y-SECRET-zz\n-----END PRIVATE KEY-----\n"
    # When the token request is built
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.build(oauth2, secrets=opened(not_a_key), auth_headers={})
    # Then it fails as token_request_failed without quoting the key
    assert caught.value.code == "token_request_failed"
    assert "k3y-SECRET-zz" not in str(caught.value)


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_scope_audience_and_extra_params_go_in_the_body(method: str) -> None:
    # Given settings with a scope, an audience and extra parameters
    oauth2 = settings_for("client_credentials", method, scope="api read:items",
                          audience="https://api.example.com/", extra_params={"resource": "urn:items", "tenant": "t1"})
    # When the token request is built
    body = form(oauth.build(oauth2, secrets=opened(), auth_headers={}).body)
    # Then each is a field of the form body, decoded back to the value given
    assert body["scope"] == "api read:items"
    assert body["audience"] == "https://api.example.com/"
    assert body["resource"] == "urn:items"
    assert body["tenant"] == "t1"


def test_unset_scope_and_audience_are_not_sent() -> None:
    # Given settings without scope or audience
    oauth2 = settings_for("client_credentials", "client_secret_post")
    # When the token request is built
    body = form(oauth.build(oauth2, secrets=opened(), auth_headers={}).body)
    # Then neither appears, not even empty
    assert "scope" not in body
    assert "audience" not in body


def test_auth_headers_go_with_the_token_request_with_their_secrets_filled() -> None:
    # Given a connection whose custom auth headers use a secret and a literal
    oauth2 = settings_for("client_credentials", "client_secret_post")
    auth_headers = {"X-Client-Key": "key {{secrets.client_secret}}", "X-Api-Version": "58.0"}
    # When the token request is built
    request = oauth.build(oauth2, secrets=opened(), auth_headers=auth_headers)
    # Then both headers are sent, the reference replaced by the secret's value
    assert request.headers["X-Client-Key"] == f"key {CLIENT_SECRET}"
    assert request.headers["X-Api-Version"] == "58.0"


def test_secret_references_in_extra_params_are_filled() -> None:
    # Given extra token parameters, one of them a secret reference
    oauth2 = settings_for("client_credentials", "client_secret_post",
                          extra_params={"resource": "urn:items", "api_key": "{{secrets.extra_key}}"})
    # When the token request is built with that secret opened
    body = form(oauth.build(oauth2, secrets={**opened(), "extra_key": "ek-VALUE"}, auth_headers={}).body)
    # Then the parameter carries the secret's value, as every other reference does
    assert body["resource"] == "urn:items"
    assert body["api_key"] == "ek-VALUE"


@pytest.mark.parametrize("secret", ["s3cr:t +/%é", "s3cr€t"], ids=["latin-1", "beyond-latin-1"])
def test_basic_credentials_are_form_urlencoded_as_rfc_6749_requires(secret: str) -> None:
    # Given a client id and secret with characters form-urlencoding must carry
    secrets = {**opened(), "client_id": "app:1", "client_secret": secret}
    oauth2 = settings_for("client_credentials", "client_secret_basic")
    # When the token request is built
    request = oauth.build(oauth2, secrets=secrets, auth_headers={})
    # Then a server that decodes each part as RFC 6749 says gets the values back
    raw_id, _, raw_secret = basic_credentials(request.headers, "ascii").partition(":")
    assert unquote_plus(raw_id) == "app:1"
    assert unquote_plus(raw_secret) == secret


# --- oauth.send ----------------------------------------------------------------------------


@dataclass
class TokenEndpoint:
    """A mock token endpoint that answers with ``respond`` and records what it got."""

    respond: Callable[[httpx.Request], httpx.Response]
    requests: list[httpx.Request]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)


@pytest.fixture
def endpoint() -> TokenEndpoint:
    return TokenEndpoint(respond=lambda request: httpx.Response(500), requests=[])


@pytest.fixture
def client(endpoint: TokenEndpoint) -> Iterator[httpx.Client]:
    with httpx.Client(transport=httpx.MockTransport(endpoint.handler)) as client:
        yield client


def answer(status: int, document: Any = None, *, content: bytes | None = None) -> Callable[[httpx.Request], httpx.Response]:
    """A responder with a JSON ``document`` (or raw ``content``)."""
    if content is None:
        content = json.dumps(document).encode()
    return lambda request: httpx.Response(status, headers={"Content-Type": "application/json"}, content=content)


def password_request(method: str = "client_secret_post") -> oauth.TokenRequest:
    """A token request carrying every distinctive credential (password grant, secret in the body)."""
    return oauth.build(settings_for("password", method, refresh_token="{{secrets.refresh_token}}"),
                       secrets=opened(), auth_headers={"X-Refresh": "{{secrets.refresh_token}}"})


def test_send_posts_the_built_request_and_returns_the_granted_token(
    endpoint: TokenEndpoint, client: httpx.Client
) -> None:
    # Given a token endpoint that grants a token
    endpoint.respond = answer(200, {"access_token": ACCESS_TOKEN, "token_type": "bearer", "expires_in": 3600,
                                    "scope": "api read", "refresh_token": "rt-new"})
    request = password_request()
    # When the token request is sent
    token = oauth.send(client, request)
    # Then the endpoint got exactly the built POST
    assert len(endpoint.requests) == 1
    got = endpoint.requests[0]
    assert got.method == "POST"
    assert str(got.url) == TOKEN_URL
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form(got.content.decode()) == form(request.body)
    # And the token holds the answer's fields
    assert token.access_token == ACCESS_TOKEN
    assert token.token_type == "bearer"
    assert token.expires_in == 3600
    assert token.scope == "api read"
    assert token.refresh_token == "rt-new"


def test_a_minimal_answer_gives_defaults(endpoint: TokenEndpoint, client: httpx.Client) -> None:
    # Given an answer with only an access token
    endpoint.respond = answer(200, {"access_token": ACCESS_TOKEN})
    # When the token request is sent
    token = oauth.send(client, password_request())
    # Then the lifetime is unknown, the type is Bearer, and there is no scope or refresh token
    assert token.expires_in is None
    assert token.token_type == "Bearer"
    assert token.scope is None
    assert token.refresh_token is None


@pytest.mark.parametrize("expires_in", ["soon", [3600], {"s": 1}, ""])
def test_a_non_numeric_expires_in_is_unknown(endpoint: TokenEndpoint, client: httpx.Client, expires_in: Any) -> None:
    # Given an answer whose expires_in is not a number
    endpoint.respond = answer(200, {"access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": expires_in})
    # When the token request is sent
    token = oauth.send(client, password_request())
    # Then the token is still granted, with an unknown lifetime
    assert token.access_token == ACCESS_TOKEN
    assert token.expires_in is None


def test_a_numeric_string_expires_in_is_read_as_seconds(endpoint: TokenEndpoint, client: httpx.Client) -> None:
    # Given an answer that sends expires_in as a string, as some servers do
    endpoint.respond = answer(200, {"access_token": ACCESS_TOKEN, "expires_in": "1800"})
    # When the token request is sent
    # Then the lifetime is 1800 seconds
    assert oauth.send(client, password_request()).expires_in == 1800


@pytest.mark.parametrize(
    ("status", "document", "words"),
    [
        (400, {"error": "invalid_grant", "error_description": "bad"}, ["invalid_grant", "bad"]),
        (401, {"error": "invalid_client", "error_description": "client authentication failed"},
         ["invalid_client", "client authentication failed"]),
        (400, {"error": "unauthorized_client"}, ["unauthorized_client"]),
        (200, {"error": "invalid_scope", "error_description": "no such scope"}, ["invalid_scope", "no such scope"]),
    ],
)
def test_a_refusal_is_token_request_failed_with_the_servers_error(
    endpoint: TokenEndpoint, client: httpx.Client, status: int, document: dict[str, str], words: list[str]
) -> None:
    # Given a token endpoint that refuses the request with an OAuth error
    endpoint.respond = answer(status, document)
    # When the token request is sent
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, password_request())
    # Then it fails for good (not as "unavailable"), with the server's error in the message
    assert not isinstance(caught.value, oauth.TokenEndpointUnavailable)
    assert caught.value.code == "token_request_failed"
    for word in words:
        assert word in caught.value.message
    assert len(endpoint.requests) == 1


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_a_busy_or_failing_endpoint_is_unavailable(endpoint: TokenEndpoint, client: httpx.Client, status: int) -> None:
    # Given a token endpoint that answers 429 or 5xx
    endpoint.respond = answer(status, {"error": "temporarily_unavailable"})
    # When the token request is sent
    with pytest.raises(oauth.TokenEndpointUnavailable) as caught:
        oauth.send(client, password_request())
    # Then it is the retryable failure, still a token_request_failed for the job
    assert caught.value.code == "token_request_failed"
    assert str(status) in caught.value.message


@pytest.mark.parametrize("failure", [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.ConnectError])
def test_a_timeout_or_connection_error_is_unavailable(
    endpoint: TokenEndpoint, client: httpx.Client, failure: type[httpx.TransportError]
) -> None:
    # Given a token endpoint that cannot be reached in time
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure(f"failed sending {request.content.decode()}", request=request)

    endpoint.respond = fail
    # When the token request is sent
    with pytest.raises(oauth.TokenEndpointUnavailable) as caught:
        oauth.send(client, password_request())
    # Then it is the retryable failure, naming what went wrong
    assert caught.value.code == "token_request_failed"
    expected = {httpx.ConnectTimeout: "connect_timeout", httpx.ReadTimeout: "read_timeout",
                httpx.ConnectError: "connection_refused"}[failure]
    assert expected in caught.value.message


@pytest.mark.parametrize(
    "document",
    [{"token_type": "Bearer", "expires_in": 3600}, {"access_token": ""}, {"access_token": 12345}, {"access_token": None}],
)
def test_a_200_without_an_access_token_is_token_request_failed(
    endpoint: TokenEndpoint, client: httpx.Client, document: dict[str, Any]
) -> None:
    # Given a 200 answer without a usable access_token
    endpoint.respond = answer(200, document)
    # When the token request is sent
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, password_request())
    # Then it fails for good, saying the token is missing
    assert not isinstance(caught.value, oauth.TokenEndpointUnavailable)
    assert "access_token" in caught.value.message


@pytest.mark.parametrize("content", [b"<html>login</html>", b"access_token=abc&token_type=bearer", b"[1, 2]", b""])
def test_a_200_that_is_not_a_json_object_is_token_request_failed(
    endpoint: TokenEndpoint, client: httpx.Client, content: bytes
) -> None:
    # Given a 200 answer that is not a JSON object
    endpoint.respond = answer(200, content=content)
    # When the token request is sent
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, password_request())
    # Then it fails for good
    assert not isinstance(caught.value, oauth.TokenEndpointUnavailable)
    assert caught.value.code == "token_request_failed"


def test_an_oversized_answer_is_token_request_failed(endpoint: TokenEndpoint, client: httpx.Client) -> None:
    # Given an answer larger than a token response can reasonably be
    endpoint.respond = answer(200, {"access_token": ACCESS_TOKEN, "padding": "x" * 100_000})
    # When the token request is sent
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, password_request())
    # Then it is refused
    assert "too large" in caught.value.message


def _raise(failure: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure("timed out", request=request)

    return fail


@pytest.mark.parametrize(
    "respond",
    [
        answer(400, {"error": "invalid_grant", "error_description": "bad"}),
        answer(401, {"error": "invalid_client"}),
        answer(400, content=b"not json"),
        answer(403, content=b""),
        answer(503, {}),
        answer(429, {}),
        answer(200, {"token_type": "Bearer"}),
        answer(200, content=b"<html/>"),
        _raise(httpx.ConnectTimeout),
        _raise(httpx.ReadTimeout),
    ],
    ids=["400", "401", "400-text", "403-empty", "503", "429", "200-no-token", "200-html", "connect-timeout",
         "read-timeout"],
)
@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_no_failure_message_holds_a_credential(
    endpoint: TokenEndpoint, client: httpx.Client, respond: Callable[[httpx.Request], httpx.Response], method: str
) -> None:
    # Given a token request carrying a client secret, a password and a refresh token
    endpoint.respond = respond
    request = password_request(method)
    assert PASSWORD in request.body and REFRESH_TOKEN in request.headers["X-Refresh"]
    # When the endpoint fails it in any way
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, request)
    # Then neither the message nor the error's text quotes any credential
    shown = f"{caught.value.message} {caught.value} {caught.value!r} {caught.value.extra}"
    encoded_basic = request.headers.get("Authorization", "Basic -").split(" ", 1)[1]
    for value in (*CREDENTIALS, encoded_basic):
        assert value not in shown


def test_a_refusal_that_quotes_a_credential_shows_the_servers_words_without_it(
    endpoint: TokenEndpoint, client: httpx.Client
) -> None:
    # Given a token endpoint whose refusal quotes what it was sent: credentials as is, and one form-encoded
    special = "p w+/=SECRET"
    request = oauth.build(settings_for("password", "client_secret_post", refresh_token="{{secrets.refresh_token}}"),
                          secrets={**opened(), "password": special}, auth_headers={})
    endpoint.respond = answer(400, {"error": f"invalid_grant {REFRESH_TOKEN}",
                                    "error_description": f"client {CLIENT_SECRET}, password={quote_plus(special)}"})
    # When the token request is sent
    with pytest.raises(errors.TokenRequestFailed) as caught:
        oauth.send(client, request)
    # Then the message keeps the server's words, each credential replaced
    assert caught.value.message == \
        "the token endpoint refused the request (invalid_grant [secret]: client [secret], password=[secret])"


def test_reprs_hide_the_token_and_the_request_body() -> None:
    # Given a granted token and a token request full of credentials
    token = oauth.Token(access_token=ACCESS_TOKEN, token_type="Bearer", expires_in=60.0, scope="api",
                        refresh_token=REFRESH_TOKEN)
    request = password_request("client_secret_basic")
    # When they are shown, as a log line or a traceback would
    shown = [repr(token), str(token), repr(request), str(request), f"{[token, request]}"]
    # Then no token, credential or encoded Basic credential is in them
    encoded_basic = request.headers["Authorization"].split(" ", 1)[1]
    for text in shown:
        for value in (ACCESS_TOKEN, *CREDENTIALS, encoded_basic):
            assert value not in text
    # And they still say what they are
    assert "Bearer" in repr(token) and TOKEN_URL in repr(request)
