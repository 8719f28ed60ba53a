"""Leases kept alive while their attempts run.

A claim leases the job for ``HUB_JOB_LEASE_S`` plus the request deadline; past its lease the
sweeper takes the job back as lost. An attempt can outlast that and still be alive: a token
endpoint that is slow, tried several times, or waited for behind another worker's fetch; a
401 answered by a second token and a second call; a chain of redirects. So while a worker runs
an attempt, one thread of its process renews the attempt's lease every third of
``HUB_JOB_LEASE_S``: the sweeper takes a job back when its worker is gone, not when it is slow.

The lease also bounds how long a worker keeps trying to record an outcome the database cannot
take (a restart, a failover): until the lease runs out, the job is still the attempt's, and
recording it then spares the service a second call (:meth:`Lease.durably`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import jobs
from models.db import UNAVAILABLE
from models.logs import job_event

log = logging.getLogger("hub.worker")

T = TypeVar("T")

MARGIN_S = 1.0
"""What :meth:`Lease.durably` leaves of the lease: a write that starts later may land after it."""


class LeaseLost(Exception):
    """The attempt no longer holds its job: the sweeper took it back, or it ended."""


@dataclass
class Lease:
    """The lease of one running attempt, as this process last renewed it."""

    job_id: str
    attempt: int
    lease_s: float
    renewed: float
    """When the lease was last renewed (``time.monotonic``)."""
    lost: bool = False
    """The attempt no longer holds the job: it must not call out again."""

    def remaining(self, now: float | None = None) -> float:
        """Seconds until the lease runs out, as far as this process knows."""
        return self.renewed + self.lease_s - (time.monotonic() if now is None else now)

    def durably(self, session: Session, write: Callable[[], T], *, pause_s: float = 0.2) -> T:
        """``write()``, tried again while the database is unavailable and the lease lasts; the
        last error once it would not. The session is rolled back between tries."""
        while True:
            try:
                return write()
            except UNAVAILABLE as exc:
                session.rollback()
                if self.lost or self.remaining() - pause_s < MARGIN_S:
                    raise
                job_event(log, "outcome not recorded yet: the database is unavailable; trying again while the lease "
                          "lasts", self.job_id, level=logging.WARNING, code=type(exc).__name__)
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 2.0)


class Leases:
    """The leases of the attempts running in this process, renewed by one thread of its own."""

    def __init__(self, engine: Engine, *, every_s: float) -> None:
        self.engine = engine
        self.every_s = every_s
        self._held: dict[tuple[str, int], Lease] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    @contextmanager
    def held(self, job_id: str, attempt: int, lease_s: float) -> Iterator[Lease]:
        """Keep the attempt's lease (``lease_s`` long, just taken by its claim) alive while the
        block runs."""
        lease = Lease(job_id, attempt, lease_s, renewed=time.monotonic())
        with self._lock:
            self._held[(job_id, attempt)] = lease
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()  # a forked child has no thread of its parent's
                self._thread = threading.Thread(target=self._run, name="hub-leases", daemon=True)
                self._thread.start()
        try:
            yield lease
        finally:
            with self._lock:
                self._held.pop((job_id, attempt), None)

    def renew_due(self) -> int:
        """Renew every lease last renewed ``every_s`` ago or more; how many were renewed."""
        now = time.monotonic()
        with self._lock:
            due = [lease for lease in self._held.values() if not lease.lost and now - lease.renewed >= self.every_s]
        renewed = 0
        for lease in due:
            started = time.monotonic()
            try:
                with Session(self.engine) as session:
                    holds = jobs.renew(session, lease.job_id, lease.attempt, lease_s=lease.lease_s)
            except UNAVAILABLE as exc:  # tried again on the next round, while the lease lasts
                job_event(log, "lease not renewed: the database is unavailable", lease.job_id,
                          level=logging.WARNING, code=type(exc).__name__)
                continue
            if holds:
                lease.renewed, renewed = started, renewed + 1
                continue
            lease.lost = True
            with self._lock:
                running = (lease.job_id, lease.attempt) in self._held
            if running:  # else the attempt just ended, which is why its job is no longer running
                job_event(log, "lease lost: the job was taken back", lease.job_id, level=logging.WARNING,
                          attempt=lease.attempt)
        return renewed

    def _run(self) -> None:
        while True:
            time.sleep(min(self.every_s / 4, 1.0))
            try:
                self.renew_due()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one round
                log.warning("leases: a round of renewals failed (%s)", type(exc).__name__)
