"""A connection's OAuth token for one job: from the cache, else requested by one worker.

The request opens the secrets it needs (recorded in the job's ``secrets_used``), goes only to
an allowed, guarded destination, is retried with backoff on timeouts, connection errors, 429
and 5xx, and a refresh token that the server rotates replaces the stored secret (the old one
is never sent again).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from sqlmodel import Session

from models import rules, secrets
from models.tables import Connection
from worker import oauth
from worker.tokens import Cached, Slot, TokenCache


def slot(connection: Connection) -> Slot:
    """Where the connection's current token is cached."""
    return Slot(connection.tenant_id, connection.id, connection.version)


def obtain(
    session: Session,
    connection: Connection,
    *,
    cache: TokenCache,
    send: Callable[[oauth.TokenRequest], oauth.Token],
    used: list[str],
) -> Cached:
    """The connection's token, fetched only when no worker has it cached. ``send`` sends a
    token request (to a checked destination only)."""
    return cache.obtain(slot(connection), lambda: _fetch(session, connection, cache, send, used))


def _fetch(
    session: Session,
    connection: Connection,
    cache: TokenCache,
    send: Callable[[oauth.TokenRequest], oauth.Token],
    used: list[str],
) -> oauth.Token:
    settings = cache.settings
    oauth2 = connection.oauth2 or {}
    names = rules.secret_names(oauth2, connection.auth_header_values)
    used.extend(names)
    opened = secrets.open_secrets(session, cache.vault, tenant_id=connection.tenant_id,
                                  connection_id=connection.id, names=names)
    request = oauth.build(oauth2, secrets=opened, auth_headers=connection.auth_header_values)
    for attempt in range(1, settings.token_attempts + 1):
        try:
            token = send(request)
            break
        except oauth.TokenEndpointUnavailable:
            if attempt == settings.token_attempts:
                raise
            time.sleep(min(5.0, settings.token_backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
    _keep_rotated_refresh_token(session, connection, cache, opened, token)
    return token


def _keep_rotated_refresh_token(
    session: Session, connection: Connection, cache: TokenCache, opened: dict[str, str], token: oauth.Token
) -> None:
    oauth2 = connection.oauth2 or {}
    if oauth2.get("grant_type") != "refresh_token" or token.refresh_token is None:
        return  # no new refresh token: the stored one stays
    match = rules.SECRET.fullmatch(oauth2.get("refresh_token") or "")
    if match is None or opened.get(match.group(1)) == token.refresh_token:
        return
    secrets.put(session, cache.vault, tenant_id=connection.tenant_id, connection_id=connection.id,
                name=match.group(1), value=token.refresh_token)
    session.commit()


def token_required(connection: Connection) -> bool:
    """Whether requests of the connection carry an OAuth token."""
    return connection.template.get("auth_type") == "oauth2"

