"""Jobs: their states and the transitions the worker makes, each one atomic in the database."""

from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import Session

from models.base import as_utc, utcnow
from models.db import rowcount, writing
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
IN_FLIGHT = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.RETRYING.value)
"""The states a tenant's in-flight quota counts."""
FINAL_CHANNEL = "hub:job-final"
"""The Redis channel on which workers publish the id of each job they finish (it wakes the
API's ``?wait`` requests)."""
WAITING = (JobStatus.QUEUED.value, JobStatus.RETRYING.value)
"""The states in which a job waits for a worker to claim it."""


def claimable(job: Job, now: datetime) -> bool:
    """Whether a delivery of the job's message may run it: it waits, or its worker was lost."""
    if job.status in WAITING:
        return True
    lease = as_utc(job.lease_until)
    return job.status == JobStatus.RUNNING.value and lease is not None and lease < now


def _update(session: Session, statement: Any) -> bool:
    with writing(session):
        changed = rowcount(session.execute(statement)) == 1
        session.commit()
    return changed


def claim(session: Session, job_id: str, *, lease_s: float, now: datetime | None = None) -> int | None:
    """Move the job to ``running`` and count the attempt; the attempt's number, or None if
    the job was not waiting (nor ``running`` past its lease: its worker was lost).

    One conditional UPDATE, so of two deliveries of the same message exactly one wins, on
    SQLite and PostgreSQL alike. The attempt number fences what the attempt may write later.
    """
    now = now or utcnow()
    with writing(session):
        attempt = session.execute(_CLAIM, {"job_id": job_id, "now": now,
                                           "lease_until": now + timedelta(seconds=lease_s)}).scalar_one_or_none()
        session.commit()
    return attempt


_JOB = Job.__table__  # type: ignore[attr-defined]
"""The job table. The transitions below are plain SQL statements on it: through the ORM, a
claim or a finish cost several times the statement itself (the benchmark's profile)."""
_CLAIM = (
    sa.update(_JOB)
    .where(_JOB.c.id == sa.bindparam("job_id"), sa.or_(
        _JOB.c.status.in_(WAITING),
        sa.and_(_JOB.c.status == JobStatus.RUNNING.value, _JOB.c.lease_until < sa.bindparam("now")),
    ))
    .values(status=JobStatus.RUNNING.value, started_at=sa.func.coalesce(_JOB.c.started_at, sa.bindparam("now")),
            attempts=_JOB.c.attempts + 1, lease_until=sa.bindparam("lease_until"), slot_at=None)
    .returning(_JOB.c.attempts)
)


def renew(session: Session, job_id: str, attempt: int, *, lease_s: float, now: datetime | None = None) -> bool:
    """Extend the lease of the running attempt ``attempt`` to ``lease_s`` from now; False if
    that attempt no longer holds the job (it ended, or the sweeper took it back)."""
    until = (now or utcnow()) + timedelta(seconds=lease_s)
    return _update(session, sa.update(_JOB)
                   .where(_JOB.c.id == job_id, _JOB.c.status == JobStatus.RUNNING.value, _JOB.c.attempts == attempt)
                   .values(lease_until=until))


def defer(session: Session, job_id: str, *, due_at: datetime, slot_at: datetime | None) -> bool:
    """Note that a waiting job's message was sent again for ``due_at`` (over its tenant's rate,
    or its connection cooling down), with the slot it reserved, if any."""
    return _update(session, sa.update(_JOB).where(_JOB.c.id == job_id, _JOB.c.status.in_(WAITING))
                   .values(due_at=due_at, slot_at=slot_at))


def retry_later(session: Session, job_id: str, attempt: int, *, due_at: datetime,
                error: dict[str, Any], result: dict[str, Any] | None, secrets_used: list[str]) -> bool:
    """Put the job that attempt ``attempt`` ran back to wait for its next attempt at ``due_at``;
    ``error`` and ``result`` show why meanwhile."""
    return _update(session, sa.update(_JOB)
                   .where(_JOB.c.id == job_id, _JOB.c.status == JobStatus.RUNNING.value, _JOB.c.attempts == attempt)
                   .values(status=JobStatus.RETRYING.value, due_at=due_at, lease_until=None, error=error,
                           result=result, secrets_used=secrets_used))


def cancel(session: Session, job_id: str) -> bool:
    """Move the job from ``queued`` to ``cancelled``; False if it had already started or ended.

    The same conditional UPDATE as :func:`claim`: a job is either claimed or cancelled, never both.
    """
    return _update(session, sa.update(_JOB).where(_JOB.c.id == job_id, _JOB.c.status == JobStatus.QUEUED.value)
                   .values(status=JobStatus.CANCELLED.value, finished_at=utcnow()))


def finish(
    session: Session,
    job_id: str,
    *,
    status: JobStatus,
    attempt: int | None = None,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
    secrets_used: list[str] | None = None,
    callback: bool = False,
) -> bool:
    """Record the end of a job; with ``attempt``, only if that attempt still holds it (a worker
    that outlived its lease does not overwrite the attempt that replaced it)."""
    values: dict[str, Any] = {
        "status": status.value,
        "result": result,
        "error": error,
        "finished_at": utcnow(),
        "lease_until": None,
        "slot_at": None,
    }
    if secrets_used is not None:
        values["secrets_used"] = secrets_used
    if callback:
        values["callback_state"] = "pending"
    statement = sa.update(_JOB).where(_JOB.c.id == job_id)
    if attempt is not None:
        statement = statement.where(_JOB.c.status == JobStatus.RUNNING.value, _JOB.c.attempts == attempt)
    else:
        statement = statement.where(_JOB.c.status.not_in([s.value for s in FINAL_STATES]))
    return _update(session, statement.values(**values))


def error_document(exc: HubError, **extra: Any) -> dict[str, Any]:
    """A job's ``error``: the code and the safe message of ``exc``."""
    return {"code": exc.code, "message": exc.message, **extra}


def fail(session: Session, job_id: str, exc: HubError, *, attempt: int | None = None,
         secrets_used: list[str] | None = None, result: dict[str, Any] | None = None,
         callback: bool = False, **extra: Any) -> bool:
    """Record that the job failed for the reason ``exc`` names (its code and safe message)."""
    return finish(session, job_id, status=JobStatus.FAILED, attempt=attempt, result=result,
                  error=error_document(exc, **extra), secrets_used=secrets_used, callback=callback)
