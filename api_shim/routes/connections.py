"""``/v1/connections``: a tenant's connections, made from templates, at most 50 of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, by_id_or_name
from api_shim.problems import RESPONSES
from api_shim.tokens import drop_cached_tokens, new_version
from models import errors, rules
from models.base import utcnow
from models.db import lock_row
from models.schemas import ConnectionCreate, ConnectionUpdate
from models.tables import Connection, Template, Tenant
from models.views import ConnectionPublic, Page, connection_public, template_rules

router = APIRouter(prefix="/v1/connections", tags=["connections"], responses=RESPONSES)


def count(session: Session, model: Any, *where: Any) -> int:
    """How many rows of ``model`` match ``where``."""
    return int(session.exec(select(sa.func.count()).select_from(model).where(*where)).one())


@contextmanager
def unique_name(session: Session, message: str) -> Iterator[None]:
    """Run the block and commit; a unique-name violation on the way becomes ``409 name_taken``."""
    try:
        yield
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise errors.NameTaken(message) from exc


@router.post("", status_code=201, response_model=ConnectionPublic)
def create_connection(
    body: ConnectionCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> dict[str, Any]:
    """Make a connection from a template; it copies the template's rules."""
    template = by_id_or_name(session, Template, body.template_id, tenant_id=tenant.id)
    rules_copy = template_rules(template)
    checked = rules.connection_settings(
        rules_copy,
        base_url=body.base_url,
        allowed_hosts=body.allowed_hosts,
        auth_header_values=body.auth_header_values,
        oauth2=body.oauth2.model_dump() if body.oauth2 else None,
        allow_http=settings.allow_http,
    )
    lock_row(session, Tenant, tenant.id)  # creations of one tenant queue here: the count holds
    if count(session, Connection, Connection.tenant_id == tenant.id) >= rules.MAX_CONNECTIONS_PER_TENANT:
        raise errors.ConnectionLimitReached()
    now = utcnow()
    row = Connection(
        created_at=now,
        updated_at=now,
        tenant_id=tenant.id,
        template_id=template.id,
        name=body.name,
        description=body.description,
        client_certificate=body.client_certificate.model_dump() if body.client_certificate else None,
        template=rules_copy,
        **checked,
    )
    with unique_name(session, f"a connection named {body.name!r} exists"):
        session.add(row)
    return connection_public(row)


@router.get("", response_model=Page[ConnectionPublic])
def list_connections(session: SessionDep, tenant: CurrentTenant, page: PageDep) -> dict[str, Any]:
    """The tenant's connections, oldest first."""
    statement = page.apply(select(Connection).where(Connection.tenant_id == tenant.id), Connection)
    return page.answer(list(session.exec(statement)), connection_public)


@router.get("/{connection}", response_model=ConnectionPublic)
def get_connection(connection: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """One connection, by id or by name."""
    return connection_public(by_id_or_name(session, Connection, connection, tenant_id=tenant.id))


@router.patch("/{connection}", response_model=ConnectionPublic)
def update_connection(
    connection: str,
    body: ConnectionUpdate,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Change a connection; the result is checked again as a whole against its template's rules.

    ``allowed_hosts`` that were the default follow a new ``base_url`` or token URL.
    """
    row = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    given = body.model_dump(exclude_unset=True)
    oauth2 = given["oauth2"] if "oauth2" in given else row.oauth2
    base_url = given["base_url"] if "base_url" in given else row.base_url
    allowed_hosts = given.get("allowed_hosts")
    if "allowed_hosts" not in given and row.allowed_hosts != rules.default_allowed_hosts(row.base_url, row.oauth2):
        allowed_hosts = row.allowed_hosts
    checked = rules.connection_settings(
        row.template,
        base_url=base_url,
        allowed_hosts=allowed_hosts,
        auth_header_values=given.get("auth_header_values", row.auth_header_values) or {},
        oauth2=oauth2,
        allow_http=settings.allow_http,
    )
    for field in ("name", "description", "client_certificate"):
        if field in given:
            setattr(row, field, given[field])
    for field, value in checked.items():
        setattr(row, field, value)
    row.updated_at = utcnow()
    with unique_name(session, f"a connection named {row.name!r} exists"):
        session.add(row)
        old_version = new_version(session, row)
    drop_cached_tokens(request, row, old_version)
    return connection_public(row)


@router.delete("/{connection}", status_code=204)
def delete_connection(connection: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove a connection with its requests and secrets (the database cascades) and its
    cached tokens."""
    row = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    session.delete(row)
    session.commit()
    drop_cached_tokens(request, row, row.version)
    return Response(status_code=204)
