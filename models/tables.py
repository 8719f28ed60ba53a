"""The database tables. Every row but a tenant's carries ``tenant_id``; queries scope by it.

Connections keep their own copy of their template's rules (``template``), so deleting a
template changes nothing for the connections made from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

from models.base import new_id, utcnow

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def _json(nullable: bool = False) -> Any:
    return Field(default=None, sa_type=JSONType, nullable=nullable)


def _time(nullable: bool = False) -> Any:
    if nullable:
        return Field(default=None, sa_type=sa.DateTime(timezone=True), nullable=True)
    return Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True), nullable=False)


def _tenant() -> Any:
    return Field(foreign_key="tenant.id", index=True, ondelete="CASCADE", max_length=36)


class Tenant(SQLModel, table=True):
    """An organisation using the hub; everything else belongs to one."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    name: str = Field(max_length=200, unique=True)
    rate_per_s: float | None = None
    burst: int | None = None
    max_inflight: int | None = None
    callback_key: str | None = Field(default=None, max_length=200)
    """The key that signs the tenant's callbacks, sealed by the vault; made on first use."""
    created_at: datetime = _time()


class ApiKey(SQLModel, table=True):
    """A tenant's API key, stored as its SHA-256 digest; ``prefix`` identifies it to people."""

    __tablename__ = "api_key"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    prefix: str = Field(max_length=32)
    key_hash: str = Field(max_length=64, unique=True)
    created_at: datetime = _time()
    revoked_at: datetime | None = _time(nullable=True)


class Template(SQLModel, table=True):
    """A connection template of the tenant's library. Immutable once created."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    name: str = Field(max_length=200)
    service_name: str = Field(max_length=200)
    integration_method: str = Field(max_length=20)
    auth_type: str = Field(max_length=20)
    auth_headers: list[dict[str, Any]] = _json()
    verbs: list[str] = _json()
    created_at: datetime = _time()


class Connection(SQLModel, table=True):
    """A tenant's connection, made from a template whose rules it copied into ``template``."""

    __table_args__ = (sa.UniqueConstraint("tenant_id", "name", name="uq_connection_tenant_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    template_id: str | None = Field(default=None, max_length=36)
    name: str = Field(max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    base_url: str | None = Field(default=None, max_length=2048)
    allowed_hosts: list[str] = _json()
    auth_header_values: dict[str, str] = _json()
    oauth2: dict[str, Any] | None = _json(nullable=True)
    client_certificate: dict[str, str] | None = _json(nullable=True)
    template: dict[str, Any] = _json()
    version: int = Field(default=1, sa_column_kwargs={"server_default": "1"})
    """Moves on every change of the connection or its secrets: cached tokens are per version."""
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Request(SQLModel, table=True):
    """A stored request of a connection, manual or studio."""

    __table_args__ = (
        sa.UniqueConstraint("connection_id", "name", name="uq_request_connection_name"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    connection_id: str = Field(
        foreign_key="connection.id", index=True, ondelete="CASCADE", max_length=36
    )
    name: str = Field(max_length=200)
    kind: str = Field(max_length=20)
    method: str = Field(max_length=10)
    url: str = Field(max_length=4096)
    headers: dict[str, str] = _json()
    query: dict[str, str] = _json()
    body: Any = _json(nullable=True)
    media_type: str = Field(max_length=100)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Secret(SQLModel, table=True):
    """A connection's secret, AES-256-GCM ciphertext only; ``key_id`` names the master key."""

    __table_args__ = (sa.UniqueConstraint("connection_id", "name", name="uq_secret_connection_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    connection_id: str = Field(
        foreign_key="connection.id", index=True, ondelete="CASCADE", max_length=36
    )
    name: str = Field(max_length=200)
    key_id: str = Field(max_length=64)
    nonce: bytes = Field(sa_type=sa.LargeBinary)
    ciphertext: bytes = Field(sa_type=sa.LargeBinary)
    created_at: datetime = _time()
    updated_at: datetime = _time()


class Job(SQLModel, table=True):
    """One execution. The row is the truth about a job; the queue carries only its id.

    ``connection_id`` and ``request_id`` are plain columns, not foreign keys: a job's history
    outlives the connection it ran through.
    """

    __table_args__ = (
        sa.Index("ix_job_tenant_id_status", "tenant_id", "status"),
        sa.Index("ix_job_status_due_at", "status", "due_at"),
        sa.Index("ix_job_finished_at", "finished_at"),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    connection_id: str = Field(max_length=36)
    request_id: str | None = Field(default=None, max_length=36)
    action: str = Field(max_length=20)
    status: str = Field(max_length=20)
    attempts: int = 0
    params: dict[str, Any] = _json()
    result: dict[str, Any] | None = _json(nullable=True)
    error: dict[str, Any] | None = _json(nullable=True)
    secrets_used: list[str] = _json()
    created_at: datetime = _time()
    started_at: datetime | None = _time(nullable=True)
    finished_at: datetime | None = _time(nullable=True)
    due_at: datetime | None = _time(nullable=True)
    """When the job's current message is due at a worker; None: no message was sent yet."""
    slot_at: datetime | None = _time(nullable=True)
    """The rate-limit slot the job reserved for its next attempt, if it reserved one."""
    lease_until: datetime | None = _time(nullable=True)
    """While ``running``: after this the job is taken as lost and dispatched again."""
    dispatches: int = 0
    """Times the sweeper sent the job again because its message or its worker was lost."""
    callback_url: str | None = Field(default=None, max_length=2048)
    callback_state: str | None = Field(default=None, max_length=20)
    """``pending``, ``delivered`` or ``failed`` once the job is final and has a ``callback_url``."""
    callback_attempts: int = 0
    callback_due_at: datetime | None = _time(nullable=True)
    """When the pending callback's next try is due (or was last sent again by the sweeper);
    None: its first try, due when the job finished."""


class IdempotencyKey(SQLModel, table=True):
    """A tenant's ``Idempotency-Key`` and the job its first submission made (for 24 hours)."""

    __tablename__ = "idempotency_key"
    __table_args__ = (sa.UniqueConstraint("tenant_id", "key", name="uq_idempotency_key_tenant_key"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=36)
    tenant_id: str = _tenant()
    key: str = Field(max_length=255)
    body_hash: str = Field(max_length=64)
    job_id: str = Field(max_length=36)
    created_at: datetime = _time()
