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
import hashlib
import hmac
import json
import secrets
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from authlib.deprecate import AuthlibDeprecationWarning  # first: importing it installs an "always" filter
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

with warnings.catch_warnings():
    # authlib 1.9 announces on import that authlib.jose moves to joserfc in 2.0; the API is stable until then.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.jose import JsonWebToken
    from authlib.jose.errors import JoseError

DEFAULT_CLIENT_ID = "demo-client"
DEFAULT_CLIENT_SECRET = "demo-secret"
DEFAULT_USERNAME = "demo-user"
DEFAULT_PASSWORD = "demo-password"
DEFAULT_SCOPE = "default"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SECRET_FIELDS = frozenset({"client_secret", "password", "client_assertion", "refresh_token", "assertion", "code",
                           "code_verifier"})
"""Form fields whose values are never recorded."""
MAX_RECORDS = 1000
MAX_SLEEP_S = 60.0

BASIC = "client_secret_basic"
POST = "client_secret_post"
PRIVATE_KEY_JWT = "private_key_jwt"

_ASSERTIONS = JsonWebToken(["RS256", "ES256"])
_KEY_TYPE_FOR_ALG = {"RS256": "RSA", "ES256": "EC"}


def token_id(token: str) -> str:
    """A stable, non-secret name for a token: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Reply:
    """What to answer: a status, a JSON document and extra headers."""

    status: int
    document: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        """The document as JSON bytes."""
        return json.dumps(self.document).encode()


class Refusal(Exception):
    """A request the server refuses: becomes an OAuth error document (RFC 6749 5.2)."""

    def __init__(self, status: int, error: str, description: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.headers = headers or {}

    def reply(self) -> Reply:
        """The error response."""
        return Reply(self.status, {"error": self.error, "error_description": self.description}, self.headers)


def _invalid_request(description: str) -> Refusal:
    return Refusal(400, "invalid_request", description)


def _invalid_client(description: str, *, basic: bool = False) -> Refusal:
    headers = {"WWW-Authenticate": 'Basic realm="demo-oauth"'} if basic else {}
    return Refusal(401, "invalid_client", description, headers)


def _invalid_grant(description: str) -> Refusal:
    return Refusal(400, "invalid_grant", description)


@dataclass
class Client:
    """A registered client: a secret, a public key, or both."""

    client_id: str
    client_secret: str | None = None
    public_key_pem: str | None = None
    key_type: str | None = None  # "RSA" or "EC" (P-256), from the PEM

    def auth_methods(self) -> list[str]:
        """The client authentication methods this client can use."""
        methods = [BASIC, POST] if self.client_secret is not None else []
        return methods + ([PRIVATE_KEY_JWT] if self.public_key_pem is not None else [])


@dataclass
class AccessToken:
    """An issued access token."""

    client_id: str
    scope: str
    username: str | None
    expires_at: float | None  # None: never expires


@dataclass
class RefreshToken:
    """An issued (or seeded) refresh token."""

    client_id: str
    scope: str | None  # None (seeded without a scope): any scope may be asked for
    username: str | None


@dataclass
class Settings:
    """How the token endpoint answers; changed by ``POST /oauth/admin/settings``."""

    expires_in: int | None = 3600
    delay_s: float = 0.0
    rotate_refresh_tokens: bool = True
    refresh_token_for_client_credentials: bool = False


@dataclass
class Failure:
    """An injected failure for the next ``count`` token requests."""

    status: int = 500
    error: str = "server_error"
    error_description: str | None = None
    count: int = 1
    hang_s: float = 0.0
    retry_after: int | None = None

    def reply(self) -> Reply:
        """The injected response."""
        document: dict[str, Any] = {"error": self.error}
        if self.error_description is not None:
            document["error_description"] = self.error_description
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        return Reply(self.status, document, headers)


@dataclass
class Record:
    """One token request as seen by the server, without secret values."""

    grant_type: str | None = None
    auth_method: str | None = None
    client_id: str | None = None
    scope: str | None = None
    audience: str | None = None
    refresh_token_id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 0
    error: str | None = None
    injected: bool = False
    access_token_id: str | None = None
    at: float = 0.0


@dataclass
class State:
    """Everything the server knows; replaced whole by a reset."""

    settings: Settings = field(default_factory=Settings)
    clients: dict[str, Client] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)
    access_tokens: dict[str, AccessToken] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict)
    seen_jtis: dict[tuple[str, str], float] = field(default_factory=dict)
    failure: Failure | None = None
    records: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))
    counts: Counter[str] = field(default_factory=Counter)
    by_grant: Counter[str] = field(default_factory=Counter)
    by_auth_method: Counter[str] = field(default_factory=Counter)

    @classmethod
    def default(cls) -> State:
        """The state a fresh server starts in."""
        state = cls()
        state.clients[DEFAULT_CLIENT_ID] = Client(DEFAULT_CLIENT_ID, client_secret=DEFAULT_CLIENT_SECRET)
        state.users[DEFAULT_USERNAME] = DEFAULT_PASSWORD
        return state


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def _headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers with lower-cased names (the last of repeated ones)."""
    return {name.lower(): value for name, value in items}


def _parse_form(headers: dict[str, str], body: bytes) -> dict[str, str]:
    """The token request's form fields; empty values count as omitted (RFC 6749 3.2)."""
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise _invalid_request("the token request must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise _invalid_request("the form is not UTF-8") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise _invalid_request(f"parameter {name!r} is repeated")
        if value:
            form[name] = value
    return form


def _key_type(pem: str) -> str:
    """``RSA`` or ``EC`` for a PEM public key usable with RS256 or ES256."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise _invalid_request("public_key_pem is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "EC"
    raise _invalid_request("public_key_pem must be an RSA or a P-256 key")


class OAuthServer:
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
        named = _headers(headers)
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
                    self._note_form(record, _parse_form(headers, body))
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
        form = _parse_form(headers, body)
        self._note_form(record, form)
        token_url = f"http://{headers.get('host', '')}/oauth/token"
        client_id = self._authenticate(form, headers, token_url, record)
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise _invalid_request("grant_type is missing")
        if grant_type == "client_credentials":
            scope = form.get("scope", DEFAULT_SCOPE)
            document = self._issue(client_id, scope, None, self._state.settings.refresh_token_for_client_credentials)
        elif grant_type == "password":
            username, password = form.get("username"), form.get("password")
            if username is None or password is None:
                raise _invalid_request("username and password are required")
            known = self._state.users.get(username)
            if known is None or not _same(password, known):
                raise _invalid_grant("wrong username or password")
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
            raise _invalid_request("more than one client authentication method: " + ", ".join(used))
        if not used:
            raise _invalid_client("client authentication is required")
        record.auth_method = used[0]
        if used[0] == BASIC:
            client_id, secret = self._basic_credentials(credentials.strip())
            record.client_id = client_id
            if form.get("client_id", client_id) != client_id:
                raise _invalid_client("client_id differs from the Basic credentials", basic=True)
            self._check_secret(client_id, secret, basic=True)
            return client_id
        if used[0] == POST:
            posted_id = form.get("client_id")
            if posted_id is None:
                raise _invalid_client("client_id is missing")
            self._check_secret(posted_id, form["client_secret"], basic=False)
            return posted_id
        return self._check_assertion(form, token_url, record)

    @staticmethod
    def _basic_credentials(credentials: str) -> tuple[str, str]:
        """Client id and secret from HTTP Basic, each form-urlencoded inside (RFC 6749 2.3.1)."""
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _invalid_client("malformed Basic credentials", basic=True) from None
        raw_id, colon, raw_secret = decoded.partition(":")
        if not colon or not raw_id:
            raise _invalid_client("malformed Basic credentials", basic=True)
        return unquote_plus(raw_id), unquote_plus(raw_secret)

    def _check_secret(self, client_id: str, secret: str, *, basic: bool) -> None:
        client = self._state.clients.get(client_id)
        if client is None or client.client_secret is None or not _same(secret, client.client_secret):
            raise _invalid_client("unknown client or wrong secret", basic=basic)

    def _check_assertion(self, form: dict[str, str], token_url: str, record: Record) -> str:
        """Verify a ``private_key_jwt`` client assertion; its ``jti`` is used up."""
        if form.get("client_assertion_type") != JWT_BEARER:
            raise _invalid_client(f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion")
        if assertion is None or assertion.count(".") != 2:
            raise _invalid_client("client_assertion must be a signed JWT (JWS compact)")

        def key_for(header: dict[str, Any], payload: dict[str, Any]) -> str:
            client_id = payload.get("sub")
            if not isinstance(client_id, str):
                raise _invalid_client("client assertion has no sub")
            record.client_id = client_id
            client = self._state.clients.get(client_id)
            if client is None or client.public_key_pem is None:
                raise _invalid_client("unknown client or no registered public key")
            if _KEY_TYPE_FOR_ALG.get(header.get("alg", "")) != client.key_type:
                raise _invalid_client(f"alg {header.get('alg')!r} does not fit the client's {client.key_type} key")
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
            raise _invalid_client(f"client assertion refused: {exc.error}: {exc.description or ''}".strip()) from None
        except (ValueError, TypeError) as exc:
            raise _invalid_client(f"client assertion refused: {exc}") from None
        client_id, jti = claims["sub"], claims["jti"]
        if claims["iss"] != client_id:
            raise _invalid_client("client assertion iss and sub must both be the client_id")
        if form.get("client_id", client_id) != client_id:
            raise _invalid_client("client_id differs from the assertion's sub")
        if not isinstance(jti, str):
            raise _invalid_client("client assertion jti must be a string")
        seen = self._state.seen_jtis
        for key in [key for key, exp in seen.items() if exp < now]:
            del seen[key]  # an expired assertion is refused on exp anyway
        if (client_id, jti) in seen:
            raise _invalid_client("client assertion jti was used before")
        seen[(client_id, jti)] = float(claims["exp"])
        return str(client_id)

    # --- grants -----------------------------------------------------------------------------

    def _refresh(self, client_id: str, form: dict[str, str]) -> dict[str, Any]:
        presented = form.get("refresh_token")
        if presented is None:
            raise _invalid_request("refresh_token is missing")
        grant = self._state.refresh_tokens.get(presented)
        if grant is None:
            raise _invalid_grant("unknown, used or revoked refresh token")
        if grant.client_id != client_id:
            raise _invalid_grant("the refresh token was issued to another client")
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

    def handle_admin(self, method: str, name: str, body: bytes) -> Reply:
        """``/oauth/admin/{name}``: set the server up and read what it saw.

        ``POST clients`` ``{"client_id", "client_secret"?, "public_key_pem"?}``;
        ``POST users`` ``{"username", "password"}``;
        ``POST refresh-tokens`` ``{"client_id", "scope"?, "username"?}`` → ``{"refresh_token", "refresh_token_id"}``;
        ``GET|POST settings`` (partial update) → the settings;
        ``POST fail`` ``{"status"?, "error"?, "error_description"?, "count"?, "hang_s"?, "retry_after"?}``;
        ``POST revoke`` ``{"refresh_tokens"?: bool}``; ``GET stats``; ``POST reset``.
        """
        routes: dict[tuple[str, str], Callable[[dict[str, Any]], Reply]] = {
            ("POST", "clients"): self._admin_client,
            ("POST", "users"): self._admin_user,
            ("POST", "refresh-tokens"): self._admin_refresh_token,
            ("GET", "settings"): self._admin_settings,
            ("POST", "settings"): self._admin_settings,
            ("POST", "fail"): self._admin_fail,
            ("POST", "revoke"): self._admin_revoke,
            ("GET", "stats"): self._admin_stats,
            ("POST", "reset"): self._admin_reset,
        }
        route = routes.get((method, name))
        if route is None:
            allowed = sorted(verb for verb, known in routes if known == name)
            if allowed:
                return Reply(405, {"error": "method_not_allowed", "allowed": allowed}, {"Allow": ", ".join(allowed)})
            return Reply(404, {"error": "not_found", "path": f"/oauth/admin/{name}"})
        try:
            document = json.loads(body) if body.strip() else {}
        except ValueError:
            return _invalid_request("the body is not JSON").reply()
        if not isinstance(document, dict):
            return _invalid_request("the body must be a JSON object").reply()
        try:
            with self._lock:
                return route(document)
        except Refusal as refusal:
            return refusal.reply()

    def _admin_client(self, document: dict[str, Any]) -> Reply:
        client_id = _text(document, "client_id")
        secret = _optional_text(document, "client_secret")
        pem = _optional_text(document, "public_key_pem")
        if secret is None and pem is None:
            raise _invalid_request("a client needs client_secret, public_key_pem or both")
        client = Client(client_id, secret, pem, _key_type(pem) if pem is not None else None)
        self._state.clients[client_id] = client
        return Reply(200, {"client_id": client_id, "auth_methods": client.auth_methods()})

    def _admin_user(self, document: dict[str, Any]) -> Reply:
        username, password = _text(document, "username"), _text(document, "password")
        self._state.users[username] = password
        return Reply(200, {"username": username})

    def _admin_refresh_token(self, document: dict[str, Any]) -> Reply:
        client_id = _text(document, "client_id")
        if client_id not in self._state.clients:
            raise _invalid_request(f"unknown client {client_id!r}")
        scope = _optional_text(document, "scope")
        token = self._new_refresh_token(client_id, scope, _optional_text(document, "username"))
        return Reply(200, {"refresh_token": token, "refresh_token_id": token_id(token)})

    def _admin_settings(self, document: dict[str, Any]) -> Reply:
        settings = self._state.settings
        unknown = set(document) - set(asdict(settings))
        if unknown:
            raise _invalid_request(f"unknown settings: {sorted(unknown)}")
        if "expires_in" in document:
            value = document["expires_in"]
            if value is not None and not _is_int(value, minimum=0):
                raise _invalid_request("expires_in must be a whole number of seconds ≥ 0, or null")
        if "delay_s" in document and not _is_seconds(document["delay_s"]):
            raise _invalid_request(f"delay_s must be a number of seconds from 0 to {MAX_SLEEP_S}")
        for name in ("rotate_refresh_tokens", "refresh_token_for_client_credentials"):
            if name in document and not isinstance(document[name], bool):
                raise _invalid_request(f"{name} must be true or false")
        for name, value in document.items():
            setattr(settings, name, float(value) if name == "delay_s" else value)
        return Reply(200, asdict(settings))

    def _admin_fail(self, document: dict[str, Any]) -> Reply:
        unknown = set(document) - set(asdict(Failure()))
        if unknown:
            raise _invalid_request(f"unknown fields: {sorted(unknown)}")
        failure = Failure(
            status=document.get("status", 500),
            error=document.get("error", "server_error"),
            error_description=document.get("error_description"),
            count=document.get("count", 1),
            hang_s=document.get("hang_s", 0.0),
            retry_after=document.get("retry_after"),
        )
        if not _is_int(failure.status, minimum=200) or failure.status > 599:
            raise _invalid_request("status must be an HTTP status from 200 to 599")
        if not isinstance(failure.error, str) or not isinstance(failure.error_description, (str, type(None))):
            raise _invalid_request("error and error_description must be strings")
        if not _is_int(failure.count, minimum=0):
            raise _invalid_request("count must be a whole number ≥ 0")
        if not _is_seconds(failure.hang_s):
            raise _invalid_request(f"hang_s must be a number of seconds from 0 to {MAX_SLEEP_S}")
        if failure.retry_after is not None and not _is_int(failure.retry_after, minimum=0):
            raise _invalid_request("retry_after must be a whole number of seconds ≥ 0")
        failure.hang_s = float(failure.hang_s)
        self._state.failure = failure if failure.count > 0 else None
        return Reply(200, asdict(failure))

    def _admin_revoke(self, document: dict[str, Any]) -> Reply:
        refresh_too = document.get("refresh_tokens", False)
        if not isinstance(refresh_too, bool):
            raise _invalid_request("refresh_tokens must be true or false")
        revoked = {"revoked_access_tokens": len(self._state.access_tokens), "revoked_refresh_tokens": 0}
        self._state.access_tokens.clear()
        if refresh_too:
            revoked["revoked_refresh_tokens"] = len(self._state.refresh_tokens)
            self._state.refresh_tokens.clear()
        return Reply(200, revoked)

    def _admin_stats(self, document: dict[str, Any]) -> Reply:
        state = self._state
        return Reply(200, {
            "token_requests": state.counts["token_requests"],
            "successes": state.counts["successes"],
            "failures": state.counts["failures"],
            "by_grant": dict(state.by_grant),
            "by_auth_method": dict(state.by_auth_method),
            "protected_calls": state.counts["protected_calls"],
            "protected_unauthorized": state.counts["protected_unauthorized"],
            "pending_failures": state.failure.count if state.failure is not None else 0,
            "access_tokens": len(state.access_tokens),
            "refresh_tokens": len(state.refresh_tokens),
            "requests": [asdict(record) for record in state.records],
        })

    def _admin_reset(self, document: dict[str, Any]) -> Reply:
        self._reset_locked()
        return Reply(200, {"reset": True})

    def reset(self) -> None:
        """Back to the default state; requests asleep in a delay or hang wake up."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        """:meth:`reset`, for a caller that holds the lock."""
        self._wake.set()
        self._wake = threading.Event()
        self._state = State.default()


def _text(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise _invalid_request(f"{name} must be a non-empty string")
    return value


def _optional_text(document: dict[str, Any], name: str) -> str | None:
    return None if document.get(name) is None else _text(document, name)


def _is_int(value: Any, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_SLEEP_S
