"""Submitting jobs within limits: the tenant's in-flight quota (``429 tenant_quota_exceeded``),
a database that is down (``503 database_unavailable``), and what a ``callback_url`` may be.

The broker is the recording queue of the ``api`` fixture (``api.queue.sent``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from api_shim.app import create_app
from models.tables import Job
from models.tenants import set_limits
from tests.api.helpers import assert_problem, error_locs, make_connection, make_request, make_template
from tests.api.test_limits_concurrency import Call, count_rows, race
from tests.conftest import Api, RecordingQueue, new_tenant, test_settings


@pytest.fixture
def connection(api: Api) -> dict[str, Any]:
    """Tenant a's and tenant b's ``svc``, each with a stored GET ``list``."""
    for tenant in ("a", "b"):
        template = make_template(api, tenant)
        made = make_connection(api, template, tenant, name="svc")
        make_request(api, made, tenant, name="list")
    return made


def submit(api: Api, tenant: str = "a", **extra: Any) -> Any:
    """``POST /v1/executions`` of ``svc``'s ``list``; the raw response."""
    return api.client.post("/v1/executions", json={"connection": "svc", "request": "list", **extra},
                           headers=api.headers(tenant))


def quota(api: Api, max_inflight: int, tenant: str = "tenant-a") -> None:
    """Give the tenant an in-flight quota, as ``integration-hub tenants set`` does."""
    with Session(api.engine) as session:
        set_limits(session, name=tenant, max_inflight=max_inflight)
        session.commit()


def in_flight(engine: Engine, tenant_id: str) -> int:
    """The tenant's jobs that are queued, running or retrying, counted in the database."""
    with Session(engine) as session:
        return int(session.execute(
            sa.select(sa.func.count()).select_from(Job)
            .where(Job.tenant_id == tenant_id, Job.status.in_(["queued", "running", "retrying"]))  # type: ignore[arg-type,attr-defined]
        ).scalar_one())


# --- the in-flight quota ----------------------------------------------------------------------------


def test_at_the_quota_a_submission_is_429_with_retry_after(api: Api, connection: dict[str, Any]) -> None:
    """Three in flight of three: the fourth is refused, nothing stored or queued."""
    # Given: tenant a may have 3 jobs in flight
    quota(api, 3)
    # When: it submits 4
    accepted = [submit(api) for _ in range(3)]
    refused = submit(api)
    # Then: 3 are accepted and queued
    assert [r.status_code for r in accepted] == [202, 202, 202]
    assert api.queue.sent == [r.json()["id"] for r in accepted]
    # And: the fourth is 429 tenant_quota_exceeded, saying when to try again
    assert_problem(refused, 429, "tenant_quota_exceeded")
    retry_after = refused.headers["Retry-After"]
    assert retry_after.isdigit() and int(retry_after) >= 1
    # And: nothing more was stored or sent
    assert in_flight(api.engine, api.tenant_a) == 3
    assert count_rows(api.engine, "job") == 3
    assert len(api.queue.sent) == 3


def test_a_cancelled_job_frees_its_place(api: Api, connection: dict[str, Any]) -> None:
    """The quota counts jobs in flight, not jobs ever made."""
    # Given: a tenant at its quota of 3
    quota(api, 3)
    jobs = [submit(api).json() for _ in range(3)]
    assert_problem(submit(api), 429, "tenant_quota_exceeded")
    # When: one of its jobs is cancelled
    cancelled = api.client.post(f"/v1/executions/{jobs[0]['id']}/cancel", headers=api.headers())
    assert cancelled.status_code == 200, cancelled.text
    # Then: a submission is accepted again, and the next one is refused again
    again = submit(api)
    assert again.status_code == 202, again.text
    assert api.queue.sent[-1] == again.json()["id"]
    assert_problem(submit(api), 429, "tenant_quota_exceeded")


def test_a_tenant_at_its_quota_does_not_limit_another(api: Api, connection: dict[str, Any]) -> None:
    """The quota is per tenant, and counts the tenant's own jobs."""
    # Given: tenant a at its quota of 3, and tenant b with a quota of 4
    quota(api, 3)
    quota(api, 4, "tenant-b")
    for _ in range(3):
        assert submit(api).status_code == 202
    assert_problem(submit(api), 429, "tenant_quota_exceeded")
    # When: tenant b submits 5 jobs
    answers = [submit(api, "b") for _ in range(5)]
    # Then: b's first 4 are accepted (a's jobs do not count for b), its fifth is over its own quota
    assert [r.status_code for r in answers[:4]] == [202] * 4
    assert_problem(answers[4], 429, "tenant_quota_exceeded")
    assert (in_flight(api.engine, api.tenant_a), in_flight(api.engine, api.tenant_b)) == (3, 4)


def test_the_default_quota_applies_without_a_tenant_quota(engine: Engine, database_url: str) -> None:
    """A tenant without its own quota gets ``default_max_inflight``."""
    # Given: the API with a default quota of 2, and tenant a without a quota of its own
    queue = RecordingQueue()
    app = create_app(test_settings(database_url, default_max_inflight=2), engine=engine, enqueue=queue)
    api = _api_on(app, engine, queue)
    try:
        make_request(api, make_connection(api, name="svc"), name="list")
        # When: it submits three jobs
        answers = [submit(api) for _ in range(3)]
        # Then: two are accepted, the third is 429
        assert [r.status_code for r in answers[:2]] == [202, 202]
        assert_problem(answers[2], 429, "tenant_quota_exceeded")
        # And: a quota of its own (5) replaces the default
        quota(api, 5)
        assert submit(api).status_code == 202
    finally:
        api.client.close()


def _api_on(app: Any, engine: Engine, queue: RecordingQueue) -> Api:
    """An ``Api`` on ``app`` (built with other settings than the fixture's), with two new tenants."""
    tenant_a, key_a = new_tenant(engine, "tenant-a")
    tenant_b, key_b = new_tenant(engine, "tenant-b")
    client = TestClient(app, raise_server_exceptions=False)
    return Api(client, queue, engine, tenant_a, key_a, tenant_b, key_b)


def test_concurrent_submissions_never_exceed_the_quota(api: Api, connection: dict[str, Any]) -> None:
    """Twelve submissions at once, with a quota of five: five are accepted, on either database."""
    # Given: a quota of 5
    quota(api, 5)
    # When: 12 submissions arrive at the same time, each from its own client
    call = Call("/v1/executions", {"connection": "svc", "request": "list"}, api.headers())
    responses = race(api.client.app, [call] * 12)  # type: ignore[arg-type]
    # Then: exactly 5 are accepted and 7 refused with 429, none failed otherwise
    assert Counter(r.status_code for r in responses) == Counter({202: 5, 429: 7}), [r.text for r in responses]
    for response in responses:
        if response.status_code == 429:
            assert_problem(response, 429, "tenant_quota_exceeded")
    # And: exactly the accepted jobs exist and were sent
    accepted = sorted(r.json()["id"] for r in responses if r.status_code == 202)
    assert in_flight(api.engine, api.tenant_a) == 5
    assert sorted(api.queue.sent) == accepted


# --- the database is down ---------------------------------------------------------------------------


@pytest.fixture(params=["postgres-closed-port", "sqlite-unopenable"])
def dead_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine whose database cannot be reached: a closed loopback port, or a SQLite file
    that is a directory."""
    if request.param == "postgres-closed-port":
        engine = sa.create_engine("postgresql+psycopg://postgres@127.0.0.1:1/x", connect_args={"connect_timeout": 2})
    else:
        engine = sa.create_engine(f"sqlite:///{tmp_path}")
    yield engine
    engine.dispose()


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/v1/executions", {"connection": "svc", "request": "list"}),
    ("GET", "/v1/executions", None),
    ("GET", "/v1/callback-key", None),
], ids=["submit", "list", "callback-key"])
def test_an_unreachable_database_is_503_database_unavailable(
    dead_engine: Engine, tmp_path: Path, method: str, path: str, body: Any
) -> None:
    """Clients get a problem document telling them to come back, not a stack trace."""
    # Given: the API on a database it cannot reach
    queue = RecordingQueue()
    app = create_app(test_settings(f"sqlite:///{tmp_path / 'unused.db'}"), engine=dead_engine, enqueue=queue)
    with TestClient(app, raise_server_exceptions=False) as client:
        # When: a client calls it
        response = client.request(method, path, json=body, headers={"Authorization": "Bearer hub_some-key"})
    # Then: 503 database_unavailable with Retry-After, and no trace of the driver's error
    problem = assert_problem(response, 503, "database_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    for leak in ("Traceback", "psycopg", "sqlite3", "OperationalError", "127.0.0.1", str(tmp_path)):
        assert leak not in response.text, problem
    assert queue.sent == []


def test_a_commit_that_fails_stores_and_sends_nothing(
    api: Api, connection: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database fails as the job is committed: 503, no job, no message for a job that is not."""
    # Given: a database that fails at the next commit (the connection was lost)
    def lost(session: Session) -> None:
        session.rollback()
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection unexpectedly"))

    monkeypatch.setattr(Session, "commit", lost)
    # When: a client submits a job
    response = submit(api)
    monkeypatch.undo()
    # Then: 503 database_unavailable
    assert_problem(response, 503, "database_unavailable")
    assert "server closed" not in response.text
    # And: no job was stored, and nothing was sent to the workers
    assert count_rows(api.engine, "job") == 0
    assert api.queue.sent == []
    # And: once the database is back, the same submission works
    assert submit(api).status_code == 202


# --- callback_url -------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "/hooks/done", "hooks.example.com/done", "ftp://hooks.example.com/done", "https:///done",
    "http://hooks.example.com/done",
], ids=["relative", "no-scheme", "ftp", "no-host", "http-not-allowed"])
def test_a_callback_url_must_be_absolute_https(engine: Engine, database_url: str, url: str) -> None:
    """Where plain http is not allowed, only an absolute https URL is a callback URL."""
    # Given: the API with allow_http off, and a connection to submit to
    queue = RecordingQueue()
    app = create_app(test_settings(database_url, allow_http=False), engine=engine, enqueue=queue)
    api = _api_on(app, engine, queue)
    try:
        make_request(api, make_connection(api, name="svc"), name="list")
        # When: a job is submitted with that callback URL
        response = submit(api, callback_url=url)
        # Then: 422 located at the callback_url field, nothing stored or sent
        problem = assert_problem(response, 422, "validation_error")
        assert error_locs(problem) == [["body", "callback_url"]]
        assert queue.sent == [] and count_rows(engine, "job") == 0
        # And: an https callback URL is accepted and shown on the job
        accepted = submit(api, callback_url="https://hooks.example.com/done")
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["callback_url"] == "https://hooks.example.com/done"
    finally:
        api.client.close()


def test_an_http_callback_url_is_accepted_when_http_is_allowed(api: Api, connection: dict[str, Any]) -> None:
    """With allow_http (the ``api`` fixture's settings), http is a callback scheme too; ftp is not."""
    # When: jobs are submitted with an http and an ftp callback URL
    http = submit(api, callback_url="http://hooks.example.com/done")
    ftp = submit(api, callback_url="ftp://hooks.example.com/done")
    # Then: http is accepted, ftp refused at callback_url
    assert http.status_code == 202, http.text
    assert error_locs(assert_problem(ftp, 422, "validation_error")) == [["body", "callback_url"]]
    assert api.queue.sent == [http.json()["id"]]
