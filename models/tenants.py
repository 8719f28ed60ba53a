"""Tenants and their API keys. A key is shown once, at creation; the database keeps its SHA-256.

Keys are 32 random bytes, so a fast hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlmodel import Session, col, select

from models import errors
from models.tables import ApiKey, Tenant

KEY_PREFIX = "hub_"


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(
    session: Session,
    *,
    name: str,
    rate_per_s: float | None = None,
    burst: int | None = None,
    max_inflight: int | None = None,
) -> Tenant:
    """A new tenant named ``name`` (unique), with its own limits or (None) the defaults."""
    if (rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s > 0)) or \
            (burst is not None and burst < 0) or (max_inflight is not None and max_inflight < 1):
        raise errors.InvalidInput("the rate and the in-flight quota must be positive, the burst 0 or more")
    if session.exec(select(Tenant).where(Tenant.name == name)).first():
        raise errors.NameTaken(f"a tenant named {name!r} exists")
    tenant = Tenant(name=name, rate_per_s=rate_per_s, burst=burst, max_inflight=max_inflight)
    session.add(tenant)
    session.flush()
    return tenant


def set_limits(
    session: Session,
    *,
    name: str,
    rate_per_s: float | None = None,
    burst: int | None = None,
    max_inflight: int | None = None,
) -> Tenant:
    """Change the tenant's limits: a value given replaces the tenant's, ``0`` (``-1`` for the
    burst) goes back to the default, None leaves it as it is."""
    tenant = session.exec(select(Tenant).where(Tenant.name == name)).first()
    if tenant is None:
        raise errors.NotFound(f"no tenant named {name!r}")
    if rate_per_s is not None:
        if not math.isfinite(rate_per_s) or rate_per_s < 0:  # NaN passes `< 0`, then breaks every rate computation
            raise errors.InvalidInput("the rate must be a positive number (0: the default)")
        tenant.rate_per_s = rate_per_s or None
    if burst is not None:
        if burst < -1:
            raise errors.InvalidInput("the burst must be 0 or more (-1: the default)")
        tenant.burst = None if burst == -1 else burst
    if max_inflight is not None:
        if max_inflight < 0:
            raise errors.InvalidInput("the in-flight quota must be positive (0: the default)")
        tenant.max_inflight = max_inflight or None
    session.add(tenant)
    session.flush()
    return tenant


def issue_key(session: Session, *, tenant_id: str) -> str:
    """A new API key for the tenant; the only time its plaintext exists."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant_id, prefix=key[:12], key_hash=hash_key(key)))
    session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    """The tenant whose unrevoked key ``key`` is, or None."""
    statement = (
        select(Tenant)
        .join(ApiKey, sa.and_(ApiKey.tenant_id == Tenant.id))  # type: ignore[arg-type]
        .where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))  # type: ignore[union-attr]
    )
    return session.exec(statement).first()


@dataclass(frozen=True)
class Caller:
    """The tenant a request acts for, as its API key names it: its id and name, which never
    change. Its limits are read where they are used, so a change applies at once."""

    id: str
    name: str


_CALLER = (
    sa.select(col(Tenant.id), col(Tenant.name))
    .join(ApiKey, col(ApiKey.tenant_id) == col(Tenant.id))
    .where(col(ApiKey.key_hash) == sa.bindparam("key_hash"), col(ApiKey.revoked_at).is_(None))
)


class Callers:
    """Which tenant an API key belongs to, remembered for ``ttl_s`` seconds by one process.

    The lookup was the largest single cost of an API request in the benchmark's profile (two
    per job: the submission and its poll). Only keys that exist are remembered, at most
    ``MAX_KEYS`` of them, by their digest; a revoked key is refused once its entry expires.
    """

    MAX_KEYS = 10_000

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._known: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def lookup(self, session: Session, key: str) -> Caller | None:
        """The tenant whose unrevoked key ``key`` is, or None."""
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            found = self._known.get(digest)
        if found is not None and found[0] > now:
            return found[1]
        row = session.execute(_CALLER, {"key_hash": digest}).first()
        if row is None:
            return None
        caller = Caller(id=row[0], name=row[1])
        if self.ttl_s > 0:
            with self._lock:
                if len(self._known) >= self.MAX_KEYS:
                    self._known.clear()
                self._known[digest] = (now + self.ttl_s, caller)
        return caller
