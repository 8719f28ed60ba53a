"""``/v1/connections/{id}/secrets``: write-only secrets; no call ever returns a value."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from sqlmodel import select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, by_id_or_name
from api_shim.problems import RESPONSES
from api_shim.tokens import drop_cached_tokens, new_version
from models import errors, secrets
from models.schemas import SecretPut
from models.tables import Connection, Secret
from models.views import Page, SecretPublic, secret_public

router = APIRouter(prefix="/v1/connections/{connection}/secrets", tags=["secrets"], responses=RESPONSES)


@router.put("/{name}", status_code=204)
def put_secret(
    connection: str, name: str, body: SecretPut, request: Request, session: SessionDep, tenant: CurrentTenant
) -> Response:
    """Create or replace a secret of the connection; it is encrypted before it is stored."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    secrets.put(session, request.app.state.vault, tenant_id=tenant.id, connection_id=owner.id,
                name=name, value=body.value)
    _changed(request, session, owner)
    return Response(status_code=204)


def _changed(request: Request, session: SessionDep, owner: Connection) -> None:
    """A secret changed: the connection moves to a new version and its cached token goes."""
    old_version = new_version(session, owner)
    session.commit()
    drop_cached_tokens(request, owner, old_version)


@router.get("", response_model=Page[SecretPublic])
def list_secrets(connection: str, session: SessionDep, tenant: CurrentTenant, page: PageDep) -> dict[str, Any]:
    """The names of the connection's secrets, with their times; never their values."""
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    statement = page.apply(select(Secret).where(Secret.connection_id == owner.id), Secret)
    return page.answer(list(session.exec(statement)), secret_public)


@router.delete("/{name}", status_code=204)
def delete_secret(connection: str, name: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> Response:
    """Remove a secret of the connection."""
    secrets.check_name(name)
    owner = by_id_or_name(session, Connection, connection, tenant_id=tenant.id)
    row = session.exec(select(Secret).where(Secret.connection_id == owner.id, Secret.name == name)).first()
    if row is None:
        raise errors.NotFound(f"the connection has no secret {name!r}")
    session.delete(row)
    _changed(request, session, owner)
    return Response(status_code=204)
