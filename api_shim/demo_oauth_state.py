"""The state of the demo OAuth 2.0 server: clients, tokens, settings, recorded requests, and
the small helpers that read forms and admin documents. :mod:`api_shim.demo_oauth` serves it."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

DEFAULT_CLIENT_ID = "demo-client"



DEFAULT_CLIENT_SECRET = "demo-secret"



DEFAULT_USERNAME = "demo-user"



DEFAULT_PASSWORD = "demo-password"



DEFAULT_SCOPE = "default"



SECRET_FIELDS = frozenset({"client_secret", "password", "client_assertion", "refresh_token", "assertion", "code",
                           "code_verifier"})
"""Form fields whose values are never recorded."""



MAX_RECORDS = 1000



MAX_SLEEP_S = 60.0



BASIC = "client_secret_basic"



POST = "client_secret_post"



PRIVATE_KEY_JWT = "private_key_jwt"



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



def invalid_request(description: str) -> Refusal:
    return Refusal(400, "invalid_request", description)



def invalid_client(description: str, *, basic: bool = False) -> Refusal:
    headers = {"WWW-Authenticate": 'Basic realm="demo-oauth"'} if basic else {}
    return Refusal(401, "invalid_client", description, headers)



def invalid_grant(description: str) -> Refusal:
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



def same_text(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())



def header_map(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Request headers with lower-cased names (the last of repeated ones)."""
    return {name.lower(): value for name, value in items}



def parse_form(headers: dict[str, str], body: bytes) -> dict[str, str]:
    """The token request's form fields; empty values count as omitted (RFC 6749 3.2)."""
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        raise invalid_request("the token request must be application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise invalid_request("the form is not UTF-8") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise invalid_request(f"parameter {name!r} is repeated")
        if value:
            form[name] = value
    return form



def key_type(pem: str) -> str:
    """``RSA`` or ``EC`` for a PEM public key usable with RS256 or ES256."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise invalid_request("public_key_pem is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return "EC"
    raise invalid_request("public_key_pem must be an RSA or a P-256 key")



def text_field(document: dict[str, Any], name: str) -> str:
    value = document.get(name)
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{name} must be a non-empty string")
    return value



def optional_text_field(document: dict[str, Any], name: str) -> str | None:
    return None if document.get(name) is None else text_field(document, name)



def is_int(value: Any, *, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum



def is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_SLEEP_S
