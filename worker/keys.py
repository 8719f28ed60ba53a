"""Every queue, task and Redis key name the hub uses, built in one place."""

from __future__ import annotations

EXECUTE_TASK = "hub.execute"
"""The task that runs one job; its only argument is the job id."""
