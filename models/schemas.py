"""What the API accepts and answers, per entity: ``Create`` (input) and ``Public`` (output).

Inputs forbid unknown fields, so a misspelt field is an error rather than silently ignored.
Outputs never carry a secret value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.base import rfc3339
from models.tables import Connection, Job, Request, Template

HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
NAME = Field(min_length=1, max_length=200)


class Input(BaseModel):
    """Base of every request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


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


class ExecutionCreate(Input):
    """``POST /v1/executions``: a stored request, the auth action, or an ad-hoc request."""

    connection: str = Field(min_length=1, max_length=200)
    request: str | None = Field(default=None, min_length=1, max_length=200)
    action: str | None = None
    adhoc: dict[str, Any] | None = None
    path_params: dict[str, str | int | float] = Field(default_factory=dict)
    variables: dict[str, Any] = Field(default_factory=dict)
    callback_url: str | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=300)
    max_attempts: int | None = Field(default=None, ge=1, le=10)


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
