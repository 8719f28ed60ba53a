"""Idempotent submission: within a tenant, an ``Idempotency-Key`` names one job for 24 hours.

The same key with the same body gives back the first job; with another body it is refused
(``422 idempotency_key_reused``). A unique (tenant, key) row makes two concurrent submissions
with one key make one job: the second insert fails, and the caller reads the first.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, select

from models import errors
from models.base import as_utc
from models.tables import IdempotencyKey

WINDOW = timedelta(hours=24)
MAX_KEY_CHARS = 255


def check_key(key: str) -> None:
    """A key is 1 to 255 visible ASCII characters."""
    if not 0 < len(key) <= MAX_KEY_CHARS or not key.isascii() or not key.isprintable():
        raise errors.InvalidInput(
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "not a valid key"}],
        )


def body_hash(document: dict[str, Any]) -> str:
    """A fingerprint of a submission's body, independent of key order and spacing."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def first_job(session: Session, *, tenant_id: str, key: str, hashed: str, now: datetime) -> str | None:
    """The job the key already names, or None (an expired key is forgotten here)."""
    row = session.exec(
        select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
    ).first()
    if row is None:
        return None
    created = as_utc(row.created_at)
    if created is not None and created < now - WINDOW:
        session.delete(row)
        session.flush()
        return None
    if row.body_hash != hashed:
        raise errors.IdempotencyKeyReused()
    return row.job_id


def remember(session: Session, *, tenant_id: str, key: str, hashed: str, job_id: str) -> None:
    """Record that ``key`` names ``job_id`` (committed with the job)."""
    session.add(IdempotencyKey(tenant_id=tenant_id, key=key, body_hash=hashed, job_id=job_id))
