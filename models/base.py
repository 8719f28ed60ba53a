"""Ids and time, the two things every row has."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone


def new_id() -> str:
    """A new opaque id: a version 7 UUID, so ids sort in creation order (pagination relies on it)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
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
