"""The sweeper (``worker.sweeper.sweep``): no job is lost, and no finished job is kept forever.

Jobs are submitted through the API; the ``api`` fixture's recording queue is the broker, so
``api.queue.sent`` shows every message sent, and a second recording queue stands for the
callback deliveries (``notify``). Time moves by the ``now`` each sweep is given. What a sweep
did is checked as a client sees it (``GET /v1/executions/{id}``) or in the job's row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session

from models import jobs, metrics
from models.base import as_utc, utcnow
from models.jobs import JobStatus
from models.settings import Settings
from models.tables import IdempotencyKey, Job
from tests.api.helpers import assert_problem, make_connection, make_request, make_template
from tests.conftest import Api, RecordingQueue, test_settings
from worker.sweeper import Failed, Senders, SweepReport, record, sweep

GRACE = timedelta(seconds=60)
SECOND = timedelta(seconds=1)
LEASE_S = 120.0
CALLBACK = "https://hooks.example.com/hub"


@dataclass
class Hub:
    """The API with a connection ``svc``, and a sweeper on the same database."""

    api: Api
    settings: Settings
    notified: RecordingQueue = field(default_factory=RecordingQueue)

    def submit(self, *, key: str | None = None, **body: Any) -> dict[str, Any]:
        """A job submitted through the API (202 or 200 with a key); the job as answered."""
        headers = self.api.headers() | ({"Idempotency-Key": key} if key else {})
        response = self.api.client.post("/v1/executions", json={"connection": "svc", **body}, headers=headers)
        assert response.status_code in (200, 202), response.text
        return response.json()

    def sweep(self, now: datetime) -> SweepReport:
        """One sweep at ``now``: jobs go to ``api.queue``, callbacks to ``notified``."""
        return sweep(self.api.engine, self.settings, Senders(dispatch=self.api.queue, notify=self.notified), now=now)

    def shown(self, job_id: str) -> dict[str, Any]:
        """The job as ``GET /v1/executions/{id}`` shows it."""
        response = self.api.client.get(f"/v1/executions/{job_id}", headers=self.api.headers())
        assert response.status_code == 200, response.text
        return response.json()

    def row(self, job_id: str) -> Job:
        """The job's row."""
        with Session(self.api.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def due(self, job_id: str) -> datetime:
        """When the job's current message was due."""
        due = as_utc(self.row(job_id).due_at)
        assert due is not None
        return due

    def claim(self, job_id: str, now: datetime) -> int | None:
        """What a worker does when it takes the job at ``now``: a lease of ``LEASE_S``."""
        with Session(self.api.engine) as session:
            return jobs.claim(session, job_id, lease_s=LEASE_S, now=now)

    def lose_worker(self, job_id: str) -> datetime:
        """A worker took the job a lease and a second ago and was never heard of again; now."""
        now = utcnow()
        assert self.claim(job_id, now - timedelta(seconds=LEASE_S) - SECOND) == 1
        return now

    def change(self, job_id: str, **values: Any) -> None:
        """Set columns of the job's row (to age it)."""
        with Session(self.api.engine) as session:
            session.execute(sa.update(Job).where(Job.id == job_id).values(**values))  # type: ignore[arg-type]
            session.commit()


@pytest.fixture
def hub(api: Api, database_url: str) -> Hub:
    """Tenant a's ``svc`` with a stored GET ``list`` and a stored POST ``create``; a sweeper
    with a 60 s grace, 2 re-sends at most and a 7-day retention."""
    template = make_template(api, verbs=["GET", "POST", "PUT", "DELETE"])
    connection = make_connection(api, template, name="svc", base_url="https://api.example.com/v1")
    make_request(api, connection, name="list", method="GET", url="/items")
    make_request(api, connection, name="create", method="POST", url="/items", query={}, body={"name": "x"})
    settings = test_settings(database_url, sweep_grace_s=GRACE.total_seconds(), max_dispatches=2, retention_days=7)
    return Hub(api, settings)


# --- waiting jobs whose message is gone ----------------------------------------------------------


def test_within_the_grace_a_waiting_job_is_not_sent_again(hub: Hub) -> None:
    """A message due less than the grace ago may still be in the broker: left alone."""
    # Given: a job submitted and sent once
    job = hub.submit(request="list")
    assert hub.api.queue.sent == [job["id"]]
    # When: the sweeper runs just inside the grace after its message was due
    report = hub.sweep(hub.due(job["id"]) + GRACE - SECOND)
    # Then: nothing was sent again, and the job is as it was
    assert report == SweepReport()
    assert hub.api.queue.sent == [job["id"]]
    assert hub.shown(job["id"]) == job
    assert hub.row(job["id"]).dispatches == 0


def test_a_waiting_job_overdue_past_the_grace_is_sent_again_once(hub: Hub) -> None:
    """A message overdue past the grace is taken as lost, and sent again, once per grace."""
    # Given: a job whose message was due more than the grace ago
    job = hub.submit(request="list")
    now = hub.due(job["id"]) + GRACE + SECOND
    # When: the sweeper runs
    report = hub.sweep(now)
    # Then: the job was sent again, and waits for a worker, still queued
    assert report.redispatched == 1
    assert hub.api.queue.sent == [job["id"], job["id"]]
    assert hub.shown(job["id"])["status"] == "queued"
    assert (hub.row(job["id"]).dispatches, hub.due(job["id"])) == (1, now)
    # And: a sweep right after, or within the grace of the new message, sends nothing more
    assert hub.sweep(now).redispatched == 0
    assert hub.sweep(now + GRACE - SECOND).redispatched == 0
    assert hub.api.queue.sent == [job["id"], job["id"]]


def test_a_job_never_sent_is_sent_by_the_next_sweep_at_once(hub: Hub) -> None:
    """The broker was down at submission: the job waits with no due time, and is sent at once."""
    # Given: a job stored while the broker was down
    hub.api.queue.down = True
    job = hub.submit(request="list")
    hub.api.queue.down = False
    assert hub.api.queue.sent == [] and hub.row(job["id"]).due_at is None
    # When: the sweeper runs right away (no grace for a job never sent)
    now = utcnow()
    report = hub.sweep(now)
    # Then: it was sent, once
    assert report.redispatched == 1
    assert hub.api.queue.sent == [job["id"]]
    assert hub.shown(job["id"])["status"] == "queued"
    # And: a second sweep right after does not send it again
    assert hub.sweep(now + SECOND).redispatched == 0
    assert hub.api.queue.sent == [job["id"]]


def test_a_retrying_job_whose_message_is_lost_is_sent_again(hub: Hub) -> None:
    """Jobs waiting for their next attempt are waiting too."""
    # Given: a job whose first attempt failed and whose retry message was due long ago
    job = hub.submit(request="list")
    now = utcnow()
    attempt = hub.claim(job["id"], now)
    assert attempt == 1
    with Session(hub.api.engine) as session:
        assert jobs.retry_later(session, job["id"], attempt, due_at=now, result=None, secrets_used=[],
                                error={"code": "upstream_status", "message": "the service answered 503"})
    # When: the sweeper runs past the grace
    report = hub.sweep(now + GRACE + SECOND)
    # Then: it was sent again, still retrying, and a worker can run its next attempt
    assert report.redispatched == 1
    assert hub.api.queue.sent == [job["id"], job["id"]]
    assert hub.shown(job["id"])["status"] == "retrying"
    assert hub.claim(job["id"], now + GRACE + 2 * SECOND) == 2


def test_a_job_sent_again_max_dispatches_times_fails_job_lost(hub: Hub) -> None:
    """After ``max_dispatches`` re-sends that no worker took, the job fails ``job_lost``."""
    # Given: a job that no worker ever takes
    job = hub.submit(request="list")
    now = hub.due(job["id"])
    # When: the sweeper finds its message lost again and again
    reports = []
    for _ in range(3):
        now += GRACE + SECOND
        reports.append(hub.sweep(now))
    # Then: it was sent again twice (max_dispatches), then failed job_lost, not sent a third time
    assert [(r.redispatched, r.lost) for r in reports] == [(1, 0), (1, 0), (0, 1)]
    assert hub.api.queue.sent == [job["id"]] * 3
    shown = hub.shown(job["id"])
    assert shown["status"] == "failed" and shown["finished_at"]
    assert shown["error"]["code"] == "job_lost"
    assert shown["callback_state"] is None and hub.notified.sent == []
    # And: a failed job is not sent again
    assert hub.sweep(now + 10 * GRACE).redispatched == 0
    assert hub.api.queue.sent == [job["id"]] * 3


def test_a_lost_job_with_a_callback_url_gets_its_callback(hub: Hub) -> None:
    """Failed by the sweeper, a job's callback is pending and its delivery is queued."""
    # Given: a job with a callback URL that has been sent max_dispatches times
    job = hub.submit(request="list", callback_url=CALLBACK)
    now = utcnow()
    hub.change(job["id"], dispatches=2, due_at=now - GRACE - SECOND)
    # When: the sweeper finds its message lost once more
    report = hub.sweep(now)
    # Then: it failed job_lost, its callback is pending and was queued for delivery
    assert report.lost == 1
    shown = hub.shown(job["id"])
    assert (shown["status"], shown["error"]["code"], shown["callback_state"]) == ("failed", "job_lost", "pending")
    assert hub.notified.sent == [job["id"]]
    # And: the report names it, for the metrics and the job's waiting requests
    assert report.failed == [Failed(job["id"], hub.row(job["id"]).tenant_id, "job_lost")]


# --- running jobs whose worker is gone -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"request": "list"}, None),
        ({"adhoc": {"method": "PUT", "url": "/items/1", "body": {"a": 1}}}, None),
        ({"adhoc": {"method": "DELETE", "url": "/items/1"}}, None),
        ({"request": "create"}, "create-once"),
    ],
    ids=["GET", "PUT", "DELETE", "POST-with-idempotency-key"],
)
def test_a_repeatable_job_past_its_lease_is_retried(hub: Hub, body: dict[str, Any], key: str | None) -> None:
    """Its worker died: a request safe to repeat, with attempts left, is sent again."""
    # Given: a running job whose worker took it and then disappeared
    job = hub.submit(key=key, **body)
    now = hub.lose_worker(job["id"])
    # When: the sweeper runs after the lease ran out
    report = hub.sweep(now)
    # Then: the job is retrying, says why, and was sent again
    assert report.reclaimed == 1
    shown = hub.shown(job["id"])
    assert shown["status"] == "retrying"
    assert shown["error"]["code"] == "worker_lost"
    assert hub.api.queue.sent == [job["id"], job["id"]]
    # And: a sweep right after does not send it a third time; a worker runs its second attempt
    assert hub.sweep(now + SECOND) == SweepReport()
    assert hub.api.queue.sent == [job["id"], job["id"]]
    assert hub.claim(job["id"], now + 2 * SECOND) == 2


def test_a_post_without_idempotency_key_past_its_lease_fails_worker_lost(hub: Hub) -> None:
    """A POST may have reached the service: it is not sent again."""
    # Given: a running POST without an Idempotency-Key, with a callback URL, whose worker died
    job = hub.submit(request="create", callback_url=CALLBACK)
    now = hub.lose_worker(job["id"])
    # When: the sweeper runs after the lease
    report = hub.sweep(now)
    # Then: the job failed worker_lost and was not sent again
    assert (report.abandoned, report.reclaimed) == (1, 0)
    assert report.failed == [Failed(job["id"], hub.row(job["id"]).tenant_id, "worker_lost")]
    shown = hub.shown(job["id"])
    assert (shown["status"], shown["error"]["code"]) == ("failed", "worker_lost")
    assert shown["finished_at"]
    assert hub.api.queue.sent == [job["id"]]
    # And: its callback is pending, and its delivery was queued
    assert shown["callback_state"] == "pending"
    assert hub.notified.sent == [job["id"]]


def test_a_job_past_its_lease_without_attempts_left_fails_retries_exhausted(hub: Hub) -> None:
    """A repeatable job whose lost attempt was its last one fails ``retries_exhausted``."""
    # Given: a GET allowed one attempt, whose worker died during it
    job = hub.submit(request="list", max_attempts=1)
    now = hub.lose_worker(job["id"])
    # When: the sweeper runs after the lease
    report = hub.sweep(now)
    # Then: failed retries_exhausted, not sent again, no callback (it has no URL)
    assert report.abandoned == 1
    assert report.failed == [Failed(job["id"], hub.row(job["id"]).tenant_id, "retries_exhausted")]
    shown = hub.shown(job["id"])
    assert (shown["status"], shown["error"]["code"], shown["callback_state"]) == ("failed", "retries_exhausted", None)
    assert hub.api.queue.sent == [job["id"]]
    assert hub.notified.sent == []


def test_a_running_job_within_its_lease_is_left_alone(hub: Hub) -> None:
    """A worker may still be running it."""
    # Given: a running GET, and a running POST that would fail if taken back
    running = [hub.submit(request="list"), hub.submit(request="create")]
    started = utcnow()
    for job in running:
        hub.claim(job["id"], started)
    before = [hub.shown(job["id"]) for job in running]
    # When: the sweeper runs just before the lease ends (and past the grace of their messages)
    report = hub.sweep(started + timedelta(seconds=LEASE_S) - SECOND)
    # Then: nothing happened to them
    assert report == SweepReport()
    assert [hub.shown(job["id"]) for job in running] == before
    assert all(job["status"] == "running" for job in before)
    assert hub.api.queue.sent == [job["id"] for job in running]


# --- callbacks whose message is gone ----------------------------------------------------------------


def test_a_callback_never_tried_is_queued_again_after_the_grace(hub: Hub) -> None:
    """The job finished but its callback's message was lost (the broker was down)."""
    # Given: a job that a worker finished with its callback pending, never tried
    job = hub.submit(request="list", callback_url=CALLBACK)
    tried = hub.submit(request="list", callback_url=CALLBACK)
    for each in (job, tried):
        hub.claim(each["id"], utcnow())
        with Session(hub.api.engine) as session:
            jobs.finish(session, each["id"], status=JobStatus.SUCCEEDED, result=None, callback=True)
    finished = as_utc(hub.row(job["id"]).finished_at)
    assert finished is not None
    # and one tried once already, whose next try is due two grace periods after the end
    hub.change(tried["id"], callback_attempts=1, callback_due_at=finished + 2 * GRACE)
    # When: the sweeper runs within the grace, then after it, then right after that
    within = hub.sweep(finished + GRACE - SECOND)
    after = hub.sweep(finished + GRACE + SECOND)
    again = hub.sweep(finished + GRACE + 2 * SECOND)
    # Then: within the grace nothing; after it the never-tried callback alone is queued again,
    # and once only in a grace period
    assert (within.callbacks, after.callbacks, again.callbacks) == (0, 1, 0)
    assert hub.notified.sent == [job["id"]]
    assert hub.shown(job["id"])["callback_state"] == "pending"


def test_a_callback_retry_whose_message_was_lost_is_queued_again(hub: Hub) -> None:
    """A failed try's retry message is gone (Redis restarted without persistence): the sweeper
    sends it once its due time is a grace period past, and again each grace period after."""
    # Given: a finished job whose callback was tried once, its next try due in 10 s
    job = hub.submit(request="list", callback_url=CALLBACK)
    hub.claim(job["id"], utcnow())
    with Session(hub.api.engine) as session:
        jobs.finish(session, job["id"], status=JobStatus.SUCCEEDED, result=None, callback=True)
    due = utcnow() + 10 * SECOND
    hub.change(job["id"], callback_attempts=1, callback_due_at=due)
    # When: the sweeper runs before the grace after that time, after it, and twice more
    reports = [hub.sweep(at) for at in (due + GRACE - SECOND, due + GRACE + SECOND, due + GRACE + 2 * SECOND,
                                        due + 2 * GRACE + 2 * SECOND)]
    # Then: it is queued again after the grace, not on every sweep, and again a grace period later
    assert [report.callbacks for report in reports] == [0, 1, 0, 1]
    assert hub.notified.sent == [job["id"], job["id"]]
    assert (hub.shown(job["id"])["callback_state"], hub.row(job["id"]).callback_attempts) == ("pending", 1)


# --- retention --------------------------------------------------------------------------------------


def test_finished_jobs_older_than_the_retention_are_deleted(hub: Hub) -> None:
    """Succeeded, failed and cancelled jobs go after ``retention_days``; nothing else does."""
    # Given: a cancelled, a succeeded and a failed job, finished 8 days ago
    now = utcnow()
    old = [hub.submit(request="list") for _ in range(3)]
    cancelled = hub.api.client.post(f"/v1/executions/{old[0]['id']}/cancel", headers=hub.api.headers())
    assert cancelled.status_code == 200, cancelled.text
    for job, end in zip(old[1:], (JobStatus.SUCCEEDED, JobStatus.FAILED), strict=True):
        hub.claim(job["id"], now)
        with Session(hub.api.engine) as session:
            jobs.finish(session, job["id"], status=end, result=None)
    # and a job cancelled 6 days ago, and a job queued 30 days ago
    recent = hub.submit(request="list")
    hub.api.client.post(f"/v1/executions/{recent['id']}/cancel", headers=hub.api.headers())
    waiting = hub.submit(request="list")
    for job in old:
        hub.change(job["id"], finished_at=now - timedelta(days=8))
    hub.change(recent["id"], finished_at=now - timedelta(days=6))
    hub.change(waiting["id"], created_at=now - timedelta(days=30), due_at=now - timedelta(days=30))
    assert {hub.shown(job["id"])["status"] for job in old} == {"cancelled", "succeeded", "failed"}
    # When: the sweeper runs
    report = hub.sweep(now)
    # Then: the old finished jobs are gone
    assert report.deleted_jobs == 3
    for job in old:
        response = hub.api.client.get(f"/v1/executions/{job['id']}", headers=hub.api.headers())
        assert_problem(response, 404, "not_found")
    # And: the recently finished job and the old waiting one are kept
    assert hub.shown(recent["id"])["status"] == "cancelled"
    assert hub.shown(waiting["id"])["status"] == "queued"


def test_idempotency_keys_older_than_24_hours_are_deleted(hub: Hub) -> None:
    """After 24 hours a key is forgotten, and the same key makes a new job."""
    # Given: a job submitted with an Idempotency-Key
    first = hub.submit(key="order-42", request="list")
    created = utcnow()
    # When: the sweeper runs 23 hours later
    report = hub.sweep(created + timedelta(hours=23))
    # Then: the key is kept: the same submission gives back the first job
    assert report.deleted_keys == 0
    assert hub.submit(key="order-42", request="list")["id"] == first["id"]
    # When: the sweeper runs 24 hours and a minute later
    report = hub.sweep(created + timedelta(hours=24, minutes=1))
    # Then: the key is deleted, and the same key and body make a new job
    assert report.deleted_keys == 1
    with Session(hub.api.engine) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(IdempotencyKey)).scalar_one() == 0
    again = hub.api.client.post("/v1/executions", json={"connection": "svc", "request": "list"},
                                headers=hub.api.headers() | {"Idempotency-Key": "order-42"})
    assert again.status_code == 202, again.text
    assert again.json()["id"] != first["id"]
    # And: the first job is still there
    assert hub.shown(first["id"])["status"] == "queued"


# --- the broker is down ----------------------------------------------------------------------------


def test_while_the_broker_is_down_a_sweep_changes_nothing(hub: Hub) -> None:
    """Nothing is marked sent that was not; the next sweep with the broker back sends it."""
    # Given: a job overdue past the grace, and one never sent
    overdue = hub.submit(request="list")
    hub.api.queue.down = True
    never_sent = hub.submit(request="list")
    now = hub.due(overdue["id"]) + GRACE + SECOND
    rows_before = [hub.row(job["id"]).model_dump() for job in (overdue, never_sent)]
    # When: the sweeper runs while the broker is still down
    report = hub.sweep(now)
    # Then: it reports nothing done, and neither job changed
    assert report == SweepReport()
    assert [hub.row(job["id"]).model_dump() for job in (overdue, never_sent)] == rows_before
    assert hub.api.queue.sent == [overdue["id"]]
    # When: the broker is back and the sweeper runs again
    hub.api.queue.down = False
    report = hub.sweep(now + SECOND)
    # Then: both are sent, once each, and still wait for a worker
    assert report.redispatched == 2
    assert sorted(hub.api.queue.sent) == sorted([overdue["id"], overdue["id"], never_sent["id"]])
    assert {hub.shown(job["id"])["status"] for job in (overdue, never_sent)} == {"queued"}


def test_a_job_taken_back_while_the_broker_is_down_is_sent_by_a_later_sweep(hub: Hub) -> None:
    """Its worker died and its message cannot be sent: it waits, never sent, and is not lost."""
    # Given: a running GET past its lease, and a broker that is down
    job = hub.submit(request="list")
    now = hub.lose_worker(job["id"])
    hub.api.queue.down = True
    # When: the sweeper runs
    report = hub.sweep(now)
    # Then: nothing was counted as sent; the job waits with no message
    assert report.reclaimed == 0
    assert hub.shown(job["id"])["status"] == "retrying"
    assert hub.row(job["id"]).due_at is None
    # When: the broker is back
    hub.api.queue.down = False
    report = hub.sweep(now + SECOND)
    # Then: the next sweep sends it at once
    assert report.redispatched == 1
    assert hub.api.queue.sent == [job["id"], job["id"]]


def test_a_callback_whose_delivery_cannot_be_queued_is_queued_by_a_later_sweep(hub: Hub) -> None:
    """A job failed by the sweeper while the broker is down still gets its callback later."""
    # Given: a POST past its lease with a callback URL, and a broker that is down
    job = hub.submit(request="create", callback_url=CALLBACK)
    now = hub.lose_worker(job["id"])
    hub.notified.down = True
    # When: the sweeper fails it
    hub.sweep(now)
    assert hub.shown(job["id"])["callback_state"] == "pending"
    assert hub.notified.sent == []
    # Then: once the broker is back, a sweep a grace period later queues the callback
    hub.notified.down = False
    finished = as_utc(hub.row(job["id"]).finished_at)
    assert finished is not None
    assert hub.sweep(finished + GRACE + SECOND).callbacks == 1
    assert hub.notified.sent == [job["id"]]



def test_the_sweep_counts_the_jobs_it_failed_as_finished_and_wakes_their_waiters() -> None:
    """Every final job is in ``hub_jobs_finished_total``, whoever ended it."""
    report = SweepReport(lost=1, abandoned=1, redispatched=2, failed=[
        Failed("j1", "t1", "job_lost"), Failed("j2", "t2", "worker_lost")])
    batch = metrics.Batch(None)
    record(report, batch)
    assert batch.finished == ["j1", "j2"]
    assert batch.counts == {
        "hub_sweeper_actions_total|action=redispatched": 2,
        "hub_sweeper_actions_total|action=lost": 1,
        "hub_sweeper_actions_total|action=abandoned": 1,
        "hub_jobs_finished_total|code=job_lost,status=failed,tenant=t1": 1,
        "hub_jobs_finished_total|code=worker_lost,status=failed,tenant=t2": 1,
    }
