"""The sweeper: what makes sure no job is lost, and no finished job is kept forever.

Celery beat runs :func:`sweep` every ``HUB_SWEEP_INTERVAL_S``. Each run:

1. sends again every waiting job (``queued`` or ``retrying``) whose message is gone: it was
   never sent (the broker was down at submission, ``due_at`` is empty) or it was due more than
   ``HUB_SWEEP_GRACE_S`` ago and no worker took it (say Redis restarted without persistence).
   A job sent again ``HUB_MAX_DISPATCHES`` times fails ``job_lost``;
2. takes back every ``running`` job past its lease (its worker died): it is sent again if the
   retry policy lets its request be repeated and it has attempts left, else it fails
   (``worker_lost``, or ``retries_exhausted``);
3. sends again every pending callback whose try was due more than a grace period ago (its
   message was lost: the broker was down when the job finished, or Redis lost a retry);
4. deletes finished jobs older than the retention period, and idempotency keys past 24 hours.

A second message for a job is harmless: the claim lets exactly one delivery run it. Every
change here is a conditional UPDATE on the state the sweeper read, so a worker that moves the
job meanwhile wins.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from models import errors, jobs, metrics
from models.base import utcnow
from models.db import rowcount
from models.idempotency import WINDOW
from models.jobs import JobStatus
from models.logs import job_event
from models.settings import Settings
from models.tables import IdempotencyKey, Job
from worker import retries

log = logging.getLogger("hub.sweeper")

BATCH = 500


@dataclass(frozen=True)
class Failed:
    """A job the sweep failed: for the hub's metrics, and to wake its ``?wait`` requests."""

    job_id: str
    tenant_id: str
    code: str


@dataclass
class SweepReport:
    """What one sweep did: a count per action, and the jobs it failed."""

    redispatched: int = 0
    lost: int = 0
    reclaimed: int = 0
    abandoned: int = 0
    callbacks: int = 0
    deleted_jobs: int = 0
    deleted_keys: int = 0
    failed: list[Failed] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """The actions taken, by name, with how many times."""
        return {name: count for name, count in vars(self).items() if isinstance(count, int) and count}


@dataclass
class Senders:
    """How the sweeper sends messages: ``dispatch`` a job id to the workers, ``notify`` the
    delivery of a job's callback. Both raise ``BrokerUnavailable`` when the broker is down."""

    dispatch: Callable[[str], None]
    notify: Callable[[str], None]


def sweep(engine: Engine, settings: Settings, senders: Senders, *, now: datetime | None = None) -> SweepReport:
    """One sweep (see the module's documentation). A job whose message cannot be sent (the
    broker is down) is left for the next sweep."""
    now = now or utcnow()
    report = SweepReport()
    with Session(engine, expire_on_commit=False) as session:
        _resend_waiting(session, settings, senders, now, report)
        _take_back_running(session, settings, senders, now, report)
        _resend_callbacks(session, settings, senders, now, report)
        _delete_expired(session, settings, now, report)
    if report.counts():
        log.info("sweep: %s", ", ".join(f"{name} {count}" for name, count in report.counts().items()))
    return report


def record(report: SweepReport, batch: metrics.Batch) -> None:
    """Add what the sweep did to the hub's metrics. A job it failed is counted and announced
    as a worker does with a job it ends, so ``hub_jobs_finished_total`` counts every final job
    and its ``?wait`` requests wake at once."""
    for action, count in report.counts().items():
        batch.inc("hub_sweeper_actions_total", count, action=action)
    for failed in report.failed:
        batch.announce(failed.job_id)
        batch.inc("hub_jobs_finished_total", tenant=failed.tenant_id, status="failed", code=failed.code)


def _resend_waiting(session: Session, settings: Settings, senders: Senders, now: datetime,
                    report: SweepReport) -> None:
    overdue = now - timedelta(seconds=settings.sweep_grace_s)
    rows = session.execute(
        sa.select(col(Job.id), col(Job.tenant_id), col(Job.status), col(Job.due_at), col(Job.dispatches),
                  col(Job.callback_url))
        .where(col(Job.status).in_(jobs.WAITING), sa.or_(col(Job.due_at).is_(None), col(Job.due_at) < overdue))
        .order_by(col(Job.id))
        .limit(BATCH)
    ).all()
    for job_id, tenant_id, status, due_at, dispatches, callback_url in rows:
        unchanged = (col(Job.id) == job_id, col(Job.status) == status, col(Job.dispatches) == dispatches,
                     col(Job.due_at).is_(None) if due_at is None else col(Job.due_at) == due_at)
        if dispatches >= settings.max_dispatches:
            report.lost += _fail(session, unchanged, errors.JobLost(
                f"the job's message was lost {dispatches + 1} times"), senders, (job_id, tenant_id), callback_url,
                now, report)
            continue
        if not _send(senders.dispatch, job_id):
            return  # the broker is down: every other job waits for the next sweep too
        sent = rowcount(session.execute(
            sa.update(Job).where(*unchanged).values(due_at=now, dispatches=dispatches + 1, slot_at=None)))
        session.commit()
        if sent:
            job_event(log, "swept: its message was lost, sent again", job_id, attempt=dispatches + 1)
        report.redispatched += sent


def _take_back_running(session: Session, settings: Settings, senders: Senders, now: datetime,
                       report: SweepReport) -> None:
    rows = session.execute(
        sa.select(col(Job.id), col(Job.tenant_id), col(Job.attempts), col(Job.params), col(Job.lease_until),
                  col(Job.callback_url))
        .where(col(Job.status) == JobStatus.RUNNING.value, col(Job.lease_until) < now)
        .order_by(col(Job.id))
        .limit(BATCH)
    ).all()
    for job_id, tenant_id, attempts, params, lease_until, callback_url in rows:
        unchanged = (col(Job.id) == job_id, col(Job.status) == JobStatus.RUNNING.value, col(Job.attempts) == attempts,
                     col(Job.lease_until) == lease_until)
        may_repeat = retries.repeatable(params.get("method"), idempotency_key=bool(params.get("idempotency_key")))
        if not may_repeat:
            report.abandoned += _fail(session, unchanged, errors.WorkerLost(
                "the worker running the job was lost, and the request is not safe to send again "
                "(POST and PATCH are only with an Idempotency-Key)"), senders, (job_id, tenant_id), callback_url,
                now, report)
            continue
        if attempts >= int(params.get("max_attempts") or settings.default_max_attempts):
            report.abandoned += _fail(session, unchanged, errors.RetriesExhausted(
                f"{attempts} attempts; the last one's worker was lost"), senders, (job_id, tenant_id), callback_url,
                now, report)
            continue
        changed = rowcount(session.execute(sa.update(Job).where(*unchanged).values(
            status=JobStatus.RETRYING.value, lease_until=None, due_at=now,
            error={"code": errors.WorkerLost.code, "message": "the worker running the last attempt was lost"},
        )))
        session.commit()
        if not changed:
            continue
        if not _send(senders.dispatch, job_id):  # never sent: the next sweep sends it
            session.execute(sa.update(Job).where(col(Job.id) == job_id).values(due_at=None))
            session.commit()
            return
        job_event(log, "swept: its worker was lost, sent again", job_id, attempt=attempts)
        report.reclaimed += 1


def _resend_callbacks(session: Session, settings: Settings, senders: Senders, now: datetime,
                      report: SweepReport) -> None:
    """Pending callbacks whose try was due a grace period ago: their message was lost (the
    broker was down when the job finished, or Redis lost a retry's message). Each is sent once
    per grace period: its due time moves to now."""
    overdue = now - timedelta(seconds=settings.sweep_grace_s)
    due = sa.func.coalesce(col(Job.callback_due_at), col(Job.finished_at))
    rows = session.execute(
        sa.select(col(Job.id), col(Job.callback_attempts))
        .where(col(Job.callback_state) == "pending", due < overdue)
        .order_by(col(Job.id))
        .limit(BATCH)
    ).all()
    for job_id, attempts in rows:
        if not _send(senders.notify, job_id):
            return  # the broker is down: the others wait for the next sweep too
        session.execute(sa.update(Job).where(col(Job.id) == job_id, col(Job.callback_state) == "pending",
                                             col(Job.callback_attempts) == attempts).values(callback_due_at=now))
        session.commit()
        report.callbacks += 1


def _fail(session: Session, unchanged: tuple[sa.ColumnElement[bool], ...], exc: errors.HubError, senders: Senders,
          job: tuple[str, str], callback_url: str | None, now: datetime, report: SweepReport) -> int:
    job_id, tenant_id = job
    changed = rowcount(session.execute(sa.update(Job).where(*unchanged).values(
        status=JobStatus.FAILED.value, finished_at=now, lease_until=None, error=jobs.error_document(exc),
        callback_state="pending" if callback_url else None,
    )))
    session.commit()
    if changed:
        job_event(log, "failed", job_id, outcome=exc.code)
        report.failed.append(Failed(job_id, tenant_id, exc.code))
    if changed and callback_url:
        _send(senders.notify, job_id)
    return int(changed)


def _send(dispatch: Callable[[str], None], job_id: str) -> bool:
    try:
        dispatch(job_id)
    except errors.BrokerUnavailable:
        log.warning("sweep: the broker is unavailable; job %s waits for the next sweep", job_id)
        return False
    return True


def _delete_expired(session: Session, settings: Settings, now: datetime, report: SweepReport) -> None:
    cutoff = now - timedelta(days=settings.retention_days)
    finished = [state.value for state in jobs.FINAL_STATES]
    while True:
        ids = session.execute(
            sa.select(col(Job.id)).where(col(Job.status).in_(finished), col(Job.finished_at) < cutoff).limit(BATCH)
        ).scalars().all()
        if not ids:
            break
        report.deleted_jobs += rowcount(session.execute(sa.delete(Job).where(col(Job.id).in_(ids))))
        session.commit()
    report.deleted_keys += rowcount(session.execute(
        sa.delete(IdempotencyKey).where(col(IdempotencyKey.created_at) < now - WINDOW)
    ))
    session.commit()
