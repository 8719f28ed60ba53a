"""Running one job: claim it, load what it needs, get its token, render, guard, call, store.

Every path ends with the job in a final state: the service's answer (``succeeded``), or a
``failed`` job whose error code says why. A job that is not ``queued`` is left alone, which
is what makes a redelivered message harmless.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import errors, jobs, rules, secrets
from models.base import rfc3339
from models.jobs import JobStatus
from models.settings import Settings
from models.tables import Connection, Job, Request
from models.vault import Vault
from worker import credentials, guard, oauth, render, tls, upstream
from worker.tokens import Cached, TokenCache

log = logging.getLogger("hub.worker")


@dataclass
class Runtime:
    """What a job runs with, built once per worker process (see ``worker.tasks``)."""

    settings: Settings
    engine: Engine
    client: httpx.Client
    vault: Vault
    tokens: TokenCache
    resolve: guard.Resolver = guard.system_resolver

    @contextmanager
    def client_for(self, session: Session, connection: Connection, used: list[str]) -> Iterator[httpx.Client]:
        """The HTTP client for the connection's calls: the shared one, or, when the connection
        has a client certificate, one of its own for this job (mutual TLS)."""
        if not connection.client_certificate:
            yield self.client
            return
        refs = connection.client_certificate
        names = rules.secret_names(refs)
        used.extend(names)
        opened = secrets.open_secrets(session, self.vault, tenant_id=connection.tenant_id,
                                      connection_id=connection.id, names=names)
        filled = {part: render.Values({}, opened).fill(refs[part]) for part in ("cert", "key")}
        transport = guard.PinnedTransport(tls.context(self.settings, filled))
        with upstream.build_client(self.settings, transport=transport) as client:
            yield client

    def destination(self, url: str, connection: Connection) -> tuple[str, int, list[str]]:
        """Where ``url`` may be reached: its host, port and the checked addresses to connect
        to. Refused unless the scheme is allowed, the host is one of the connection's, and
        every address the host resolves to passes the guard."""
        parts = urlsplit(url)
        allowed_schemes = ("https", "http") if self.settings.allow_http else ("https",)
        if parts.scheme not in allowed_schemes or not parts.hostname:
            raise errors.Blocked("the URL's scheme is not allowed")
        if parts.hostname.lower() not in connection.allowed_hosts:
            raise errors.Blocked("the host is not among the connection's allowed hosts")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = guard.checked_addresses(parts.hostname, port, resolve=self.resolve,
                                            allow_private=self.settings.allow_private_destinations)
        return parts.hostname, port, addresses

    def send_checked(self, client: httpx.Client, outgoing: render.Outgoing, connection: Connection) -> upstream.Captured:
        """Send ``outgoing`` to its checked address, following up to ``MAX_REDIRECTS`` redirects
        by hand, each hop checked again; credentials stay behind when the host changes."""
        for _ in range(MAX_REDIRECTS + 1):
            with guard.pinned(*self.destination(outgoing.url, connection)):
                captured = upstream.send(client, outgoing, cap=self.settings.response_cap_bytes,
                                         deadline_s=self.settings.request_deadline_s)
            location = captured.headers.get("location")
            if captured.status_code not in REDIRECTS or not location:
                return captured
            outgoing = redirected(outgoing, captured.status_code, location)
        raise errors.TooManyRedirects()

    def token(self, session: Session, connection: Connection, client: httpx.Client, used: list[str]) -> Cached:
        """The connection's OAuth token, through the cache's single flight."""

        def send(request: oauth.TokenRequest) -> oauth.Token:
            with guard.pinned(*self.destination(request.url, connection)):
                return oauth.send(client, request, deadline_s=self.settings.request_deadline_s)

        return credentials.obtain(session, connection, cache=self.tokens, send=send, used=used)


REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


def redirected(outgoing: render.Outgoing, status: int, location: str) -> render.Outgoing:
    """The request a redirect asks for: 303 (and 301/302 after a POST) become a GET without a
    body; a new host gets no Authorization or Cookie header."""
    url = urljoin(outgoing.url, location)
    method, content, headers = outgoing.method, outgoing.content, dict(outgoing.headers)
    if status == 303 or (status in (301, 302) and method == "POST"):
        method = "GET" if method != "HEAD" else "HEAD"
        content = None
        headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
    if urlsplit(url).netloc.lower() != urlsplit(outgoing.url).netloc.lower():
        headers = {k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie")}
    return render.Outgoing(method=method, url=url, headers=headers, query={}, content=content)


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
        except (errors.JobError, errors.InvalidInput, errors.Unavailable) as exc:
            jobs.fail(session, job_id, exc, secrets_used=sorted(set(used)))
            log.info("job %s failed: %s", job_id, exc.code)
            return
        except Exception as exc:
            # The type only: an exception's text may quote a URL, a header or a secret.
            log.error("job %s failed unexpectedly: %s", job_id, type(exc).__name__)
            session.rollback()
            jobs.fail(session, job_id, errors.HubError(), secrets_used=sorted(set(used)))
            return
        jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, result=result, secrets_used=sorted(set(used)))
        log.info("job %s succeeded", job_id)


def _execute(session: Session, job: Job, runtime: Runtime, used: list[str]) -> dict[str, Any]:
    connection = session.get(Connection, job.connection_id)
    if connection is None or connection.tenant_id != job.tenant_id:
        raise errors.ReferenceGone()
    if job.action == "auth":
        return _auth(session, connection, runtime, used)
    if job.action == "adhoc":  # defined in the submission, checked then, never stored
        request: Request | None = Request(tenant_id=job.tenant_id, connection_id=connection.id, name="adhoc",
                                          kind="studio", **job.params["adhoc"])
    else:
        request = session.get(Request, job.request_id) if job.request_id else None
    if request is None or request.connection_id != connection.id:
        raise errors.ReferenceGone()
    with runtime.client_for(session, connection, used) as client:
        token = runtime.token(session, connection, client, used) if credentials.token_required(connection) else None
        captured = _call(session, job, connection, request, runtime, client, used, token)
        if captured.status_code == 401 and token is not None and token.cached:
            # The service refused a token another job had cached: drop it, get a fresh one, once.
            runtime.tokens.drop(credentials.slot(connection), token)
            token = runtime.token(session, connection, client, used)
            captured = _call(session, job, connection, request, runtime, client, used, token)
    return upstream.result_document(captured)


def _call(
    session: Session,
    job: Job,
    connection: Connection,
    request: Request,
    runtime: Runtime,
    client: httpx.Client,
    used: list[str],
    token: Cached | None,
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
    return runtime.send_checked(client, outgoing, connection)


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
