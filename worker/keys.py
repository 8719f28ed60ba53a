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
