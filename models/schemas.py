"""What the API accepts and answers, per entity: ``Create`` (input) and ``Public`` (output).

Inputs forbid unknown fields, so a misspelt field is an error rather than silently ignored.
Outputs never carry a secret value.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.base import rfc3339
from models.tables import Connection, Job, Request, Secret, Template

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


class SecretPublic(BaseModel):
    """A secret as the API shows it: its name and times, never its value."""

    name: str
    created_at: str
    updated_at: str


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


Item = TypeVar("Item")


class Page(BaseModel, Generic[Item]):
    """One page of a list: its items and the cursor of the next page (null on the last)."""

    items: list[Item]
    next_cursor: str | None


class Problem(BaseModel):
    """An RFC 9457 problem document; ``code`` is stable, clients branch on it."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = None


class TemplatePublic(BaseModel):
    """A template of the connection library."""

    id: str
    name: str
    service_name: str
    integration_method: str
    auth_type: str
    auth_headers: list[AuthHeader]
    verbs: list[str]
    created_at: str


class TemplateRules(BaseModel):
    """The rules a connection copied from its template."""

    service_name: str
    integration_method: str
    auth_type: str
    auth_headers: list[AuthHeader]
    verbs: list[str]


class ConnectionPublic(BaseModel):
    """A connection; secret references are shown, secret values never."""

    id: str
    name: str
    template_id: str | None
    description: str | None
    base_url: str | None
    allowed_hosts: list[str]
    auth_header_values: dict[str, str]
    oauth2: OAuth2Settings | None
    client_certificate: ClientCertificate | None
    template: TemplateRules
    created_at: str
    updated_at: str


class RequestPublic(BaseModel):
    """A stored request of a connection."""

    id: str
    connection_id: str
    name: str
    kind: str
    method: str
    url: str
    headers: dict[str, str]
    query: dict[str, str]
    body: Any
    media_type: str
    created_at: str
    updated_at: str


class JobResult(BaseModel):
    """What the web service answered, the body cut at 32,768 bytes."""

    status_code: int
    headers: dict[str, str]
    body: str
    body_encoding: Literal["utf-8", "base64"]
    size: int
    truncated: bool
    content_length: int | None
    elapsed_ms: float
    decoded: bool = True
    """False when the body is kept as sent, in a content encoding the hub does not decode."""


class AuthResult(BaseModel):
    """What the auth action found: the token's type, scope and expiry, never the token."""

    token_type: str
    scope: str | None
    expires_at: str | None
    cached: bool


class JobErrorPublic(BaseModel):
    """Why a job failed: a stable code and a message without secrets."""

    code: str
    message: str


class JobPublic(BaseModel):
    """An execution."""

    id: str
    status: Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
    connection_id: str
    request_id: str | None
    action: str
    attempts: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    result: JobResult | AuthResult | None
    secrets_used: list[str]
    error: JobErrorPublic | None


def template_public(row: Template) -> dict[str, Any]:
    """A template as the API shows it."""
    return {
        "id": row.id,
        "name": row.name,
        "service_name": row.service_name,
        "integration_method": row.integration_method,
        "auth_type": row.auth_type,
        "auth_headers": row.auth_headers,
        "verbs": row.verbs,
        "created_at": rfc3339(row.created_at),
    }


def template_rules(row: Template) -> dict[str, Any]:
    """The rules a connection copies from its template, so it outlives the template."""
    return {
        "service_name": row.service_name,
        "integration_method": row.integration_method,
        "auth_type": row.auth_type,
        "auth_headers": row.auth_headers,
        "verbs": row.verbs,
    }


def connection_public(row: Connection) -> dict[str, Any]:
    """A connection as the API shows it: references to secrets, never their values."""
    return {
        "id": row.id,
        "name": row.name,
        "template_id": row.template_id,
        "description": row.description,
        "base_url": row.base_url,
        "allowed_hosts": row.allowed_hosts,
        "auth_header_values": row.auth_header_values,
        "oauth2": row.oauth2,
        "client_certificate": row.client_certificate,
        "template": row.template,
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
    }


def request_public(row: Request) -> dict[str, Any]:
    """A stored request as the API shows it."""
    return {
        "id": row.id,
        "connection_id": row.connection_id,
        "name": row.name,
        "kind": row.kind,
        "method": row.method,
        "url": row.url,
        "headers": row.headers,
        "query": row.query,
        "body": row.body,
        "media_type": row.media_type,
        "created_at": rfc3339(row.created_at),
        "updated_at": rfc3339(row.updated_at),
    }


def secret_public(row: Secret) -> dict[str, Any]:
    """A secret's name and times; its value is never shown."""
    return {"name": row.name, "created_at": rfc3339(row.created_at), "updated_at": rfc3339(row.updated_at)}


def job_public(row: Job) -> dict[str, Any]:
    """A job as the API shows it."""
    return {
        "id": row.id,
        "status": row.status,
        "connection_id": row.connection_id,
        "request_id": row.request_id,
        "action": row.action,
        "attempts": row.attempts,
        "created_at": rfc3339(row.created_at),
        "started_at": rfc3339(row.started_at),
        "finished_at": rfc3339(row.finished_at),
        "result": row.result,
        "secrets_used": row.secrets_used,
        "error": row.error,
    }
