"""What the API accepts, per entity: ``Create`` and ``Update`` bodies (the answers are in
:mod:`models.views`).

Inputs forbid unknown fields, so a misspelt field is an error rather than silently ignored.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
NAME = Field(min_length=1, max_length=200)

MAX_NESTING = 64
"""How deep arrays and objects may nest in a request body, all of it counted."""
MAX_HEADERS = 50
MAX_QUERY = 100
MAX_PATH_PARAMS = 50
MAX_VARIABLES = 100
MAX_VALUE_CHARS = 8192
"""The longest header value, query value or path parameter."""

HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=HEADER_NAME)]
Value = Annotated[str, StringConstraints(max_length=MAX_VALUE_CHARS)]
Headers = Annotated[dict[HeaderName, Value], Field(max_length=MAX_HEADERS)]
Query = Annotated[dict[Annotated[str, StringConstraints(max_length=1000)], Value], Field(max_length=MAX_QUERY)]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _refusal(data: Any) -> str | None:
    """Why ``data`` (parsed JSON) cannot be taken, or None: a NUL character (no database column
    can hold one), a lone surrogate (not encodable as UTF-8), a number that is not finite
    (``1e400``, ``NaN``: not JSON), or nesting deeper than ``MAX_NESTING``. Walked with a stack,
    not recursion, so no depth can exhaust Python's."""
    pending: list[tuple[Any, int]] = [(data, 0)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return "text may not contain the NUL character"
            if not value.isascii() and _SURROGATE.search(value):
                return "text may not contain a lone surrogate (it is not UTF-8)"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "numbers must be finite"
        elif isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                return f"JSON may nest at most {MAX_NESTING} levels"
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            pending.extend((item, depth + 1) for item in items)
    return None


class Input(BaseModel):
    """Base of every request body: unknown fields are refused, and so is any value that
    :func:`_refusal` refuses, anywhere in it."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        refusal = _refusal(data)
        if refusal:
            raise ValueError(refusal)
        return data


class AuthHeader(Input):
    """A custom authentication header of a template."""

    name: str = Field(min_length=1, max_length=200, pattern=HEADER_NAME)
    required: bool = False
    default: str | None = None


class TemplateCreate(Input):
    """``POST /v1/templates``."""

    name: str = NAME
    service_name: str = NAME
    integration_method: str = "rest"
    auth_type: str = "none"
    auth_headers: list[AuthHeader] = Field(default_factory=list, max_length=50)
    verbs: list[str] = Field(max_length=16)


class OAuth2Settings(Input):
    """How a connection gets its OAuth 2.0 token; values are usually ``{{secrets.NAME}}``."""

    grant_type: Literal["client_credentials", "refresh_token", "password"]
    token_url: str = Field(min_length=1, max_length=2048)
    client_id: str | None = None
    client_secret: str | None = None
    client_auth_method: Literal[
        "client_secret_basic", "client_secret_post", "private_key_jwt"
    ] = "client_secret_basic"
    scope: str | None = None
    audience: str | None = None
    extra_params: dict[str, str] = Field(default_factory=dict)
    refresh_token: str | None = None
    username: str | None = None
    password: str | None = None
    private_key: str | None = None


class ClientCertificate(Input):
    """A client certificate and key for mutual TLS, as secret references."""

    cert: str
    key: str


class ConnectionCreate(Input):
    """``POST /v1/connections``."""

    name: str = NAME
    template_id: str = Field(min_length=1, max_length=36)
    description: str | None = Field(default=None, max_length=2000)
    base_url: str | None = Field(default=None, max_length=2048)
    allowed_hosts: list[str] | None = Field(default=None, max_length=50)
    auth_header_values: dict[str, str] = Field(default_factory=dict)
    oauth2: OAuth2Settings | None = None
    client_certificate: ClientCertificate | None = None


class Update(Input):
    """Base of PATCH bodies: the fields given replace the stored ones; only some may be null."""

    not_null: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulled = sorted(k for k, v in data.items() if v is None and k in cls.not_null)
            if nulled:
                raise ValueError(f"{', '.join(nulled)} cannot be null")
        return data


class ConnectionUpdate(Update):
    """``PATCH /v1/connections/{id}``: null clears ``description``, ``base_url``, ``oauth2``…"""

    not_null = frozenset({"name", "auth_header_values"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    base_url: str | None = Field(default=None, max_length=2048)
    allowed_hosts: list[str] | None = Field(default=None, max_length=50)
    auth_header_values: dict[str, str] | None = None
    oauth2: OAuth2Settings | None = None
    client_certificate: ClientCertificate | None = None


class SecretPut(Input):
    """``PUT /v1/connections/{id}/secrets/{name}``."""

    value: str = Field(max_length=65_536)

    def __repr__(self) -> str:
        return "SecretPut(value='**********')"

    __str__ = __repr__


class RequestCreate(Input):
    """``POST /v1/connections/{id}/requests``."""

    name: str = NAME
    kind: str = "manual"
    method: str = Field(min_length=1, max_length=10)
    url: str = Field(min_length=1, max_length=4096)
    headers: Headers = Field(default_factory=dict)
    query: Query = Field(default_factory=dict)
    body: Any = None
    media_type: str = "application/json"


class RequestUpdate(Update):
    """``PATCH /v1/connections/{id}/requests/{rid}``: only ``body`` may be set to null."""

    not_null = frozenset({"name", "kind", "method", "url", "headers", "query", "media_type"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    kind: str | None = None
    method: str | None = Field(default=None, min_length=1, max_length=10)
    url: str | None = Field(default=None, min_length=1, max_length=4096)
    headers: Headers | None = None
    query: Query | None = None
    body: Any = None
    media_type: str | None = None


class AdhocRequest(Input):
    """A request defined in the submission, run with the connection's auth, secrets and verbs."""

    method: str = Field(min_length=1, max_length=10)
    url: str = Field(min_length=1, max_length=4096)
    headers: Headers = Field(default_factory=dict)
    query: Query = Field(default_factory=dict)
    body: Any = None
    media_type: str = "application/json"


class ExecutionCreate(Input):
    """``POST /v1/executions``: a stored request, the auth action, or an ad-hoc request."""

    connection: str = Field(min_length=1, max_length=200)
    request: str | None = Field(default=None, min_length=1, max_length=200)
    action: str | None = None
    adhoc: AdhocRequest | None = None
    path_params: dict[str, Value | int | float] = Field(default_factory=dict, max_length=MAX_PATH_PARAMS)
    variables: dict[str, Any] = Field(default_factory=dict, max_length=MAX_VARIABLES)
    callback_url: str | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
