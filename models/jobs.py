"""Jobs: their states and the transitions the worker makes, each one atomic in the database."""

from __future__ import annotations

import enum
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from models.base import utcnow
from models.errors import HubError
from models.tables import Job


class JobStatus(str, enum.Enum):
    """Where a job is in its life."""

    QUEUED = "queued"
    """Stored and sent to the broker; no worker has claimed it yet."""
    RUNNING = "running"
    """A worker claimed it and is executing it."""
    RETRYING = "retrying"
    """An attempt failed in a way that is retried; it waits for its next attempt."""
    SUCCEEDED = "succeeded"
    """The web service answered, whatever its HTTP status; ``result`` holds the answer."""
    FAILED = "failed"
    """The web service could not be reached or refused us for good; ``error`` says why."""
    CANCELLED = "cancelled"
    """Cancelled before it started."""


FINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


def claim(session: Session, job_id: str) -> bool:
    """Move the job from ``queued`` to ``running``; False if it was not queued.

    One conditional UPDATE, so of two deliveries of the same message exactly one wins,
    on SQLite and PostgreSQL alike.
    """
    statement = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)  # type: ignore[arg-type]
        .values(status=JobStatus.RUNNING.value, started_at=utcnow(), attempts=Job.attempts + 1)
    )
    claimed = session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
    session.commit()
    return claimed


def cancel(session: Session, job_id: str) -> bool:
    """Move the job from ``queued`` to ``cancelled``; False if it had already started or ended.

    The same conditional UPDATE as :func:`claim`: a job is either claimed or cancelled, never both.
    """
    statement = (
        sa.update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)  # type: ignore[arg-type]
        .values(status=JobStatus.CANCELLED.value, finished_at=utcnow())
    )
    cancelled = session.execute(statement).rowcount == 1  # type: ignore[attr-defined]
    session.commit()
    return cancelled


def finish(
    session: Session,
    job_id: str,
    *,
    status: JobStatus,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    secrets_used: list[str] | None = None,
) -> None:
    """Record the end of a running job."""
    values: dict[str, Any] = {
        "status": status.value,
        "result": result,
        "error": error,
        "finished_at": utcnow(),
    }
    if secrets_used is not None:
        values["secrets_used"] = secrets_used
    session.execute(sa.update(Job).where(Job.id == job_id).values(**values))  # type: ignore[arg-type]
    session.commit()


def fail(session: Session, job_id: str, exc: HubError, *, secrets_used: list[str] | None = None) -> None:
    """Record that the job failed for the reason ``exc`` names (its code and safe message)."""
    finish(session, job_id, status=JobStatus.FAILED, error={"code": exc.code, "message": exc.message},
           secrets_used=secrets_used)
