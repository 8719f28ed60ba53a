"""Leases kept alive while their attempts run (``worker/leases.py``): the renewing thread, a
lease lost to the sweeper, and an outcome recorded through a database that comes back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from models import jobs
from models.base import as_utc, utcnow
from models.tables import Job
from tests.unit.test_executor import PARAMS, World, world  # noqa: F401 (the fixture)
from worker.executor import Attempt, run_job
from worker.leases import MARGIN_S, Lease, LeaseLost, Leases


def _claimed(at: World, lease_s: float) -> str:
    """A job that attempt 1 has just claimed, for ``lease_s``."""
    job_id = at.job(params=PARAMS)
    with Session(at.engine) as session:
        assert jobs.claim(session, job_id, lease_s=lease_s) == 1
    return job_id


def _lease_until(at: World, job_id: str) -> float:
    until = as_utc(at.load(job_id).lease_until)
    assert until is not None
    return until.timestamp()


def _down(times: int, then: Callable[[], bool] = lambda: True) -> Callable[[], bool]:
    """A write that finds the database unavailable ``times`` times, then does ``then``."""
    calls = {"n": 0}

    def write() -> bool:
        calls["n"] += 1
        if calls["n"] <= times:
            raise OperationalError("UPDATE job", {}, Exception("server closed the connection unexpectedly"))
        return then()

    return write


def test_a_running_attempt_keeps_its_lease_and_a_finished_one_lets_it_run_out(world: World) -> None:  # noqa: F811
    # Given a job claimed with a lease of 1 s, and leases renewed every 0.2 s
    job_id = _claimed(world, lease_s=1.0)
    claimed_until = _lease_until(world, job_id)
    leases = Leases(world.engine, every_s=0.2)
    # When its attempt runs for 2.5 s, more than twice its lease
    with leases.held(job_id, 1, lease_s=1.0) as lease:
        ends = time.monotonic() + 2.5
        while time.monotonic() < ends:
            # Then the sweeper never sees it past its lease
            assert not jobs.claimable(world.load(job_id), utcnow())
            time.sleep(0.1)
        assert _lease_until(world, job_id) > claimed_until + 1.5
        assert not lease.lost
    # When the attempt is over, its lease is renewed no more and runs out
    time.sleep(1.6)
    assert jobs.claimable(world.load(job_id), utcnow())


def test_a_lease_the_sweeper_took_back_is_lost_and_its_attempt_does_not_call_out(world: World) -> None:  # noqa: F811
    # Given a running attempt whose job the sweeper took back, and a second attempt claimed
    job_id = _claimed(world, lease_s=60.0)
    leases = Leases(world.engine, every_s=0.0)
    with leases.held(job_id, 1, lease_s=60.0) as lease:
        with Session(world.engine) as session:
            session.get(Job, job_id).attempts = 2  # type: ignore[union-attr]
            session.commit()
        # When its lease is next renewed
        assert leases.renew_due() == 0
        # Then it is lost, and the attempt may not call out any more
        assert lease.lost
        with pytest.raises(LeaseLost):
            Attempt(1, lease=lease).may_call()
    assert (world.load(job_id).attempts, world.load(job_id).status) == (2, "running")


def test_an_outcome_is_recorded_through_a_database_that_comes_back() -> None:
    # Given a lease with 10 s left, and a database that fails two writes then takes the third
    lease = Lease("j", 1, lease_s=10.0, renewed=time.monotonic())
    write = _down(2)
    # When the outcome is recorded
    # Then it is, on the third try
    assert lease.durably(_Rollbacks(), write, pause_s=0.01) is True


def test_an_outcome_the_database_never_takes_is_given_up_before_the_lease_runs_out() -> None:
    # Given a lease with 1.5 s left and a database that stays down
    lease = Lease("j", 1, lease_s=1.5, renewed=time.monotonic())
    started = time.monotonic()
    # When the outcome is recorded, then the database's error is raised once the lease would not last
    with pytest.raises(OperationalError):
        lease.durably(_Rollbacks(), _down(10_000), pause_s=0.05)
    assert time.monotonic() - started <= 1.5 - MARGIN_S + 0.5


class _Rollbacks:
    """A session that only counts rollbacks."""

    def __init__(self) -> None:
        self.rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1


def test_a_job_whose_outcome_meets_a_database_restart_is_called_once_and_recorded(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # Given a worker that keeps leases, and a database down for the first two writes of an outcome
    finish, tries = jobs.finish, []

    def finish_after_a_restart(*args: Any, **kwargs: Any) -> bool:
        tries.append(1)
        return _down(2 - len(tries) + 1, lambda: finish(*args, **kwargs))()

    monkeypatch.setattr(jobs, "finish", finish_after_a_restart)
    job_id = world.job(params=PARAMS)
    runtime = world.runtime()
    runtime.leases = Leases(world.engine, every_s=60.0)
    # When the job runs
    with runtime.client:
        run_job(job_id, runtime)
    # Then the service was called once, and the outcome recorded on the third try
    job = world.load(job_id)
    assert (job.status, job.attempts, len(tries)) == ("succeeded", 1, 3), job.error
    assert len(world.upstream.requests) == 1


def test_an_attempt_that_lost_its_lease_does_not_call_the_service(
        world: World, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    # Given a worker whose attempt's lease is lost before its call (say the database was
    # unreachable for longer than the lease, and the sweeper took the job back)
    @contextmanager
    def lost(self: Leases, job_id: str, attempt: int, lease_s: float) -> Iterator[Lease]:
        yield Lease(job_id, attempt, lease_s, renewed=time.monotonic(), lost=True)

    monkeypatch.setattr(Leases, "held", lost)
    job_id = world.job(params=PARAMS)
    runtime = world.runtime()
    runtime.leases = Leases(world.engine, every_s=60.0)
    # When the job runs
    with runtime.client, caplog.at_level(logging.INFO, logger="hub.worker"):
        run_job(job_id, runtime)
    # Then the service got no call, and the job is left to whoever holds it now
    assert world.upstream.requests == []
    assert world.load(job_id).status == "running"
    assert "stopped before its call: its lease was lost" in caplog.text
