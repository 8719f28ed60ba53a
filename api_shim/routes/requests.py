"""``/v1/connections/{id}/requests``: a connection's stored requests, at most 50 of them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from sqlmodel import select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, SettingsDep, by_id_or_name
from api_shim.problems import RESPONSES
from api_shim.routes.connections import count, unique_name
from models import errors, rules
from models.base import utcnow
from models.db import lock_row
from models.schemas import RequestCreate, RequestUpdate
from models.settings import Settings
from models.tables import Connection, Request
from models.views import Page, RequestPublic, request_public

router = APIRouter(prefix="/v1/connections/{connection}/requests", tags=["requests"], responses=RESPONSES)

FIELDS = ("name", "kind", "method", "url", "headers", "query", "body", "media_type")


def _checked(values: dict[str, Any], owner: Connection, settings: Settings) -> dict[str, Any]:
    """``values`` of a request checked against its connection, the method upper-cased."""
    method = rules.check_request(
        kind=values["kind"],
        method=values["method"],
        url=values["url"],
        headers=values["headers"],
        query=values["query"],
        body=values["body"],
        media_type=values["media_type"],
        verbs=owner.template["verbs"],
        base_url=owner.base_url,
        allowed_hosts=owner.allowed_hosts,
        allow_http=settings.allow_http,
    )
    return {**values, "method": method}


@router.post("", status_code=201, response_model=RequestPublic)
def create_request(
    connection: str, body: RequestCreate, session: SessionDep, tenant: CurrentTenant, settings: SettingsDep
) -> dict[str, Any]:
    """Store a request of the connection."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    values = _checked(body.model_dump(), owner, settings)
    lock_row(session, Connection, owner.id)  # creations on one connection queue here
    if count(session, Request, Request.connection_id == owner.id) >= rules.MAX_REQUESTS_PER_CONNECTION:
        raise errors.RequestLimitReached()
    now = utcnow()
    row = Request(tenant_id=tenant.id, connection_id=owner.id, created_at=now, updated_at=now, **values)
    with unique_name(session, f"the connection has a request named {body.name!r}"):
        session.add(row)
    return request_public(row)


@router.get("", response_model=Page[RequestPublic])
def list_requests(connection: str, session: SessionDep, tenant: CurrentTenant, page: PageDep) -> dict[str, Any]:
    """The connection's stored requests, oldest first."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    statement = page.apply(select(Request).where(Request.connection_id == owner.id), Request)
    return page.answer(list(session.exec(statement)), request_public)


@router.get("/{request}", response_model=RequestPublic)
def get_request(connection: str, request: str, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """One stored request, by id or by name."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    return request_public(by_id_or_name(session, Request, request, connection_id=owner.id))


@router.patch("/{request}", response_model=RequestPublic)
def update_request(
    connection: str,
    request: str,
    body: RequestUpdate,
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
) -> dict[str, Any]:
    """Change a stored request; the result is checked again as a whole."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    row = by_id_or_name(session, Request, request, connection_id=owner.id)
    values = {field: getattr(row, field) for field in FIELDS} | body.model_dump(exclude_unset=True)
    for field, value in _checked(values, owner, settings).items():
        setattr(row, field, value)
    row.updated_at = utcnow()
    with unique_name(session, f"the connection has a request named {row.name!r}"):
        session.add(row)
    return request_public(row)


@router.delete("/{request}", status_code=204)
def delete_request(connection: str, request: str, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove a stored request."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    session.delete(by_id_or_name(session, Request, request, connection_id=owner.id))
    session.commit()
    return Response(status_code=204)
