"""What the API answers, per entity: the ``Public`` shapes and the functions that make them
from rows. Nothing here ever carries a secret value."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from models.base import rfc3339
from models.schemas import AuthHeader, ClientCertificate, OAuth2Settings
from models.tables import Connection, Job, Request, Secret, Template


class SecretPublic(BaseModel):
    """A secret as the API shows it: its name and times, never its value."""

    name: str
    created_at: str
    updated_at: str


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


class LastError(BaseModel):
    """The error of an attempt: a stable code and a message without secrets."""

    code: str
    message: str
    status_code: int | None = None
    """With ``upstream_status``: the HTTP status the service answered."""


class JobErrorPublic(LastError):
    """Why a job failed, or, while it is ``retrying``, why its last attempt will be tried again."""

    last: LastError | None = None
    """With ``retries_exhausted``: the error of the last attempt."""


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
    callback_url: str | None = None
    callback_state: Literal["pending", "delivered", "failed"] | None = None
    """Once the job is final: whether its callback was delivered (a 2xx answer) yet."""


def shown(shape: type[BaseModel], row: Any) -> dict[str, Any]:
    """``row`` as ``shape`` shows it: the shape's fields read from the row, times in RFC 3339.

    The ``Public`` model is the one list of what the API shows; nothing else repeats it.
    """
    values = {name: getattr(row, name) for name in shape.model_fields}
    return {name: rfc3339(value) if isinstance(value, datetime) else value for name, value in values.items()}


def template_public(row: Template) -> dict[str, Any]:
    """A template as the API shows it."""
    return shown(TemplatePublic, row)


def template_rules(row: Template) -> dict[str, Any]:
    """The rules a connection copies from its template, so it outlives the template."""
    return shown(TemplateRules, row)


def connection_public(row: Connection) -> dict[str, Any]:
    """A connection as the API shows it: references to secrets, never their values."""
    return shown(ConnectionPublic, row)


def request_public(row: Request) -> dict[str, Any]:
    """A stored request as the API shows it."""
    return shown(RequestPublic, row)


def secret_public(row: Secret) -> dict[str, Any]:
    """A secret's name and times; its value is never shown."""
    return shown(SecretPublic, row)


def job_public(row: Job) -> dict[str, Any]:
    """A job as the API shows it."""
    return shown(JobPublic, row)
