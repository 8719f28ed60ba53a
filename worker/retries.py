"""The retry policy of API.md, as pure functions: what is retried, and after how long.

- Retried: connect errors (``connection_refused``, ``connect_timeout``) and the statuses 429,
  502, 503 and 504; nothing else (a read timeout may mean the service acted on the request).
- For ``GET HEAD OPTIONS PUT DELETE TRACE``; ``POST`` and ``PATCH`` only when the submission
  carried an ``Idempotency-Key``, which the hub forwards so the service can drop a repeat.
- After a capped exponential backoff with full jitter, or the service's ``Retry-After`` when it
  sent one, honoured up to a cap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRIED_STATUSES = frozenset({429, 502, 503, 504})
RETRIED_ERRORS = frozenset({"connection_refused", "connect_timeout"})
REPEATABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def repeatable(method: str | None, *, idempotency_key: bool) -> bool:
    """Whether a request with ``method`` may be sent again. None (the auth action): yes."""
    return method is None or method.upper() in REPEATABLE_METHODS or idempotency_key


def retried(*, status_code: int | None = None, error_code: str | None = None) -> bool:
    """Whether an attempt that got ``status_code`` (or failed with ``error_code``) is retried."""
    if status_code is not None:
        return status_code in RETRIED_STATUSES
    return error_code in RETRIED_ERRORS


def backoff(attempt: int, *, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first): a uniform
    draw in ``[0, min(cap, base · 2^(attempt-1))]`` ("full jitter"), so that jobs failing
    together do not come back together."""
    ceiling = min(cap_s, base_s * 2 ** min(max(attempt, 1) - 1, 62))
    return rand() * ceiling


def retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date); None when
    absent or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²", which int() refuses
        return float(int(value[:12]))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def delay(attempt: int, *, asked_s: float | None, base_s: float, cap_s: float, retry_after_cap_s: float,
          rand: Callable[[], float] = random.random) -> float:
    """How long to wait before the attempt after ``attempt``: what the service asked for
    (``Retry-After``, at most ``retry_after_cap_s``), else the backoff."""
    if asked_s is not None:
        return min(asked_s, retry_after_cap_s)
    return backoff(attempt, base_s=base_s, cap_s=cap_s, rand=rand)
