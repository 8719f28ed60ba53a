"""``/v1/connections`` and their stored requests."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, by_id_or_name
from api_shim.problems import RESPONSES
from models import errors, rules
from models.schemas import (
    ConnectionCreate,
    ConnectionPublic,
    Page,
    RequestCreate,
    RequestPublic,
    connection_public,
    request_public,
    template_rules,
)
from models.tables import Connection, Request, Template

router = APIRouter(prefix="/v1/connections", tags=["connections"], responses=RESPONSES)


def _count(session: Session, model: Any, *where: Any) -> int:
    return int(session.exec(select(sa.func.count()).select_from(model).where(*where)).one())


def _commit_unique(session: Session, message: str) -> None:
    try:
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
    if _count(session, Connection, Connection.tenant_id == tenant.id) >= rules.MAX_CONNECTIONS_PER_TENANT:
        raise errors.ConnectionLimitReached()
    oauth2 = body.oauth2.model_dump() if body.oauth2 else None
    rules.check_oauth2(template.auth_type, oauth2)
    if body.base_url:
        rules.check_url_scheme(body.base_url, allow_http=settings.allow_http, loc=["base_url"])
    if oauth2:
        rules.check_url_scheme(oauth2["token_url"], allow_http=settings.allow_http, loc=["oauth2", "token_url"])
    allowed = body.allowed_hosts
    hosts = [h.lower() for h in allowed] if allowed else rules.default_allowed_hosts(body.base_url, oauth2)
    row = Connection(
        tenant_id=tenant.id,
        template_id=template.id,
        name=body.name,
        description=body.description,
        base_url=body.base_url,
        allowed_hosts=hosts,
        auth_header_values=rules.auth_header_values(template.auth_headers, body.auth_header_values),
        oauth2=oauth2,
        client_certificate=body.client_certificate.model_dump() if body.client_certificate else None,
        template=template_rules(template),
    )
    session.add(row)
    _commit_unique(session, f"a connection named {body.name!r} exists")
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


@router.delete("/{connection}", status_code=204)
def delete_connection(connection: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove a connection with its requests and secrets."""
    row = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    session.execute(sa.delete(Request).where(Request.connection_id == row.id))  # type: ignore[arg-type]
    session.delete(row)
    session.commit()
    return Response(status_code=204)


@router.post("/{connection}/requests", status_code=201, response_model=RequestPublic)
def create_request(
    connection: str, body: RequestCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> dict[str, Any]:
    """Store a request of the connection."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    if _count(session, Request, Request.connection_id == owner.id) >= rules.MAX_REQUESTS_PER_CONNECTION:
        raise errors.RequestLimitReached()
    method = rules.check_request(
        kind=body.kind,
        method=body.method,
        url=body.url,
        headers=body.headers,
        query=body.query,
        body=body.body,
        media_type=body.media_type,
        verbs=owner.template["verbs"],
        base_url=owner.base_url,
        allowed_hosts=owner.allowed_hosts,
        allow_http=settings.allow_http,
    )
    row = Request(
        tenant_id=tenant.id,
        connection_id=owner.id,
        name=body.name,
        kind=body.kind,
        method=method,
        url=body.url,
        headers=body.headers,
        query=body.query,
        body=body.body,
        media_type=body.media_type,
    )
    session.add(row)
    _commit_unique(session, f"the connection has a request named {body.name!r}")
    return request_public(row)


@router.get("/{connection}/requests", response_model=Page[RequestPublic])
def list_requests(
    connection: str, session: SessionDep, tenant: CurrentTenant, page: PageDep
) -> dict[str, Any]:
    """The connection's stored requests, oldest first."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    statement = page.apply(select(Request).where(Request.connection_id == owner.id), Request)
    return page.answer(list(session.exec(statement)), request_public)


@router.get("/{connection}/requests/{request}", response_model=RequestPublic)
def get_request(connection: str, request: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """One stored request, by id or by name."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    return request_public(by_id_or_name(session, Request, request, connection_id=owner.id))
