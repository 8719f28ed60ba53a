"""What the API accepts, per entity: ``Create`` and ``Update`` bodies (the answers are in
:mod:`models.views`).

Inputs forbid unknown fields, so a misspelt field is an error rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
NAME = Field(min_length=1, max_length=200)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(item) for item in value)
    return False


class Input(BaseModel):
    """Base of every request body: unknown fields are refused, and so is a NUL character
    anywhere in it (no database column can hold one)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        if _has_nul(data):
            raise ValueError("text may not contain the NUL character")
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
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    media_type: str = "application/json"


class RequestUpdate(Update):
    """``PATCH /v1/connections/{id}/requests/{rid}``: only ``body`` may be set to null."""

    not_null = frozenset({"name", "kind", "method", "url", "headers", "query", "media_type"})

    name: str | None = Field(default=None, min_length=1, max_length=200)
    kind: str | None = None
    method: str | None = Field(default=None, min_length=1, max_length=10)
    url: str | None = Field(default=None, min_length=1, max_length=4096)
    headers: dict[str, str] | None = None
    query: dict[str, str] | None = None
    body: Any = None
    media_type: str | None = None


class AdhocRequest(Input):
    """A request defined in the submission, run with the connection's auth, secrets and verbs."""

    method: str = Field(min_length=1, max_length=10)
    url: str = Field(min_length=1, max_length=4096)
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    body: Any = None
    media_type: str = "application/json"


class ExecutionCreate(Input):
    """``POST /v1/executions``: a stored request, the auth action, or an ad-hoc request."""

    connection: str = Field(min_length=1, max_length=200)
    request: str | None = Field(default=None, min_length=1, max_length=200)
    action: str | None = None
    adhoc: AdhocRequest | None = None
    path_params: dict[str, str | int | float] = Field(default_factory=dict)
    variables: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    max_attempts: int | None = Field(default=None, ge=1, le=10)
