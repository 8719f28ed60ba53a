"""Ids and time, the two things every row has."""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timezone

_RANDOM_BITS = 74
_last_id = 0
_id_lock = threading.Lock()


def new_id() -> str:
    """A new opaque id: a version 7 UUID whose order is creation order within this process.

    48 bits of Unix milliseconds, then 74 random bits; an id made in the same millisecond as
    the previous one is that one plus one (RFC 9562, monotonic random), so list pagination
    by id follows creation order.
    """
    global _last_id
    with _id_lock:
        payload = (time.time_ns() // 1_000_000) << _RANDOM_BITS | int.from_bytes(os.urandom(10), "big") >> 6
        payload = max(payload, _last_id + 1)
        _last_id = payload
    ms, rand = payload >> _RANDOM_BITS, payload & ((1 << _RANDOM_BITS) - 1)
    value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0x2 << 62 | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` as aware UTC; SQLite hands back naive datetimes that were stored as UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def rfc3339(value: datetime | None) -> str | None:
    """``value`` as an RFC 3339 UTC string with a ``Z``, as the API shows timestamps."""
    aware = as_utc(value)
    if aware is None:
        return None
    return aware.isoformat(timespec="milliseconds").replace("+00:00", "Z")
