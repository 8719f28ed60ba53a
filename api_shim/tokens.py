"""A change to a connection or its secrets moves the connection's version, and the tokens
cached for the old version are dropped, so the next job requests a token with the new
settings."""

from __future__ import annotations

import logging

import redis
import sqlalchemy as sa
from fastapi import Request
from sqlmodel import Session, select

from models.tables import Connection
from worker.keys import token_key

log = logging.getLogger("hub.api")


def new_version(session: Session, connection: Connection) -> int:
    """Move the connection to a new version (commit afterwards); the version it had.

    An increment in the database, under the row's lock: two changes at once move it twice.
    """
    session.flush()
    session.execute(sa.update(Connection).where(Connection.id == connection.id)  # type: ignore[arg-type]
                    .values(version=Connection.version + 1))
    current = session.exec(select(Connection.version).where(Connection.id == connection.id)).one()
    return int(current) - 1


def drop_cached_tokens(request: Request, connection: Connection, version: int) -> None:
    """Delete the token cached for ``version`` of the connection (after the change committed).

    Best effort: if Redis is unreachable, the moved version alone keeps the old token unused.
    """
    client: redis.Redis = request.app.state.redis
    try:
        client.delete(token_key(connection.tenant_id, connection.id, version))
    except redis.RedisError as exc:
        log.warning("could not drop cached tokens of connection %s: %s", connection.id, type(exc).__name__)
