"""Running one job: claim it, load what it needs, get its token, render, guard, call, store.

Every path ends with the job in a final state (the service's answer, ``succeeded``, or a
``failed`` job whose error code says why), or waiting with its next message sent: over the
tenant's rate (``queued``) or after an attempt the retry policy retries (``retrying``). A job
that is not waiting is left alone, which is what makes a redelivered message harmless.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import redis
import sqlalchemy as sa
from sqlmodel import Session, col, select

from models import errors, jobs, metrics, rules, secrets
from models.base import as_utc, rfc3339, utcnow
from models.db import UNAVAILABLE
from models.jobs import JobStatus
from models.logs import job_event
from models.tables import Connection, Job, Request
from worker import credentials, ratelimit, render, retries, upstream
from worker.leases import LeaseLost
from worker.runtime import Attempt, Runtime
from worker.tokens import Cached

log = logging.getLogger("hub.worker")


def run_job(job_id: str, runtime: Runtime) -> None:
    """Execute the job ``job_id`` if it is waiting for a worker, and record its outcome.

    Over its tenant's rate, or while its connection cools down, the job is sent again for
    later and stays waiting. An attempt that fails in a way the retry policy retries leaves
    the job ``retrying`` and sends it again after a backoff; any other end is final.
    """
    batch = metrics.Batch(runtime.metrics)
    try:
        with Session(runtime.engine, expire_on_commit=False) as session:
            _run(session, job_id, runtime, batch)
    except UNAVAILABLE as exc:
        # The job is as the database last had it: waiting, and the sweeper sends it again, or
        # running, and the sweeper takes it back once its lease is past.
        job_event(log, "stopped: the database is unavailable; the sweeper will take it up", job_id,
                  level=logging.WARNING, code=type(exc).__name__)
    finally:
        batch.flush()


def _run(session: Session, job_id: str, runtime: Runtime, batch: metrics.Batch) -> None:
    found = session.execute(_LOAD, {"job_id": job_id}).first()
    now = utcnow()
    if found is None or not jobs.claimable(found[0], now):
        job_event(log, "not waiting; delivery ignored", job_id)
        return
    job, connection, stored = found
    try:
        if runtime.limiter is not None and not _admitted(session, job, runtime, now, batch):
            return
    except redis.RedisError as exc:  # the job stays waiting; the sweeper sends it again
        job_event(log, "not started: Redis is unavailable", job_id, level=logging.WARNING, code=type(exc).__name__)
        return
    deadline_s = float(job.params.get("timeout_s") or runtime.settings.request_deadline_s)
    lease_s = runtime.settings.job_lease_s + deadline_s
    number = jobs.claim(session, job_id, lease_s=lease_s, now=now)
    if number is None:
        job_event(log, "not waiting; delivery ignored", job_id)  # another delivery claimed it
        return
    fields: dict[str, Any] = {"tenant": job.tenant_id, "connection": job.connection_id, "attempt": number}
    if number == 1:
        waited = (now - (as_utc(job.created_at) or now)).total_seconds()
        batch.observe("hub_job_queue_wait_seconds", waited, tenant=job.tenant_id)
        fields["queue_wait_ms"] = round(waited * 1000, 1)
    job_event(log, "running", job_id, **fields)
    with runtime.leases.held(job_id, number, lease_s) if runtime.leases else nullcontext() as lease:
        attempt = Attempt(number, started=time.monotonic(), lease=lease)
        _attempt(session, job, connection, stored, runtime, attempt, batch, deadline_s, fields)


def _attempt(session: Session, job: Job, connection: Connection | None, stored: Request | None, runtime: Runtime,
             attempt: Attempt, batch: metrics.Batch, deadline_s: float, fields: dict[str, Any]) -> None:
    """Run the claimed attempt and record how it ended."""
    try:
        answer = _execute(session, job, connection, stored, runtime, attempt, deadline_s)
    except (errors.JobError, errors.InvalidInput, errors.Unavailable) as exc:
        _settle(session, job, runtime, attempt, batch, error=exc)
        return
    except UNAVAILABLE:
        raise  # the database's fault, not the job's: it runs again once its lease is past
    except LeaseLost:
        job_event(log, "stopped before its call: its lease was lost", job.id, level=logging.WARNING, **fields)
        return
    except Exception as exc:
        # The type only: an exception's text may quote a URL, a header or a secret.
        job_event(log, "failed unexpectedly", job.id, level=logging.ERROR, code=type(exc).__name__, **fields)
        session.rollback()
        _settle(session, job, runtime, attempt, batch, error=errors.HubError())
        return
    _settle(session, job, runtime, attempt, batch, answer=answer)


def _admitted(session: Session, job: Job, runtime: Runtime, now: datetime, batch: metrics.Batch) -> bool:
    """Whether the job may call out now; if not, it is sent again for when it may."""
    assert runtime.limiter is not None
    slot = as_utc(job.slot_at)
    reserved = slot is not None and slot <= now + SLOT_EARLY
    decision = runtime.limiter.acquire(job.tenant_id, job.connection_id, runtime.rate(session, job.tenant_id),
                                       reserved=reserved)
    if decision.outcome is ratelimit.Outcome.GO:
        return True
    fields: dict[str, Any] = {"tenant": job.tenant_id, "connection": job.connection_id}
    waited = (now - (as_utc(job.created_at) or now)).total_seconds()
    if waited + decision.delay_s > runtime.settings.rate_max_wait_s:
        reason = "its connection is cooling down" if decision.outcome is ratelimit.Outcome.COOLING_DOWN else \
            "its tenant's rate"
        if jobs.fail(session, job.id, errors.RateLimited(f"the job waited too long for {reason}"),
                     callback=bool(job.callback_url)):
            batch.announce(job.id)
            batch.inc("hub_jobs_finished_total", tenant=job.tenant_id, status="failed", code=errors.RateLimited.code)
            job_event(log, "failed", job.id, outcome=errors.RateLimited.code, **fields)
            runtime.notify(job)
        return False
    due = now + timedelta(seconds=decision.delay_s)
    slot_at = due if decision.outcome in (ratelimit.Outcome.RESERVED, ratelimit.Outcome.HELD) else None
    if jobs.defer(session, job.id, due_at=due, slot_at=slot_at):
        reason = decision.outcome.name.lower()
        batch.inc("hub_rate_limit_deferrals_total", tenant=job.tenant_id, reason=reason)
        job_event(log, "deferred", job.id, outcome=reason, delay_s=round(decision.delay_s, 3), **fields)
        runtime.dispatch(job.id, decision.delay_s)
    return False


SLOT_EARLY = timedelta(milliseconds=100)
"""A reserved slot counts from this much before it: Celery's timers are not that precise."""


def _settle(session: Session, job: Job, runtime: Runtime, attempt: Attempt, batch: metrics.Batch, *,
            answer: Answer | None = None, error: errors.HubError | None = None) -> None:
    """Record how the attempt ended: final, or ``retrying`` when the policy retries it."""
    settings = runtime.settings
    used = attempt.secrets_used()
    result = answer.result if answer else None
    elapsed = time.monotonic() - attempt.started
    for how in attempt.tokens:
        batch.inc("hub_token_cache_total", result=how)
    fields: dict[str, Any] = {"tenant": job.tenant_id, "connection": job.connection_id, "attempt": attempt.number,
                              "elapsed_ms": round(elapsed * 1000, 1)}
    last: dict[str, Any]
    if answer is not None and answer.status_code is not None:
        fields["status_code"] = answer.status_code
        batch.inc("hub_upstream_responses_total", tenant=job.tenant_id, status_code=answer.status_code)
        if result and result.get("truncated"):
            batch.inc("hub_responses_truncated_total", tenant=job.tenant_id)
        asked = retries.retry_after(answer.retry_after)
        if answer.status_code == 429 and asked is not None and runtime.limiter is not None:
            runtime.limiter.cool_down(job.connection_id, min(asked, settings.retry_after_cap_s))
        again = retries.retried(status_code=answer.status_code)
        last = {"code": "upstream_status", "message": f"the service answered {answer.status_code}",
                "status_code": answer.status_code}
    elif error is not None:
        asked, again = None, retries.retried(error_code=error.code)
        last = jobs.error_document(error)
    else:  # the auth action's answer
        asked, again, last = None, False, {}
    again = again and retries.repeatable(attempt.method, idempotency_key=bool(job.params.get("idempotency_key")))
    callback = bool(job.callback_url)
    max_attempts = int(job.params.get("max_attempts") or settings.default_max_attempts)
    if again and attempt.number < max_attempts:
        wait = retries.delay(attempt.number, asked_s=asked, base_s=settings.retry_base_s, cap_s=settings.retry_cap_s,
                             retry_after_cap_s=settings.retry_after_cap_s)
        due = utcnow() + timedelta(seconds=wait)
        if attempt.record(session, lambda: jobs.retry_later(session, job.id, attempt.number, due_at=due, error=last,
                                                            result=result, secrets_used=used)):
            batch.inc("hub_job_retries_total", tenant=job.tenant_id, code=last["code"])
            batch.observe("hub_job_execution_seconds", elapsed, tenant=job.tenant_id, outcome="retrying")
            job_event(log, "retrying", job.id, outcome=last["code"], delay_s=round(wait, 3), **fields)
            runtime.dispatch(job.id, wait)
        return
    if again:
        exhausted = errors.RetriesExhausted(f"{attempt.number} attempts failed; the last: {last['message']}")
        recorded = attempt.record(session, lambda: jobs.fail(session, job.id, exhausted, attempt=attempt.number,
                                                             result=result, secrets_used=used, callback=callback,
                                                             last=last))
        status, code = JobStatus.FAILED, exhausted.code
    elif error is not None:
        recorded = attempt.record(session, lambda: jobs.fail(session, job.id, error, attempt=attempt.number,
                                                             secrets_used=used, callback=callback))
        status, code = JobStatus.FAILED, error.code
    else:
        assert answer is not None
        recorded = attempt.record(session, lambda: jobs.finish(session, job.id, status=JobStatus.SUCCEEDED,
                                                               attempt=attempt.number, result=result,
                                                               secrets_used=used, callback=callback))
        status, code = JobStatus.SUCCEEDED, ""
    if not recorded:
        job_event(log, "outcome dropped: the attempt outlived its lease", job.id, **fields)
        return
    batch.announce(job.id)
    batch.inc("hub_jobs_finished_total", tenant=job.tenant_id, status=status.value, code=code)
    batch.observe("hub_job_execution_seconds", elapsed, tenant=job.tenant_id, outcome=status.value)
    job_event(log, status.value, job.id, outcome=code or status.value, **fields)
    runtime.notify(job)


@dataclass(frozen=True)
class Answer:
    """What an attempt got back: the job's ``result``, and the HTTP status and ``Retry-After``
    of the service's answer (None for the auth action)."""

    result: dict[str, Any]
    status_code: int | None = None
    retry_after: str | None = None


_LOAD = (
    select(Job, Connection, Request)
    .outerjoin(Connection, col(Connection.id) == col(Job.connection_id))
    .outerjoin(Request, col(Request.id) == col(Job.request_id))
    .where(col(Job.id) == sa.bindparam("job_id"))
)
"""A job with its connection and stored request (None where gone), in one round trip."""


def _execute(session: Session, job: Job, connection: Connection | None, stored: Request | None, runtime: Runtime,
             attempt: Attempt, deadline_s: float) -> Answer:
    used = attempt.used
    if connection is None or connection.tenant_id != job.tenant_id:
        raise errors.ReferenceGone()
    if job.action == "auth":
        found = _auth(session, connection, runtime, used)
        attempt.tokens.append("hit" if found["cached"] else "miss")
        return Answer(found)
    if job.action == "adhoc":  # defined in the submission, checked then, never stored
        request: Request | None = Request(tenant_id=job.tenant_id, connection_id=connection.id, name="adhoc",
                                          kind="studio", **job.params["adhoc"])
    else:
        request = stored
    if request is None or request.connection_id != connection.id:
        raise errors.ReferenceGone()
    attempt.method = request.method
    with runtime.client_for(session, connection, used) as client:
        token = runtime.token(session, connection, client, used) if credentials.token_required(connection) else None
        if token is not None:
            attempt.tokens.append("hit" if token.cached else "miss")
        attempt.may_call()
        captured = _call(session, job, connection, request, runtime, client, used, token, deadline_s)
        if captured.status_code == 401 and token is not None and token.cached:
            # The service refused a token another job had cached: drop it, get a fresh one, once.
            runtime.tokens.drop(credentials.slot(connection), token)
            token = runtime.token(session, connection, client, used)
            attempt.tokens.append("refresh")
            attempt.may_call()
            captured = _call(session, job, connection, request, runtime, client, used, token, deadline_s)
    return Answer(upstream.result_document(captured), captured.status_code, captured.headers.get("retry-after"))


def _call(
    session: Session,
    job: Job,
    connection: Connection,
    request: Request,
    runtime: Runtime,
    client: httpx.Client,
    used: list[str],
    token: Cached | None,
    deadline_s: float,
) -> upstream.Captured:
    names = rules.secret_names(request.url, request.headers, request.query, request.body,
                               connection.auth_header_values)
    used.extend(names)
    opened = secrets.open_secrets(session, runtime.vault, tenant_id=job.tenant_id,
                                  connection_id=connection.id, names=names)
    outgoing = render.render(
        method=request.method,
        url=request.url,
        headers=request.headers,
        query=request.query,
        body=request.body,
        media_type=request.media_type,
        base_url=connection.base_url,
        auth_header_values=connection.auth_header_values,
        path_params=job.params.get("path_params", {}),
        variables=job.params.get("variables", {}),
        secrets=opened,
        token=token.token.access_token if token else None,
    )
    if token is not None and not any(name.lower() == "authorization" for name in outgoing.headers):
        outgoing.headers["Authorization"] = f"{token.token.token_type} {token.token.access_token}"
    key = job.params.get("idempotency_key")
    if key and not any(name.lower() == "idempotency-key" for name in outgoing.headers):
        outgoing.headers["Idempotency-Key"] = key  # the service can drop a repeat too
    if outgoing.method not in connection.template["verbs"]:
        raise errors.VerbNotAllowed()
    filled = [name for name, value in request.headers.items() if rules.secret_names(value)]
    return runtime.send_checked(client, outgoing, connection, deadline_s=deadline_s, secret_headers=filled)


def _auth(session: Session, connection: Connection, runtime: Runtime, used: list[str]) -> dict[str, Any]:
    """CONNECTAUTH: the connection's token request as defined; the result never holds the token."""
    if not credentials.token_required(connection):
        raise errors.InvalidOAuth2("the connection does not use OAuth 2.0")
    with runtime.client_for(session, connection, used) as client:
        found = runtime.token(session, connection, client, used)
    expires_at = None
    if found.expires_at is not None:
        expires_at = rfc3339(datetime.fromtimestamp(found.expires_at, tz=timezone.utc))
    return {"token_type": found.token.token_type, "scope": found.token.scope,
            "expires_at": expires_at, "cached": found.cached}
