"""``/v1/executions``: submit a job, poll it, list them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Annotated, Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from api_shim.deps import CurrentTenant, PageDep, SessionDep, by_id_or_name
from api_shim.problems import RESPONSES
from models import errors, idempotency, jobs, metrics, rules
from models.base import utcnow
from models.db import writing
from models.jobs import JobStatus
from models.logs import job_event
from models.schemas import ExecutionCreate
from models.settings import Settings
from models.tables import Connection, Job, Tenant
from models.tables import Request as StoredRequest
from models.tenants import Caller
from models.views import JobPublic, Page, Problem, job_public

log = logging.getLogger("hub.api")

router = APIRouter(prefix="/v1/executions", tags=["executions"], responses=RESPONSES)


@router.post("", status_code=202, response_model=JobPublic, responses={
    200: {"model": JobPublic, "description": "The job an earlier submission with this Idempotency-Key made."},
    429: {"model": Problem, "description": "As many jobs in flight as the tenant's quota (`tenant_quota_exceeded`), "
                                           "with `Retry-After`."},
})
def submit(
    body: ExecutionCreate,
    request: Request,
    response: Response,
    session: SessionDep,
    tenant: CurrentTenant,
    idempotency_key: Annotated[str | None, Header(description="Same key and body within 24 h: the first job.")] = None,
) -> dict[str, Any]:
    """Queue a job: a stored request of a connection, a request defined here (``adhoc``), or
    the connection's token request (``"action": "auth"``)."""
    shapes = [name for name in ("request", "action", "adhoc") if getattr(body, name) is not None]
    if len(shapes) != 1:
        raise errors.InvalidInput(
            "give exactly one of request, action, adhoc",
            errors=[{"loc": ["body"], "msg": "give exactly one of request, action, adhoc"}],
        )
    once = None
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
        once = (idempotency_key, idempotency.body_hash(body.model_dump(mode="json")))
        first = idempotency.first_job(session, tenant_id=tenant.id, key=once[0], hashed=once[1], now=utcnow())
        if first is not None:
            response.status_code = 200
            return job_public(_load(session, tenant.id, first))
    connection = by_id_or_name(session, Connection, body.connection, tenant_id=tenant.id)
    if body.action is not None:
        return _queue(request, response, session, _auth_job(body, connection), body, tenant, once)
    stored = None
    if body.adhoc is not None:  # checked as a studio request of the connection would be
        spec = body.adhoc.model_dump()
        spec["method"] = rules.check_request(kind="studio", verbs=connection.template["verbs"],
                                             base_url=connection.base_url, allowed_hosts=connection.allowed_hosts,
                                             allow_http=request.app.state.settings.allow_http, **spec)
    else:
        assert body.request is not None
        stored = by_id_or_name(session, StoredRequest, body.request, connection_id=connection.id)
        spec = {field: getattr(stored, field) for field in ("url", "headers", "query", "body")}
    placeholders = rules.caller_placeholders(spec["url"], spec["headers"], spec["query"], spec["body"])
    missing = rules.missing_values(placeholders, body.path_params, body.variables)
    if missing:
        fields = {"path": "path_params", "vars": "variables"}
        raise errors.MissingVariable(
            f"no value for {', '.join(missing)}",
            errors=[
                {"loc": ["body", fields[kind], name], "msg": "no value given"}
                for kind, name in (item.split(":", 1) for item in missing)
            ],
        )
    rules.check_target(
        spec["url"],
        base_url=connection.base_url,
        allowed_hosts=connection.allowed_hosts,
        path_params=body.path_params,
        variables=body.variables,
    )
    params: dict[str, Any] = {"path_params": body.path_params, "variables": body.variables,
                              "method": spec["method"] if stored is None else stored.method}
    if stored is None:
        params["adhoc"] = spec
    if once is not None:
        params["idempotency_key"] = once[0]  # forwarded to the service
    job = Job(
        tenant_id=tenant.id,
        connection_id=connection.id,
        request_id=stored.id if stored else None,
        action="request" if stored else "adhoc",
        status=JobStatus.QUEUED.value,
        params=params,
        secrets_used=[],
    )
    return _queue(request, response, session, job, body, tenant, once)


def _auth_job(body: ExecutionCreate, connection: Connection) -> Job:
    """CONNECTAUTH: run the connection's token request as defined."""
    if body.action != "auth":
        raise errors.InvalidInput(
            "the only action is 'auth'", errors=[{"loc": ["body", "action"], "msg": "must be 'auth'"}]
        )
    if connection.template.get("auth_type") != "oauth2":
        raise errors.InvalidOAuth2("the connection does not use OAuth 2.0: it has no token request")
    return Job(tenant_id=connection.tenant_id, connection_id=connection.id, action="auth",
               status=JobStatus.QUEUED.value, params={}, secrets_used=[])


def _queue(request: Request, response: Response, session: Session, job: Job, body: ExecutionCreate,
           tenant: Caller, once: tuple[str, str] | None) -> dict[str, Any]:
    """Store the job (and its idempotency key) within the tenant's in-flight quota, then send
    its id to the workers. A job that cannot be sent yet (the broker is down) stays ``queued``
    and the sweeper sends it when the broker is back. A concurrent submission with the same key
    gets the first job."""
    settings = request.app.state.settings
    job.params.update(max_attempts=body.max_attempts or settings.default_max_attempts)
    if body.timeout_s is not None:
        job.params["timeout_s"] = body.timeout_s
    if body.callback_url is not None:
        job.callback_url = _check_callback_url(body.callback_url, allow_http=settings.allow_http)
    with writing(session):
        stored = _store(session, job, tenant, once, settings)
    if not stored:  # a concurrent submission with the same key stored its job first
        assert once is not None
        first = idempotency.first_job(session, tenant_id=job.tenant_id, key=once[0], hashed=once[1], now=utcnow())
        if first is None:
            raise errors.HubError()
        response.status_code = 200
        return job_public(_load(session, job.tenant_id, first))
    fields: dict[str, Any] = {"tenant": job.tenant_id, "connection": job.connection_id, "action": job.action}
    try:
        request.app.state.enqueue(job.id)
    except errors.BrokerUnavailable:
        # Stored, not lost: no due time marks it as never sent, and the sweeper sends it.
        with writing(session):
            session.execute(sa.update(Job).where(Job.id == job.id).values(due_at=None))  # type: ignore[arg-type]
            session.commit()
        job_event(log, "stored; the broker is unavailable, the sweeper will send it", job.id,
                  level=logging.WARNING, **fields)
    else:
        job_event(log, "submitted", job.id, **fields)
    record = metrics.Batch(request.app.state.redis)
    record.inc("hub_jobs_submitted_total", tenant=job.tenant_id, action=job.action)
    record.flush()
    return job_public(job)


_TENANTS, _JOBS = Tenant.__table__, Job.__table__  # type: ignore[attr-defined]
# Statements built once, on the tables: building them per request, and the ORM's paths for
# them, showed in the benchmark's profile.
_LOCK_TENANT = (
    sa.update(_TENANTS).where(_TENANTS.c.id == sa.bindparam("tenant_id"))
    .values(id=_TENANTS.c.id).returning(_TENANTS.c.max_inflight, _TENANTS.c.rate_per_s)
)
"""A no-op UPDATE: the tenant's row lock (on SQLite, the database's write lock) and its limits."""
_IN_FLIGHT = (
    sa.select(sa.func.count()).select_from(_JOBS)
    .where(_JOBS.c.tenant_id == sa.bindparam("tenant_id"), _JOBS.c.status.in_(jobs.IN_FLIGHT))
)
_INSERT_JOB = sa.insert(_JOBS)
_JOB_COLUMNS = tuple(column.key for column in _JOBS.columns)
_JOB = (
    select(Job).where(Job.id == sa.bindparam("job_id"), Job.tenant_id == sa.bindparam("tenant_id"))
    .execution_options(populate_existing=True)
)


def _store(session: Session, job: Job, tenant: Caller, once: tuple[str, str] | None, settings: Settings) -> bool:
    """Insert the job (and its idempotency key) if the tenant's quota has room, and commit;
    False if another job holds the idempotency key already."""
    # Submissions of one tenant queue at its row's lock, which also reads its limits as they are
    # now: the count against the quota holds.
    limits = session.execute(_LOCK_TENANT, {"tenant_id": tenant.id}).one_or_none()
    if limits is None:  # the tenant is gone
        session.rollback()
        raise errors.Unauthorized()
    quota = limits.max_inflight or settings.default_max_inflight
    in_flight = session.execute(_IN_FLIGHT, {"tenant_id": tenant.id}).scalar_one()
    if in_flight >= quota:
        session.rollback()
        rate = limits.rate_per_s or settings.default_rate_per_s
        wait = min(60, max(1, math.ceil((in_flight - quota + 1) / rate)))
        raise errors.TenantQuotaExceeded(
            f"{in_flight} jobs in flight, the tenant's quota is {quota}; try again in {wait} s", retry_after=wait)
    job.due_at = utcnow()
    # A plain INSERT of the row's values: the ORM's unit of work costs more for one new row
    # than the statement itself (the benchmark's profile); nothing reads the job back.
    session.execute(_INSERT_JOB, {name: getattr(job, name) for name in _JOB_COLUMNS})
    if once is not None:
        idempotency.remember(session, tenant_id=job.tenant_id, key=once[0], hashed=once[1], job_id=job.id)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if once is None:
            raise
        return False
    return True


def _check_callback_url(url: str, *, allow_http: bool) -> str:
    """A callback URL must be absolute, with a host, over https (or http when allowed). Where
    it resolves is checked by the worker's destination guard when it calls."""
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in schemes or not parts.hostname:
        raise errors.InvalidInput(
            f"callback_url must be an absolute {' or '.join(schemes)} URL",
            errors=[{"loc": ["body", "callback_url"], "msg": f"must be an absolute {' or '.join(schemes)} URL"}],
        )
    return url


def _load(session: Session, tenant_id: str, job_id: str) -> Job:
    """The tenant's job ``job_id`` as the database holds it now (read again if the session
    had it already); else 404."""
    job = session.exec(_JOB, params={"job_id": job_id, "tenant_id": tenant_id}).first()
    if job is None:
        raise errors.NotFound(f"no job {job_id!r}")
    return job


def _read(session: Session, tenant_id: str, job_id: str) -> Job:
    """:func:`_load`, then the session gives its connection back to the pool: a request that
    waits for its job must not hold one meanwhile (32 waiting requests emptied the pool)."""
    try:
        return _load(session, tenant_id, job_id)
    finally:
        session.close()


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    request: Request,
    session: SessionDep,
    tenant: CurrentTenant,
    wait: Annotated[float, Query(ge=0, le=30, description="Seconds to hold the answer until the job is final.")] = 0,
) -> dict[str, Any]:
    """One job; with ``?wait=N`` the answer waits up to N seconds for the job to finish."""
    deadline = time.monotonic() + wait
    tenant_id = tenant.id
    if wait <= 0:
        return job_public(await run_in_threadpool(_read, session, tenant_id, job_id))
    waiters = request.app.state.waiters
    # Registered before the first read, so an announcement made between the read and the wait
    # still wakes it; read again at least every RECHECK_S all the same.
    finished = waiters.register(job_id)
    try:
        job = await run_in_threadpool(_read, session, tenant_id, job_id)
        while JobStatus(job.status) not in jobs.FINAL_STATES and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), min(waiters.recheck_s(), max(0.0, deadline - time.monotonic())))
            finished.clear()
            job = await run_in_threadpool(_read, session, tenant_id, job_id)
    finally:
        waiters.unregister(job_id, finished)
    return job_public(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, request: Request, session: SessionDep, tenant: CurrentTenant) -> dict[str, Any]:
    """Cancel a job that has not started; ``409 job_not_cancellable`` once it has."""
    job = _load(session, tenant.id, job_id)
    if not jobs.cancel(session, job.id):
        raise errors.JobNotCancellable(f"the job is {_load(session, tenant.id, job_id).status}")
    job_event(log, "cancelled", job.id, tenant=tenant.id, connection=job.connection_id)
    record = metrics.Batch(request.app.state.redis)
    record.inc("hub_jobs_finished_total", tenant=tenant.id, status="cancelled", code="")
    record.flush()
    return job_public(_load(session, tenant.id, job_id))


@router.get("", response_model=Page[JobPublic])
def list_jobs(
    session: SessionDep,
    tenant: CurrentTenant,
    page: PageDep,
    status: Annotated[JobStatus | None, Query()] = None,
    connection: Annotated[str | None, Query(max_length=200)] = None,
) -> dict[str, Any]:
    """The tenant's jobs, oldest first, optionally of one status or one connection."""
    statement = select(Job).where(Job.tenant_id == tenant.id)
    if status is not None:
        statement = statement.where(Job.status == status.value)
    if connection is not None:
        statement = statement.where(
            Job.connection_id == by_id_or_name(session, Connection, connection, tenant_id=tenant.id).id
        )
    return page.answer(list(session.exec(page.apply(statement, Job))), job_public)
