"""The dependencies routes declare: a database session, the calling tenant, pagination."""

from __future__ import annotations

import base64
import binascii
import functools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from models import errors
from models.settings import Settings
from models.tenants import Caller, Callers


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session on the app's engine, committed by the route when it changes something.

    Made and closed on the event loop, not in a worker thread: making one does no I/O, and
    closing returns its connection to the pool (at most a ROLLBACK). Two hand-offs to the
    thread pool fewer per request, which the benchmark's profile showed to matter."""
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
_bearer = HTTPBearer(auto_error=False, description="A tenant API key.")


def current_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The tenant whose API key the request carries; 401 without a valid one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise errors.Unauthorized()
    callers: Callers = request.app.state.callers
    tenant = callers.lookup(session, credentials.credentials)
    if tenant is None:
        raise errors.Unauthorized()
    return tenant


CurrentTenant = Annotated[Caller, Depends(current_tenant)]


@dataclass
class Page:
    """``?limit=`` (1 to 200, default 50) and ``?cursor=`` of a list call."""

    limit: int
    after: str | None

    def apply(self, statement: Any, model: Any) -> Any:
        """``statement`` restricted to this page (one extra row tells whether more follow)."""
        if self.after:
            statement = statement.where(model.id > self.after)
        return statement.order_by(model.id).limit(self.limit + 1)

    def answer(self, rows: list[Any], public: Any) -> dict[str, Any]:
        """The list answer: ``items`` and the cursor of the next page, or null."""
        more = len(rows) > self.limit
        rows = rows[: self.limit]
        cursor = base64.urlsafe_b64encode(rows[-1].id.encode()).decode() if more else None
        return {"items": [public(row) for row in rows], "next_cursor": cursor}


def page(
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Page:
    """The page a list call asks for."""
    after = None
    if cursor:
        try:
            after = str(uuid.UUID(base64.urlsafe_b64decode(cursor.encode()).decode()))
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise errors.InvalidInput(
                "cursor is not valid: pass next_cursor as it was given",
                errors=[{"loc": ["query", "cursor"], "msg": "not a cursor of this list"}],
            ) from exc
    return Page(limit=limit, after=after)


PageDep = Annotated[Page, Depends(page)]


def by_id_or_name(session: Session, model: Any, ref: str, **scope: str) -> Any:
    """The row of ``model`` within ``scope`` whose id, else whose name, is ``ref``; else 404."""
    if "\x00" in ref:  # no id or name holds NUL (PostgreSQL cannot even compare one)
        raise errors.NotFound(f"no {model.__name__.lower()} with that reference")
    rows = session.exec(_lookup(model, tuple(sorted(scope))), params={**scope, "ref": ref}).all()
    row = next((r for r in rows if r.id == ref), rows[0] if rows else None)  # the id wins
    if row is None:
        raise errors.NotFound(f"no {model.__name__.lower()} {ref!r}")
    return row


@functools.cache
def _lookup(model: Any, scope: tuple[str, ...]) -> Any:
    """The statement of :func:`by_id_or_name`, built once per model and scope: at most one row
    by id and one by name, in one round trip."""
    statement = select(model).where(*(getattr(model, k) == sa.bindparam(k) for k in scope))
    if hasattr(model, "name"):
        return statement.where(sa.or_(model.id == sa.bindparam("ref"), model.name == sa.bindparam("ref"))).limit(2)
    return statement.where(model.id == sa.bindparam("ref"))
