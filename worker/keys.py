"""Every queue, task and Redis key name the hub uses, built in one place."""

from __future__ import annotations

EXECUTE_TASK = "hub.execute"
"""The task that runs one job; its only argument is the job id."""


def token_key(tenant_id: str, connection_id: str, version: int) -> str:
    """Where a connection's cached OAuth token lives (sealed by the vault)."""
    return f"hub:token:{tenant_id}:{connection_id}:v{version}"


def token_lock_key(tenant_id: str, connection_id: str, version: int) -> str:
    """The lock that lets one worker at a time request a connection's token."""
    return f"hub:token-lock:{tenant_id}:{connection_id}:v{version}"

CALLBACK_TASK = "hub.callback"
"""The task that delivers a finished job to its ``callback_url``; its only argument is the job id."""

SWEEP_TASK = "hub.sweep"
"""The periodic task (Celery beat) that sends lost jobs again and deletes expired ones."""

SWEEP_LOCK_KEY = "hub:sweep-lock"
"""Held while one sweep runs, so two beats never sweep at once."""


def rate_key(tenant_id: str) -> str:
    """A tenant's rate-limit state: the theoretical arrival time of its next request (µs)."""
    return f"hub:rate:{tenant_id}"


def departures_key(tenant_id: str) -> str:
    """A tenant's calls that went out: the theoretical arrival time of the next one (µs)."""
    return f"hub:rate:{tenant_id}:sent"


def held_key(tenant_id: str) -> str:
    """When the next job of the tenant held back at its slot is told to come back (µs)."""
    return f"hub:rate:{tenant_id}:held"


def cooldown_key(connection_id: str) -> str:
    """Set, with a TTL, while a connection cools down after a ``429`` with ``Retry-After``."""
    return f"hub:cooldown:{connection_id}"