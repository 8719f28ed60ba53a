"""The retry policy, the tenant's rate and the attempt fencing, as a user sees them: jobs are
submitted through the API, run in-process by ``run_job``, and read back with
``GET /v1/executions/{id}`` (or the row), on SQLite and PostgreSQL.

The web service is an ``httpx.MockTransport`` behind a fake resolver that answers a public
documentation address; the one real socket is a closed port on 127.0.0.1 (connection refused).
Dispatches (the job sent again for later) are recorded, not sent; the limiter runs on fakeredis.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import fakeredis
import httpx
import pytest
from sqlmodel import Session

from models import jobs
from models.base import as_utc, utcnow
from models.errors import HubError
from models.jobs import JobStatus
from models.settings import Settings
from models.tables import Job
from tests.api.helpers import make_connection, make_request, make_template
from tests.conftest import Api, in_process_runtime, test_settings
from worker.executor import Runtime, run_job
from worker.ratelimit import Limiter, Outcome, Rate

PUBLIC_ADDRESS = "93.184.215.14"
SERVICE = "https://api.example.com/v1"

Responder = Callable[[httpx.Request], httpx.Response]


def answer(status: int, **headers: str) -> Responder:
    return lambda request: httpx.Response(status, headers=headers, text=f"answer {status}")


@dataclass
class Service:
    """The fake web service and DNS: answers with ``respond``, records every request."""

    respond: Responder = field(default_factory=lambda: answer(200))
    requests: list[httpx.Request] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.respond(request)

    def resolve(self, host: str, port: int) -> list[str]:
        return ["127.0.0.1"] if host == "127.0.0.1" else [PUBLIC_ADDRESS]


@dataclass
class Hub:
    """Tenant ``a`` of the API with a connection ``svc`` (GET, POST, PATCH) and two stored
    requests, ``read`` (GET /items) and ``create`` (POST /items); workers that run its jobs."""

    api: Api
    database_url: str
    service: Service = field(default_factory=Service)
    dispatched: list[tuple[str, float]] = field(default_factory=list)
    notified: list[str] = field(default_factory=list)
    limiter: Limiter | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """Settings every worker of the test runs with."""

    def config(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {"allow_private_destinations": False, "allow_http": False, **self.settings}
        values.update(overrides)
        return test_settings(self.database_url, **values)

    def runtime(self, *, real_sockets: bool = False, **overrides: Any) -> Runtime:
        config = self.config(**overrides)
        transport = None if real_sockets else httpx.MockTransport(self.service.handler)
        runtime = in_process_runtime(config, self.api.engine, transport, self.service.resolve)
        return dataclasses.replace(runtime, limiter=self.limiter,
                                   dispatch=lambda job_id, delay_s: self.dispatched.append((job_id, delay_s)),
                                   notify=lambda job: self.notified.append(job.id))

    def submit(self, request: str = "read", *, connection: str = "svc", key: str | None = None,
               **body: Any) -> str:
        headers = {**self.api.headers(), **({"Idempotency-Key": key} if key else {})}
        response = self.api.client.post("/v1/executions", json={"connection": connection, "request": request, **body},
                                        headers=headers)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    def run(self, job_id: str, **overrides: Any) -> dict[str, Any]:
        """Run the job in a fresh worker; the job document the API shows after."""
        runtime = self.runtime(**overrides)
        with runtime.client:
            run_job(job_id, runtime)
        return self.document(job_id)

    def document(self, job_id: str) -> dict[str, Any]:
        response = self.api.client.get(f"/v1/executions/{job_id}", headers=self.api.headers())
        assert response.status_code == 200, response.text
        document: dict[str, Any] = response.json()
        return document

    def row(self, job_id: str) -> Job:
        with Session(self.api.engine) as session:
            job = session.get(Job, job_id)
            assert job is not None
            return job

    def delays(self, job_id: str) -> list[float]:
        """The delays the job was dispatched again with, in order."""
        return [delay for sent, delay in self.dispatched if sent == job_id]


@pytest.fixture
def hub(api: Api, database_url: str) -> Hub:
    template = make_template(api, verbs=["GET", "POST", "PATCH"])
    connection = make_connection(api, template, name="svc", base_url=SERVICE)
    make_request(api, connection, name="read", method="GET", url="/items", query={})
    make_request(api, connection, name="create", method="POST", url="/items", query={}, body={"n": 1})
    return Hub(api, database_url)


def fake_limiter() -> Limiter:
    return Limiter(fakeredis.FakeRedis(), horizon_s=30.0)


# --- what is retried ------------------------------------------------------------------------


def test_503_on_a_get_is_retried_after_a_backoff(hub: Hub) -> None:
    # Given a GET job, a service answering 503, and a backoff of at most 2 s for the first retry
    hub.settings.update(retry_base_s=2.0, retry_cap_s=30.0)
    hub.service.respond = answer(503)
    job_id = hub.submit("read")
    # When a worker runs it
    before = utcnow()
    document = hub.run(job_id)
    # Then it waits for its next attempt, showing why and what the service said
    assert document["status"] == "retrying"
    assert document["attempts"] == 1
    assert document["error"]["code"] == "upstream_status"
    assert document["error"]["status_code"] == 503
    assert document["result"]["status_code"] == 503
    assert document["finished_at"] is None
    # And it was sent again once, after a backoff within the first ceiling
    delays = hub.delays(job_id)
    assert len(delays) == 1
    assert 0 <= delays[0] <= 2.0
    # And the row says when the next attempt is due
    due = as_utc(hub.row(job_id).due_at)
    assert due is not None and before <= due <= utcnow() + timedelta(seconds=2)
    assert len(hub.service.requests) == 1


def test_retries_end_after_max_attempts_with_the_last_error(hub: Hub) -> None:
    # Given a job with 3 attempts, and a service that keeps answering 503
    hub.settings.update(retry_base_s=1.0, retry_cap_s=30.0)
    hub.service.respond = answer(503)
    job_id = hub.submit("read", max_attempts=3)
    # When a worker runs each attempt it is sent again for
    first = hub.run(job_id)
    second = hub.run(job_id)
    assert (first["status"], first["attempts"]) == ("retrying", 1)
    assert (second["status"], second["attempts"]) == ("retrying", 2)
    final = hub.run(job_id)
    # Then after the third it failed, retries_exhausted, naming the last attempt's error
    assert final["status"] == "failed"
    assert final["attempts"] == 3
    assert final["error"]["code"] == "retries_exhausted"
    assert final["error"]["last"]["code"] == "upstream_status"
    assert final["error"]["last"]["status_code"] == 503
    assert final["finished_at"] is not None
    # And the service's last answer is kept
    assert final["result"]["status_code"] == 503
    assert final["result"]["body"] == "answer 503"
    # And the job was sent again twice, the second backoff within its (doubled) ceiling, not a third time
    delays = hub.delays(job_id)
    assert len(delays) == 2
    assert 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0
    assert len(hub.service.requests) == 3
    # And its end was announced once (for the callback)
    assert hub.notified == [job_id]
    # And a late delivery changes nothing
    assert hub.run(job_id) == final
    assert len(hub.service.requests) == 3


def test_a_retried_job_that_then_succeeds_shows_the_success(hub: Hub) -> None:
    # Given a service that answers 503, then 200
    answers = [answer(503), answer(200)]
    hub.service.respond = lambda request: answers.pop(0)(request)
    job_id = hub.submit("read")
    # When both attempts run
    hub.run(job_id)
    document = hub.run(job_id)
    # Then the job succeeded on its second attempt, with no error left over
    assert document["status"] == "succeeded"
    assert document["attempts"] == 2
    assert document["error"] is None
    assert document["result"]["status_code"] == 200


@pytest.mark.parametrize("status", [502, 504, 429])
def test_other_retried_statuses(hub: Hub, status: int) -> None:
    # Given a service answering a status the policy retries (429 without Retry-After)
    hub.service.respond = answer(status)
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then it is retrying with that status, and was sent again
    assert document["status"] == "retrying"
    assert document["error"] == {"code": "upstream_status", "message": document["error"]["message"],
                                 "status_code": status, "last": None}
    assert len(hub.delays(job_id)) == 1


@pytest.mark.parametrize("status", [404, 500, 200])
def test_other_statuses_are_the_services_answer(hub: Hub, status: int) -> None:
    # Given a service answering a status the policy does not retry
    hub.service.respond = answer(status)
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then it succeeded once, the status in its result, and was not sent again
    assert document["status"] == "succeeded"
    assert document["attempts"] == 1
    assert document["error"] is None
    assert document["result"]["status_code"] == status
    assert hub.delays(job_id) == []


def test_a_post_without_idempotency_key_is_not_retried(hub: Hub) -> None:
    # Given a POST job submitted without an Idempotency-Key, and a service answering 503
    hub.service.respond = answer(503)
    job_id = hub.submit("create")
    # When it runs
    document = hub.run(job_id)
    # Then it is not sent twice: the 503 is the service's answer
    assert document["status"] == "succeeded"
    assert document["attempts"] == 1
    assert document["result"]["status_code"] == 503
    assert document["error"] is None
    assert hub.delays(job_id) == []
    assert len(hub.service.requests) == 1
    assert "idempotency-key" not in hub.service.requests[0].headers


def test_a_post_with_idempotency_key_is_retried_and_forwards_the_key(hub: Hub) -> None:
    # Given a POST job submitted with an Idempotency-Key, and a service answering 503, then 201
    answers = [answer(503), answer(201)]
    hub.service.respond = lambda request: answers.pop(0)(request)
    job_id = hub.submit("create", key="order-7")
    # When it runs
    first = hub.run(job_id)
    # Then it is retrying
    assert first["status"] == "retrying"
    assert len(hub.delays(job_id)) == 1
    # And its second attempt succeeds
    second = hub.run(job_id)
    assert second["status"] == "succeeded"
    assert second["attempts"] == 2
    # And both calls carried the key, so the service can drop the repeat
    assert [request.method for request in hub.service.requests] == ["POST", "POST"]
    assert [request.headers.get("idempotency-key") for request in hub.service.requests] == ["order-7", "order-7"]


# --- Retry-After and cooldowns --------------------------------------------------------------


def test_429_with_retry_after_waits_as_asked_and_cools_the_connection(hub: Hub) -> None:
    # Given a limiter, and a service answering 429 with Retry-After: 7
    hub.limiter = fake_limiter()
    hub.service.respond = answer(429, **{"Retry-After": "7"})
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then it is retrying, sent again for 7 s from now
    assert document["status"] == "retrying"
    assert document["error"]["status_code"] == 429
    assert hub.delays(job_id) == [7.0]
    # And the connection cools down for those 7 s: the limiter holds its jobs
    row = hub.row(job_id)
    held = hub.limiter.acquire(row.tenant_id, row.connection_id, Rate(per_s=100, burst=100))
    assert held.outcome is Outcome.COOLING_DOWN
    assert 0 < held.delay_s <= 7.0
    # And another job of the connection, run now, is held without calling the service
    other = hub.submit("read")
    waiting = hub.run(other)
    assert waiting["status"] == "queued"
    assert waiting["attempts"] == 0
    assert len(hub.service.requests) == 1
    assert len(hub.delays(other)) == 1 and 0 < hub.delays(other)[0] <= 7.0


def test_retry_after_is_honoured_only_up_to_its_cap(hub: Hub) -> None:
    # Given a service asking for 10000 s, and a cap of 120 s
    hub.limiter = fake_limiter()
    hub.settings.update(retry_after_cap_s=120.0)
    hub.service.respond = answer(503, **{"Retry-After": "10000"})
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then it comes back after the cap, not after 10000 s
    assert document["status"] == "retrying"
    assert hub.delays(job_id) == [120.0]


def test_retry_after_on_503_does_not_cool_the_connection(hub: Hub) -> None:
    # Given a service answering 503 with Retry-After (only a 429 says "slow down")
    hub.limiter = fake_limiter()
    hub.service.respond = answer(503, **{"Retry-After": "30"})
    job_id = hub.submit("read")
    # When the job runs
    hub.run(job_id)
    # Then the job waits as asked, but the connection's other jobs are not held
    assert hub.delays(job_id) == [30.0]
    row = hub.row(job_id)
    assert hub.limiter.acquire(row.tenant_id, row.connection_id, Rate(per_s=100, burst=100)).outcome is Outcome.GO


def test_unreadable_retry_after_falls_back_to_the_backoff(hub: Hub) -> None:
    # Given a 429 whose Retry-After is a Latin-1 "²" (a digit to str.isdigit, not to int)
    hub.limiter = fake_limiter()
    hub.settings.update(retry_base_s=1.0)
    hub.service.respond = lambda request: httpx.Response(429, headers=[(b"Retry-After", b"\xb2")])
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then the header is ignored: the job retries after the backoff, nothing cools down
    assert document["status"] == "retrying"
    delays = hub.delays(job_id)
    assert len(delays) == 1 and 0 <= delays[0] <= 1.0
    row = hub.row(job_id)
    assert hub.limiter.acquire(row.tenant_id, row.connection_id, Rate(per_s=100, burst=100)).outcome is Outcome.GO


# --- transport errors -----------------------------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that is bound but not listening: connecting to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


@pytest.mark.parametrize(("request_name", "status", "retried"), [("read", "retrying", True),
                                                                 ("create", "failed", False)])
def test_connection_refused_is_retried_for_a_repeatable_request(hub: Hub, closed_port: int, request_name: str,
                                                                 status: str, retried: bool) -> None:
    # Given a connection to a closed port on loopback, with a GET and a POST (no key)
    connection = make_connection(hub.api, name="closed", base_url=f"http://127.0.0.1:{closed_port}",
                                 template=make_template(hub.api, name="loopback", verbs=["GET", "POST"]))
    make_request(hub.api, connection, name=request_name, method="GET" if request_name == "read" else "POST",
                 url="/items", query={}, body=None if request_name == "read" else {"n": 1})
    job_id = hub.submit(request_name, connection="closed")
    # When the job runs through real sockets
    runtime = hub.runtime(real_sockets=True, allow_http=True, allow_private_destinations=True)
    with runtime.client:
        run_job(job_id, runtime)
    document = hub.document(job_id)
    # Then the refusal is retried for the GET only (the POST is never sent twice)
    assert document["status"] == status
    assert document["error"]["code"] == "connection_refused"
    assert document["attempts"] == 1
    assert document["result"] is None
    assert len(hub.delays(job_id)) == (1 if retried else 0)


def test_connect_timeout_is_retried(hub: Hub) -> None:
    # Given a service that cannot be connected to in time
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    hub.service.respond = stall
    job_id = hub.submit("read")
    # When the job runs / Then it is retrying with connect_timeout
    document = hub.run(job_id)
    assert document["status"] == "retrying"
    assert document["error"]["code"] == "connect_timeout"
    assert len(hub.delays(job_id)) == 1


def test_read_timeout_is_not_retried(hub: Hub) -> None:
    # Given a GET whose service took the request but did not answer in time
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    hub.service.respond = stall
    job_id = hub.submit("read")
    # When the job runs
    document = hub.run(job_id)
    # Then it failed for good: the service may have acted on it
    assert document["status"] == "failed"
    assert document["error"]["code"] == "read_timeout"
    assert document["attempts"] == 1
    assert hub.delays(job_id) == []


# --- fencing and leases ---------------------------------------------------------------------


def test_a_stale_attempt_cannot_record_its_outcome(hub: Hub) -> None:
    # Given a job whose first attempt outlives its lease: while the service answers, another
    # worker claims the job as lost (attempt 2)
    job_id = hub.submit("read")
    claimed: list[int | None] = []

    def slow(request: httpx.Request) -> httpx.Response:
        with Session(hub.api.engine) as session:
            later = utcnow() + timedelta(hours=1)
            claimed.append(jobs.claim(session, job_id, lease_s=600, now=later))
        return httpx.Response(200, text="late answer")

    hub.service.respond = slow
    # When the first attempt ends
    document = hub.run(job_id)
    # Then its answer is dropped: the job is still the second attempt's, and nothing was announced
    assert claimed == [2]
    assert document["status"] == "running"
    assert document["attempts"] == 2
    assert document["result"] is None and document["error"] is None
    assert hub.notified == []


def test_a_stale_attempt_cannot_retry_or_fail_the_job(hub: Hub) -> None:
    # Given a job claimed by attempt 1, then (its lease over) by attempt 2
    job_id = hub.submit("read")
    now = utcnow()
    with Session(hub.api.engine) as session:
        assert jobs.claim(session, job_id, lease_s=10, now=now) == 1
        assert jobs.claim(session, job_id, lease_s=10, now=now + timedelta(seconds=11)) == 2
        # When attempt 1 tries to record a retry, a failure and an end
        retried = jobs.retry_later(session, job_id, 1, due_at=now, error={"code": "upstream_status"}, result=None,
                                   secrets_used=[])
        failed = jobs.fail(session, job_id, HubError(), attempt=1)
        finished = jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, attempt=1, result=None)
        # Then each write is dropped
        assert (retried, failed, finished) == (False, False, False)
        # And attempt 2 still can
        assert jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, attempt=2, result=None)
    document = hub.document(job_id)
    assert (document["status"], document["attempts"], document["error"]) == ("succeeded", 2, None)


def test_a_running_job_is_claimed_again_only_after_its_lease(hub: Hub) -> None:
    # Given a job claimed with a 60 s lease
    job_id = hub.submit("read")
    now = utcnow()
    with Session(hub.api.engine) as session:
        assert jobs.claim(session, job_id, lease_s=60, now=now) == 1
        # When another delivery tries before the lease ends / Then it does not get the job
        assert jobs.claim(session, job_id, lease_s=60, now=now + timedelta(seconds=59)) is None
        # When one tries after it / Then it does, as the next attempt
        assert jobs.claim(session, job_id, lease_s=60, now=now + timedelta(seconds=61)) == 2
        # And a final job is never claimed, whatever the time
        assert jobs.finish(session, job_id, status=JobStatus.SUCCEEDED, attempt=2)
        assert jobs.claim(session, job_id, lease_s=60, now=now + timedelta(days=1)) is None
    assert hub.row(job_id).attempts == 2


def test_a_retrying_job_is_claimed_as_the_next_attempt(hub: Hub) -> None:
    # Given a job retrying after its first attempt
    hub.service.respond = answer(503)
    job_id = hub.submit("read")
    hub.run(job_id)
    # When it is claimed / Then it is running as attempt 2, with a new lease
    with Session(hub.api.engine) as session:
        assert jobs.claim(session, job_id, lease_s=60) == 2
    row = hub.row(job_id)
    assert row.status == "running"
    lease = as_utc(row.lease_until)
    assert lease is not None and lease > utcnow()


# --- the tenant's rate ----------------------------------------------------------------------


def test_a_job_over_the_rate_stays_queued_and_comes_back_for_its_slot(hub: Hub) -> None:
    # Given a limiter, a tenant rate of 1 request/s with no burst, and a service answering 200, then 503
    hub.limiter = fake_limiter()
    hub.settings.update(default_rate_per_s=1.0, default_burst=0)
    answers = [answer(200), answer(503)]
    hub.service.respond = lambda request: answers.pop(0)(request)
    first, second = hub.submit("read"), hub.submit("read")
    # When both jobs run at once
    assert hub.run(first)["status"] == "succeeded"
    document = hub.run(second)
    # Then the second waits, queued, without calling the service
    assert document["status"] == "queued"
    assert document["attempts"] == 0
    assert len(hub.service.requests) == 1
    # And it was sent again for its reserved slot, at most one interval ahead
    delays = hub.delays(second)
    assert len(delays) == 1 and 0 < delays[0] <= 1.0
    row = hub.row(second)
    due, slot = as_utc(row.due_at), as_utc(row.slot_at)
    assert due is not None and slot == due
    assert utcnow() < due + timedelta(seconds=0.5)
    # When it comes back at its slot
    time.sleep(delays[0])
    document = hub.run(second)
    # Then it runs on the slot it holds, without reserving another, and the slot is used up
    assert document["status"] == "retrying"
    assert document["attempts"] == 1
    assert len(hub.service.requests) == 2
    assert len(hub.delays(second)) == 2
    assert hub.row(second).slot_at is None
    # And its retry, delivered at once, pays the rate again: it waits instead of calling
    document = hub.run(second)
    assert (document["status"], document["attempts"]) == ("retrying", 1)
    assert len(hub.service.requests) == 2
    assert len(hub.delays(second)) == 3 and hub.delays(second)[-1] > 0


def test_a_job_that_would_wait_too_long_fails_rate_limited(hub: Hub) -> None:
    # Given a tenant rate of 1 request/s, and jobs allowed to wait 0.5 s at most
    hub.limiter = fake_limiter()
    hub.settings.update(default_rate_per_s=1.0, default_burst=0, rate_max_wait_s=0.5)
    first, second = hub.submit("read"), hub.submit("read")
    # When both run at once
    hub.run(first)
    document = hub.run(second)
    # Then the second failed rate_limited, never calling the service and not sent again
    assert document["status"] == "failed"
    assert document["error"]["code"] == "rate_limited"
    assert document["attempts"] == 0
    assert len(hub.service.requests) == 1
    assert hub.delays(second) == []
    assert hub.notified == [first, second]


def test_a_job_held_by_a_long_cooldown_fails_rate_limited(hub: Hub) -> None:
    # Given a connection cooling down for 60 s, and jobs allowed to wait 30 s at most
    hub.limiter = fake_limiter()
    hub.settings.update(rate_max_wait_s=30.0)
    job_id = hub.submit("read")
    hub.limiter.cool_down(hub.row(job_id).connection_id, 60)
    # When the job runs
    document = hub.run(job_id)
    # Then it failed rate_limited, saying it was the cooldown
    assert document["status"] == "failed"
    assert document["error"]["code"] == "rate_limited"
    assert "cooling down" in document["error"]["message"]
    assert hub.service.requests == []
