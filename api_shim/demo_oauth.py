"""A test OAuth 2.0 authorization server (RFC 6749, RFC 7523 client assertions) for the demo upstream.

:class:`OAuthServer` holds clients, users and tokens in memory; the demo upstream
(:mod:`api_shim.demo_upstream`) hands it every request under ``/oauth/``. It checks what a real
server checks, records what a test needs to assert, and fails on demand.

Endpoints:

- ``POST /oauth/token`` (``application/x-www-form-urlencoded``): grants ``client_credentials``,
  ``password`` and ``refresh_token``; client authentication ``client_secret_basic``,
  ``client_secret_post`` or ``private_key_jwt`` (RS256/ES256 assertion, ``aud`` the token URL
  ``http://{Host}/oauth/token``, each ``jti`` once). Answers 200 with a token document, or
  400/401 with ``{"error", "error_description"}``.
- ``/oauth/protected/...`` (any method): 200 with ``Authorization: Bearer <issued token>``,
  else 401 ``invalid_token``.
- ``/oauth/admin/...`` (JSON): ``clients``, ``users``, ``refresh-tokens``, ``settings``,
  ``fail``, ``revoke``, ``stats``, ``reset``; see :meth:`OAuthServer.handle_admin`.

Default state: client ``demo-client`` / ``demo-secret``, user ``demo-user`` / ``demo-password``,
tokens valid for 3600 s, refresh tokens rotated on use. Nothing here is for production: tokens
live in memory and the admin endpoints have no authentication.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_plus

from authlib.deprecate import AuthlibDeprecationWarning  # first: importing it installs an "always" filter

from api_shim.demo_oauth_admin import AdminEndpoints
from api_shim.demo_oauth_state import (
    BASIC,
    DEFAULT_SCOPE,
    POST,
    PRIVATE_KEY_JWT,
    SECRET_FIELDS,
    AccessToken,
    Record,
    RefreshToken,
    Refusal,
    Reply,
    State,
    header_map,
    invalid_client,
    invalid_grant,
    invalid_request,
    parse_form,
    same_text,
    token_id,
)

with warnings.catch_warnings():
    # authlib 1.9 announces on import that authlib.jose moves to joserfc in 2.0; the API is stable until then.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.jose import JsonWebToken
    from authlib.jose.errors import JoseError

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


_ASSERTIONS = JsonWebToken(["RS256", "ES256"])
_KEY_TYPE_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}


class OAuthServer(AdminEndpoints):
    """The token server's state and request handling; thread-safe.

    :meth:`handle` takes a request under ``/oauth/`` and returns a :class:`Reply`; sleeps
    (``delay_s``, ``hang_s``) happen outside the lock, and a reset wakes them.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._state = State.default()

    # --- dispatch ---------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: Iterable[tuple[str, str]], body: bytes) -> Reply:
        """Answer one request whose path starts with ``/oauth/``."""
        named = header_map(headers)
        if path == "/oauth/token":
            return self.handle_token(method, named, body)
        if path == "/oauth/protected" or path.startswith("/oauth/protected/"):
            return self.handle_protected(method, path, named)
        if path.startswith("/oauth/admin/"):
            return self.handle_admin(method, path.removeprefix("/oauth/admin/").strip("/"), body)
        return Reply(404, {"error": "not_found", "path": path})

    # --- token endpoint ---------------------------------------------------------------------

    def handle_token(self, method: str, headers: dict[str, str], body: bytes) -> Reply:
        """``/oauth/token``: authenticate the client, apply the grant, record the request."""
        with self._lock:
            delay = self._state.settings.delay_s
            failure = self._state.failure
            if failure is not None:
                failure.count -= 1
                if failure.count <= 0:
                    self._state.failure = None
                delay += failure.hang_s
            wake = self._wake
        if delay > 0:
            wake.wait(delay)
        record = Record(headers={name: value for name, value in headers.items() if name.startswith("x-")})
        with self._lock:
            record.at = self._clock()
            if failure is not None:
                record.injected = True
                reply = failure.reply()
                try:
                    self._note_form(record, parse_form(headers, body))
                except Refusal:
                    pass
            else:
                try:
                    reply = self._token(method, headers, body, record)
                except Refusal as refusal:
                    reply = refusal.reply()
            record.status = reply.status
            record.error = reply.document.get("error") if reply.status >= 400 else None
            self._count(record)
        return reply

    def _token(self, method: str, headers: dict[str, str], body: bytes, record: Record) -> Reply:
        if method != "POST":
            raise Refusal(405, "invalid_request", "the token endpoint takes POST", {"Allow": "POST"})
        form = parse_form(headers, body)
        self._note_form(record, form)
        token_url = f"http://{headers.get('host', '')}/oauth/token"
        client_id = self._authenticate(form, headers, token_url, record)
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise invalid_request("grant_type is missing")
        if grant_type == "client_credentials":
            scope = form.get("scope", DEFAULT_SCOPE)
            document = self._issue(client_id, scope, None, self._state.settings.refresh_token_for_client_credentials)
        elif grant_type == "password":
            username, password = form.get("username"), form.get("password")
            if username is None or password is None:
                raise invalid_request("username and password are required")
            known = self._state.users.get(username)
            if known is None or not same_text(password, known):
                raise invalid_grant("wrong username or password")
            document = self._issue(client_id, form.get("scope", DEFAULT_SCOPE), username, True)
        elif grant_type == "refresh_token":
            document = self._refresh(client_id, form)
        else:
            raise Refusal(400, "unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
        record.access_token_id = token_id(document["access_token"])
        return Reply(200, document, {"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _note_form(self, record: Record, form: dict[str, str]) -> None:
        record.grant_type = form.get("grant_type")
        record.client_id = form.get("client_id")
        record.scope = form.get("scope")
        record.audience = form.get("audience")
        if "refresh_token" in form:
            record.refresh_token_id = token_id(form["refresh_token"])
        record.fields = {name: value for name, value in form.items() if name not in SECRET_FIELDS}

    def _count(self, record: Record) -> None:
        state = self._state
        state.records.append(record)
        state.counts["token_requests"] += 1
        state.counts["successes" if record.status == 200 else "failures"] += 1
        state.by_grant[record.grant_type or "(missing)"] += 1
        state.by_auth_method[record.auth_method or "(none)"] += 1

    # --- client authentication --------------------------------------------------------------

    def _authenticate(self, form: dict[str, str], headers: dict[str, str], token_url: str, record: Record) -> str:
        """The authenticated client's id, or a refusal (RFC 6749 2.3, RFC 7523 3)."""
        authorization = headers.get("authorization", "")
        scheme, _, credentials = authorization.partition(" ")
        used = []
        if scheme.lower() == "basic":
            used.append(BASIC)
        if "client_secret" in form:
            used.append(POST)
        if "client_assertion" in form or "client_assertion_type" in form:
            used.append(PRIVATE_KEY_JWT)
        if len(used) > 1:
            raise invalid_request("more than one client authentication method: " + ", ".join(used))
        if not used:
            raise invalid_client("client authentication is required")
        record.auth_method = used[0]
        if used[0] == BASIC:
            client_id, secret = self._basic_credentials(credentials.strip())
            record.client_id = client_id
            if form.get("client_id", client_id) != client_id:
                raise invalid_client("client_id differs from the Basic credentials", basic=True)
            self._check_secret(client_id, secret, basic=True)
            return client_id
        if used[0] == POST:
            posted_id = form.get("client_id")
            if posted_id is None:
                raise invalid_client("client_id is missing")
            self._check_secret(posted_id, form["client_secret"], basic=False)
            return posted_id
        return self._check_assertion(form, token_url, record)

    @staticmethod
    def _basic_credentials(credentials: str) -> tuple[str, str]:
        """Client id and secret from HTTP Basic, each form-urlencoded inside (RFC 6749 2.3.1)."""
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise invalid_client("malformed Basic credentials", basic=True) from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon or not raw_id:
            raise invalid_client("malformed Basic credentials", basic=True)
        return unquote_plus(raw_id), unquote_plus(raw_secret)

    def _check_secret(self, client_id: str, secret: str, *, basic: bool) -> None:
        client = self._state.clients.get(client_id)
        if client is None or client.client_secret is None or not same_text(secret, client.client_secret):
            raise invalid_client("unknown client or wrong secret", basic=basic)

    def _check_assertion(self, form: dict[str, str], token_url: str, record: Record) -> str:
        """Verify a ``private_key_jwt`` client assertion; its ``jti`` is used up."""
        if form.get("client_assertion_type") != JWT_BEARER:
            raise invalid_client(f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion")
        if assertion is None or assertion.count(".") != 2:
            raise invalid_client("client_assertion must be a signed JWT (JWS compact)")

        def key_for(header: dict[str, Any], payload: dict[str, Any]) -> str:
            client_id = payload.get("sub")
            if not isinstance(client_id, str):
                raise invalid_client("client assertion has no sub")
            record.client_id = client_id
            client = self._state.clients.get(client_id)
            if client is None or client.public_key_pem is None:
                raise invalid_client("unknown client or no registered public key")
            if _KEY_TYPE_FOR_ALG.get(header.get("alg", "")) != client.key_type:
                raise invalid_client(f"alg {header.get('alg')!r} does not fit the client's {client.key_type} key")
            return client.public_key_pem

        options = {
            "iss": {"essential": True},
            "sub": {"essential": True},
            "aud": {"essential": True, "values": [token_url]},
            "exp": {"essential": True},
            "jti": {"essential": True},
        }
        now = self._clock()
        try:
            claims = _ASSERTIONS.decode(assertion, key_for, claims_options=options)
            claims.validate(now=now)
        except JoseError as exc:
            raise invalid_client(f"client assertion refused: {exc.error}: {exc.description or ''}".strip()) from None
        except (ValueError, TypeError) as exc:
            raise invalid_client(f"client assertion refused: {exc}") from None
        client_id, jti = claims["sub"], claims["jti"]
        if claims["iss"] != client_id:
            raise invalid_client("client assertion iss and sub must both be the client_id")
        if form.get("client_id", client_id) != client_id:
            raise invalid_client("client_id differs from the assertion's sub")
        if not isinstance(jti, str):
            raise invalid_client("client assertion jti must be a string")
        seen = self._state.seen_jtis
        for key in [key for key, exp in seen.items() if exp < now]:
            del seen[key]  # an expired assertion is refused on exp anyway
        if (client_id, jti) in seen:
            raise invalid_client("client assertion jti was used before")
        seen[(client_id, jti)] = float(claims["exp"])
        return str(client_id)

    # --- grants -----------------------------------------------------------------------------

    def _refresh(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        presented = form.get("refresh_token")
        if presented is None:
            raise invalid_request("refresh_token is missing")
        grant = self._state.refresh_tokens.get(presented)
        if grant is None:
            raise invalid_grant("unknown, used or revoked refresh token")
        if grant.client_id != client_id:
            raise invalid_grant("the refresh token was issued to another client")
        scope = form.get("scope")
        if scope is not None and grant.scope is not None and not set(scope.split()) <= set(grant.scope.split()):
            raise Refusal(400, "invalid_scope", "the scope asked for exceeds the one granted")
        scope = scope or grant.scope or DEFAULT_SCOPE
        rotate = self._state.settings.rotate_refresh_tokens
        document = self._issue(client_id, scope, grant.username, False)
        if rotate:
            del self._state.refresh_tokens[presented]
            document["refresh_token"] = self._new_refresh_token(client_id, grant.scope, grant.username)
        return document

    def _issue(self, client_id: str, scope: str, username: str | None, with_refresh: bool) -> dict[str, Any]:
        """A token response: an access token, and a refresh token when asked for."""
        expires_in = self._state.settings.expires_in
        access = "demo-at-" + secrets.token_urlsafe(24)
        expires_at = None if expires_in is None else self._clock() + expires_in
        self._state.access_tokens[access] = AccessToken(client_id, scope, username, expires_at)
        document: dict[str, Any] = {"access_token": access, "token_type": "Bearer"}
        if expires_in is not None:
            document["expires_in"] = expires_in
        document["scope"] = scope
        if with_refresh:
            document["refresh_token"] = self._new_refresh_token(client_id, scope, username)
        return document

    def _new_refresh_token(self, client_id: str, scope: str | None, username: str | None) -> str:
        token = "demo-rt-" + secrets.token_urlsafe(24)
        self._state.refresh_tokens[token] = RefreshToken(client_id, scope, username)
        return token

    # --- protected resource -----------------------------------------------------------------

    def handle_protected(self, method: str, path: str, headers: dict[str, str]) -> Reply:
        """``/oauth/protected/...``: 200 for a live issued bearer token, else 401 (RFC 6750 3)."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        token = token.strip()
        with self._lock:
            self._state.counts["protected_calls"] += 1
            issued = self._state.access_tokens.get(token) if scheme.lower() == "bearer" and token else None
            if issued is not None and issued.expires_at is not None and issued.expires_at <= self._clock():
                issued = None
            if issued is None:
                self._state.counts["protected_unauthorized"] += 1
                return Reply(401, {"error": "invalid_token"}, {"WWW-Authenticate": 'Bearer error="invalid_token"'})
        document = {
            "ok": True,
            "path": path,
            "method": method,
            "token_id": token_id(token),
            "client_id": issued.client_id,
            "scope": issued.scope,
            "username": issued.username,
        }
        return Reply(200, document)

    # --- admin ------------------------------------------------------------------------------
