"""Running one job: claim it, load what it needs, render, guard, call, store the outcome.

Every path ends with the job in a final state: the service's answer (``succeeded``), or a
``failed`` job whose error code says why. A job that is not ``queued`` is left alone, which
is what makes a redelivered message harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import errors, jobs, rules, secrets
from models.jobs import JobStatus
from models.settings import Settings
from models.tables import Connection, Job, Request
from models.vault import Vault
from worker import guard, render, upstream

log = logging.getLogger("hub.worker")


@dataclass
class Runtime:
    """What a job runs with, built once per worker process (see ``worker.tasks``)."""

    settings: Settings
    engine: Engine
    client: httpx.Client
    vault: Vault
    resolve: guard.Resolver = guard.system_resolver


def run_job(job_id: str, runtime: Runtime) -> None:
    """Execute the job ``job_id`` if it is still queued, and record its outcome."""
    with Session(runtime.engine, expire_on_commit=False) as session:
        if not jobs.claim(session, job_id):
            log.info("job %s not queued; delivery ignored", job_id)
            return
        job = session.get(Job, job_id)
        assert job is not None  # claimed just now
        log.info("job %s running (tenant %s, connection %s)", job.id, job.tenant_id, job.connection_id)
        used: list[str] = []
        try:
            result = _execute(session, job, runtime, used)
        except (errors.JobError, errors.InvalidInput) as exc:
            jobs.fail(session, job_id, exc, secrets_used=used)
            log.info("job %s failed: %s", job_id, exc.code)
            return
        except Exception as exc:
            # The type only: an exception's text may quote a URL, a header or a secret.
            log.error("job %s failed unexpectedly: %s", job_id, type(exc).__name__)
            session.rollback()
            jobs.fail(session, job_id, errors.HubError(), secrets_used=used)
            return
        jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, result=result, secrets_used=used)
        log.info("job %s succeeded: HTTP %s", job_id, result["status_code"])


def _execute(session: Session, job: Job, runtime: Runtime, used: list[str]) -> dict[str, Any]:
    connection = session.get(Connection, job.connection_id)
    request = session.get(Request, job.request_id) if job.request_id else None
    if (
        connection is None
        or request is None
        or connection.tenant_id != job.tenant_id
        or request.connection_id != connection.id
    ):
        raise errors.ReferenceGone()
    if connection.template.get("auth_type") == "oauth2":
        raise errors.NotImplementedYet("OAuth 2.0 authentication is not supported yet.")
    settings = runtime.settings
    names = rules.secret_names(request.url, request.headers, request.query, request.body,
                               connection.auth_header_values)
    used.extend(sorted(names))
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
    )
    if outgoing.method not in connection.template["verbs"]:
        raise errors.VerbNotAllowed()
    parts = urlsplit(outgoing.url)
    allowed_schemes = ("https", "http") if settings.allow_http else ("https",)
    if parts.scheme not in allowed_schemes or not parts.hostname:
        raise errors.Blocked("the URL's scheme is not allowed")
    if parts.hostname.lower() not in connection.allowed_hosts:
        raise errors.Blocked("the host is not among the connection's allowed hosts")
    guard.check_destination(
        parts.hostname,
        parts.port or (443 if parts.scheme == "https" else 80),
        allow_private=settings.allow_private_destinations,
        resolve=runtime.resolve,
    )
    captured = upstream.send(runtime.client, outgoing, cap=settings.response_cap_bytes)
    return upstream.result_document(captured)
