"""What a worker process runs its jobs with (:class:`Runtime`, built once per process by
``worker.tasks``), and what one attempt at a job carries (:class:`Attempt`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx
import redis
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import errors, rules, secrets
from models.settings import Settings
from models.tables import Connection, Job, Tenant
from models.vault import Vault
from worker import credentials, guard, oauth, ratelimit, render, tls, upstream
from worker.leases import Lease, LeaseLost, Leases
from worker.tokens import Cached, TokenCache


@dataclass
class Runtime:
    """What a job runs with, built once per worker process (see ``worker.tasks``)."""

    settings: Settings
    engine: Engine
    client: httpx.Client
    vault: Vault
    tokens: TokenCache
    resolve: guard.Resolver = guard.system_resolver
    limiter: ratelimit.Limiter | None = None
    """The tenants' rates and the connections' cooldowns; None: no limits (unit tests)."""
    dispatch: Callable[[str, float], None] = field(default=lambda job_id, delay_s: None)
    """Sends a job id to the workers again, due in ``delay_s`` seconds. If it fails (the broker
    is down), the sweeper sends the job once its ``due_at`` is past."""
    notify: Callable[[Job], None] = field(default=lambda job: None)
    """Queues the delivery of a finished job to its ``callback_url``."""
    metrics: redis.Redis | None = None
    """Where the hub's metrics are added up (:mod:`models.metrics`); None: not recorded."""
    leases: Leases | None = None
    """Keeps the running attempts' leases alive (:mod:`worker.leases`); None: not renewed."""
    _rates: dict[str, tuple[float, ratelimit.Rate]] = field(default_factory=dict)

    def rate(self, session: Session, tenant_id: str) -> ratelimit.Rate:
        """The tenant's outbound rate: its own values, else the defaults; read at most every
        ``RATE_TTL_S`` seconds per process, so a change with the CLI applies within that."""
        cached = self._rates.get(tenant_id)
        if cached is not None and time.monotonic() - cached[0] < RATE_TTL_S:
            return cached[1]
        tenant = session.get(Tenant, tenant_id)
        rate = ratelimit.Rate(
            per_s=(tenant.rate_per_s if tenant and tenant.rate_per_s else self.settings.default_rate_per_s),
            burst=(tenant.burst if tenant and tenant.burst is not None else self.settings.default_burst),
        )
        self._rates[tenant_id] = (time.monotonic(), rate)
        return rate

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

    def destination(self, url: str, connection: Connection | None) -> tuple[str, int, list[str]]:
        """Where ``url`` may be reached: its host, port and the checked addresses to connect
        to. Refused unless the scheme is allowed, the host is one of the connection's (None:
        a callback, which has no connection), and every address the host resolves to passes
        the guard."""
        parts = urlsplit(url)
        allowed_schemes = ("https", "http") if self.settings.allow_http else ("https",)
        if parts.scheme not in allowed_schemes or not parts.hostname:
            raise errors.Blocked("the URL's scheme is not allowed")
        if connection is not None and parts.hostname.lower() not in connection.allowed_hosts:
            raise errors.Blocked("the host is not among the connection's allowed hosts")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise errors.Blocked("the URL's port is not valid") from None
        addresses = guard.checked_addresses(parts.hostname, port, resolve=self.resolve,
                                            allow_private=self.settings.allow_private_destinations)
        return parts.hostname, port, addresses

    def send_checked(self, client: httpx.Client, outgoing: render.Outgoing, connection: Connection, *,
                     deadline_s: float | None = None, secret_headers: Iterable[str] = ()) -> upstream.Captured:
        """Send ``outgoing`` to its checked address, following up to ``MAX_REDIRECTS`` redirects
        by hand, each hop checked again. Credentials stay behind when the origin changes: the
        standard ones, the connection's auth headers, and ``secret_headers`` (filled from secrets)."""
        private = CREDENTIALS | {name.lower() for name in connection.auth_header_values} | \
            {name.lower() for name in secret_headers}
        for _ in range(MAX_REDIRECTS + 1):
            with guard.pinned(*self.destination(outgoing.url, connection)):
                captured = upstream.send(client, outgoing, cap=self.settings.response_cap_bytes,
                                         deadline_s=deadline_s or self.settings.request_deadline_s)
            location = captured.headers.get("location")
            if captured.status_code not in REDIRECTS or not location:
                return captured
            outgoing = redirected(outgoing, captured.status_code, location, private)
        raise errors.TooManyRedirects()

    def token(self, session: Session, connection: Connection, client: httpx.Client, used: list[str]) -> Cached:
        """The connection's OAuth token, through the cache's single flight."""

        def send(request: oauth.TokenRequest) -> oauth.Token:
            with guard.pinned(*self.destination(request.url, connection)):
                return oauth.send(client, request, deadline_s=self.settings.request_deadline_s)

        return credentials.obtain(session, connection, cache=self.tokens, send=send, used=used)


RATE_TTL_S = 10.0

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5


CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})


def redirected(outgoing: render.Outgoing, status: int, location: str,
               private: Collection[str] = CREDENTIALS) -> render.Outgoing:
    """The request a redirect asks for: 303 (and 301/302 after a POST) become a GET without a
    body; another origin (scheme, host or port) gets none of the ``private`` headers."""
    url = urljoin(outgoing.url, location)
    method, content, headers = outgoing.method, outgoing.content, dict(outgoing.headers)
    if status == 303 or (status in (301, 302) and method == "POST"):
        method = "GET" if method != "HEAD" else "HEAD"
        content = None
        headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
    if _origin(url) != _origin(outgoing.url):
        headers = {k: v for k, v in headers.items() if k.lower() not in private}
    return render.Outgoing(method=method, url=url, headers=headers, query={}, content=content)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a port: refused when the hop is checked
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"https": 443, "http": 80}.get(scheme)


@dataclass
class Attempt:
    """One attempt at a job: its number, the secrets it read, and the method it sent."""

    number: int
    started: float = 0.0
    """When the attempt was claimed (``time.monotonic``)."""
    used: list[str] = field(default_factory=list)
    method: str | None = None
    tokens: list[str] = field(default_factory=list)
    """How each OAuth token the attempt needed was had: ``hit``, ``miss`` or ``refresh``."""
    lease: Lease | None = None
    """Its lease, kept alive by the process's :class:`~worker.leases.Leases`; None: not kept."""

    def secrets_used(self) -> list[str]:
        return sorted(set(self.used))

    def may_call(self) -> None:
        """Refuse to call out once the attempt no longer holds the job."""
        if self.lease is not None and self.lease.lost:
            raise LeaseLost()

    def record(self, session: Session, write: Callable[[], bool]) -> bool:
        """Record the attempt's outcome with ``write``: through a database restart, while the
        lease lasts (:meth:`~worker.leases.Lease.durably`)."""
        return self.lease.durably(session, write) if self.lease is not None else write()
