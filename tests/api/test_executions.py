"""``/v1/executions``: submitting jobs, polling them, listing them.

The broker is the recording queue of the ``api`` fixture: what the API enqueues is visible in
``api.queue.sent``, and ``api.queue.down`` makes the broker unavailable.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlmodel import Session

from models import jobs
from models.jobs import JobStatus
from tests.api.helpers import assert_problem, error_locs, list_all, make_connection, make_request, make_template
from worker.sweeper import Senders, sweep

STUDIO_VALUES = {"path_params": {"account_id": "001xx"}, "variables": {"since": "2026-01-01"}}

# What a worker records when the web service answered (API.md, "The job").
ANSWERED = {
    "status_code": 200,
    "headers": {"content-type": "application/json"},
    "body": '{"records": []}',
    "body_encoding": "utf-8",
    "size": 15,
    "truncated": False,
    "content_length": 15,
    "elapsed_ms": 41.7,
    "decoded": True,
}


@pytest.fixture
def connection(api):
    """Tenant a's ``sfdc-prod`` with a manual request ``list-accounts`` and a studio ``get-account``."""
    template = make_template(api, verbs=["GET", "POST"])
    connection = make_connection(api, template, name="sfdc-prod", base_url="https://api.example.com/v1")
    make_request(api, connection, name="list-accounts", kind="manual", url="/accounts")
    make_request(
        api,
        connection,
        name="get-account",
        kind="studio",
        url="/accounts/{account_id}",
        query={"since": "{{vars.since}}"},
    )
    return connection


def submit(api, tenant="a", **body):
    """``POST /v1/executions`` with ``body``; the raw response."""
    return api.client.post("/v1/executions", json=body, headers=api.headers(tenant))


def listed(api, tenant="a", **params):
    """The ids of the jobs ``GET /v1/executions`` lists, over every page."""
    return [job["id"] for job in list_all(api, "/v1/executions", tenant, **params)]


def test_submitting_a_stored_request_queues_a_job(api, connection):
    # When: a client runs a stored manual request, naming connection and request
    response = submit(api, connection="sfdc-prod", request="list-accounts")
    # Then: 202 with a queued job that has not been tried yet
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert job["attempts"] == 0
    assert job["action"] == "request"
    assert job["connection_id"] == connection["id"]
    stored = api.client.get("/v1/connections/sfdc-prod/requests/list-accounts", headers=api.headers()).json()
    assert job["request_id"] == stored["id"]
    assert job["result"] is None and job["error"] is None and job["finished_at"] is None
    assert job["created_at"].endswith("Z")
    # And: exactly the job id, nothing else, was sent to the broker
    assert api.queue.sent == [job["id"]]


def test_connection_and_request_may_be_given_by_id(api, connection):
    # Given: the ids of the connection and of its stored request
    stored = api.client.get("/v1/connections/sfdc-prod/requests/list-accounts", headers=api.headers()).json()
    # When: the execution names them by id
    response = submit(api, connection=connection["id"], request=stored["id"])
    # Then: the job runs that request of that connection
    assert response.status_code == 202, response.text
    assert response.json()["request_id"] == stored["id"]
    assert api.queue.sent == [response.json()["id"]]


def test_a_submitted_job_can_be_fetched(api, connection):
    # Given: a submitted job
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    # When: the client fetches it
    response = api.client.get(f"/v1/executions/{job['id']}", headers=api.headers())
    # Then: it is the same queued job
    assert response.status_code == 200
    assert response.json() == job


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({}, {"account_id", "since"}),
        ({"variables": {"since": "2026-01-01"}}, {"account_id"}),
        ({"path_params": {"account_id": "001"}, "variables": {"other": "x"}}, {"since"}),
    ],
    ids=["nothing", "no-path-param", "no-variable"],
)
def test_a_studio_request_without_its_values_is_missing_variable(api, connection, given, missing):
    # When: a studio request is run without a value for each of its placeholders
    response = submit(api, connection="sfdc-prod", request="get-account", **given)
    # Then: 422 missing_variable, with one error naming each missing placeholder
    problem = assert_problem(response, 422, "missing_variable")
    assert {loc[-1] for loc in error_locs(problem)} == missing
    # And: nothing was queued, and no job exists
    assert api.queue.sent == []
    assert listed(api) == []


def test_a_missing_variable_is_located_at_the_variables_field(api, connection):
    # When: a studio request is run without its variable
    response = submit(api, connection="sfdc-prod", request="get-account", path_params={"account_id": "001"})
    # Then: the error points at the request field the client must fill: variables.since
    problem = assert_problem(response, 422, "missing_variable")
    assert error_locs(problem) == [["body", "variables", "since"]]


def test_a_studio_request_with_its_values_is_queued(api, connection):
    # When: a studio request is run with a value for each placeholder
    response = submit(api, connection="sfdc-prod", request="get-account", **STUDIO_VALUES)
    # Then: 202, a queued job, sent to the broker
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    assert api.queue.sent == [response.json()["id"]]


def test_a_path_parameter_cannot_send_a_request_to_another_host(api, connection):
    # Given: a studio request whose host is a path parameter
    make_request(api, connection, name="regional", kind="studio", url="https://{region}.example.com/accounts")
    # When: it is run with a value that makes the host one the connection does not allow
    response = submit(api, connection="sfdc-prod", request="regional", path_params={"region": "evil"})
    # Then: 422 host_not_allowed before anything is queued
    assert_problem(response, 422, "host_not_allowed")
    assert api.queue.sent == []


def test_an_adhoc_request_is_queued_with_its_definition(api, connection):
    # When: a client sends a request it defines in the submission, with a path parameter and a variable
    adhoc = {"method": "post", "url": "/x/{id}", "headers": {"X-Trace": "{{vars.trace}}"},
             "body": {"a": "{{vars.a}}"}, "media_type": "application/json"}
    response = submit(api, connection="sfdc-prod", adhoc=adhoc, path_params={"id": "7"},
                      variables={"a": "1", "trace": "t"})
    # Then: 202 with an adhoc job, and only its id was enqueued
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["action"], job["request_id"], job["status"]) == ("adhoc", None, "queued")
    assert api.queue.sent == [job["id"]]


@pytest.mark.parametrize(
    ("adhoc", "extra", "code"),
    [
        ({"method": "DELETE", "url": "/x"}, {}, "verb_not_allowed"),
        ({"method": "GET", "url": "https://elsewhere.example.org/x"}, {}, "host_not_allowed"),
        ({"method": "GET", "url": "/x/{id}"}, {}, "missing_variable"),
        ({"method": "GET", "url": "https://{host}/x"}, {"path_params": {"host": "evil.example.org"}}, "host_not_allowed"),
        ({"method": "POST", "url": "/x", "body": {"a": 1}, "media_type": "application/xml"}, {}, "unsupported_media_type"),
        ({"method": "POST", "url": "/x", "body": {"a": 1}, "media_type": "text/plain"}, {}, "invalid_body"),
        ({"method": "GET", "url": "ftp://api.example.com/x"}, {}, "scheme_not_allowed"),
    ],
    ids=["verb", "host", "missing-path-param", "host-from-path-param", "media-type", "body-shape", "scheme"],
)
def test_an_adhoc_request_obeys_the_connections_rules(api, connection, adhoc, extra, code):
    # When: an ad-hoc request breaks one of the connection's rules
    response = submit(api, connection="sfdc-prod", adhoc=adhoc, **extra)
    # Then: it is refused before anything is queued
    assert_problem(response, 422, code)
    assert api.queue.sent == []


@pytest.mark.parametrize(
    "shape",
    [
        {"request": "list-accounts", "action": "auth"},
        {"request": "list-accounts", "adhoc": {"method": "GET", "url": "/accounts"}},
        {},
    ],
    ids=["request-and-action", "request-and-adhoc", "none"],
)
def test_exactly_one_shape_must_be_given(api, connection, shape):
    # When: an execution names two shapes, or none
    response = submit(api, connection="sfdc-prod", **shape)
    # Then: 422 validation_error, nothing queued
    problem = assert_problem(response, 422, "validation_error")
    error_locs(problem)
    assert api.queue.sent == []


def test_unknown_fields_are_refused(api, connection):
    # When: an execution body carries a field the contract does not name
    response = submit(api, connection="sfdc-prod", request="list-accounts", priority="high")
    # Then: 422 validation_error pointing at it, nothing queued
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "priority"] in error_locs(problem)
    assert api.queue.sent == []


def test_an_unknown_connection_is_404(api, connection):
    # When: an execution names a connection that does not exist
    response = submit(api, connection="no-such-connection", request="list-accounts")
    # Then: 404, nothing queued
    assert_problem(response, 404, "not_found")
    assert api.queue.sent == []


def test_an_unknown_request_is_404(api, connection):
    # When: an execution names a request the connection does not have
    response = submit(api, connection="sfdc-prod", request="no-such-request")
    # Then: 404, nothing queued
    assert_problem(response, 404, "not_found")
    assert api.queue.sent == []


def test_a_request_of_another_connection_is_404(api, connection):
    # Given: a second connection without requests
    make_connection(api, name="other")
    # When: an execution pairs it with sfdc-prod's request
    response = submit(api, connection="other", request="list-accounts")
    # Then: 404, nothing queued
    assert_problem(response, 404, "not_found")
    assert api.queue.sent == []


def test_another_tenants_connection_cannot_be_executed(api, connection):
    # When: tenant b runs tenant a's connection and request, by id
    stored = api.client.get("/v1/connections/sfdc-prod/requests/list-accounts", headers=api.headers()).json()
    response = submit(api, "b", connection=connection["id"], request=stored["id"])
    # Then: 404, nothing queued, and b has no jobs
    assert_problem(response, 404, "not_found")
    assert api.queue.sent == []
    assert listed(api, "b") == []


def test_when_the_broker_is_down_the_job_is_stored_and_the_sweeper_sends_it_later(api, connection):
    # Given: the broker cannot take messages
    api.queue.down = True
    # When: a client submits a job
    response = submit(api, connection="sfdc-prod", request="list-accounts")
    # Then: 202, the job is stored and waits, not lost and not failed
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert api.queue.sent == []
    assert listed(api, status="queued") == [job["id"]]
    # And: while the broker stays down a sweep sends nothing and loses nothing
    senders = Senders(dispatch=api.queue, notify=api.queue)
    assert sweep(api.engine, api.client.app.state.settings, senders).redispatched == 0
    assert listed(api, status="queued") == [job["id"]]
    # When: the broker is back and the sweeper runs
    api.queue.down = False
    report = sweep(api.engine, api.client.app.state.settings, senders)
    # Then: the job is sent, once, and still waits for its worker
    assert report.redispatched == 1
    assert api.queue.sent == [job["id"]]
    assert sweep(api.engine, api.client.app.state.settings, senders).redispatched == 0  # its message is now due: not sent twice
    assert api.queue.sent == [job["id"]]
    assert api.client.get(f"/v1/executions/{job['id']}", headers=api.headers()).json()["status"] == "queued"


def test_another_tenants_job_does_not_exist_for_you(api, connection):
    # Given: a job of tenant a
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    # When: tenant b fetches it and lists its jobs
    response = api.client.get(f"/v1/executions/{job['id']}", headers=api.headers("b"))
    # Then: 404, and b's list is empty
    assert_problem(response, 404, "not_found")
    assert listed(api, "b") == []
    assert_problem(api.client.get("/v1/executions/no-such-job", headers=api.headers()), 404, "not_found")


def test_wait_on_a_queued_job_answers_with_it_still_queued(api, connection):
    # Given: a queued job that no worker will pick up
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    # When: the client polls with ?wait=0.5
    response = api.client.get(f"/v1/executions/{job['id']}", params={"wait": 0.5}, headers=api.headers())
    # Then: it answers (after about that long; not timed here), the job still queued
    assert response.status_code == 200
    assert response.json() == job


def test_wait_answers_as_soon_as_the_job_finishes(api, connection):
    # Given: a queued job that a worker will finish in a moment
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()

    claimed: list[bool] = []

    def worker() -> None:
        time.sleep(0.3)
        with Session(api.engine) as session:
            claimed.append(jobs.claim(session, job["id"], lease_s=60) == 1)
            jobs.finish(session, job["id"], status=JobStatus.SUCCEEDED, result=ANSWERED)

    thread = threading.Thread(target=worker)
    thread.start()
    # When: the client polls with a long wait
    started = time.monotonic()
    response = api.client.get(f"/v1/executions/{job['id']}", params={"wait": 20}, headers=api.headers())
    held = time.monotonic() - started
    thread.join()
    assert claimed == [True]
    # Then: it gets the finished job, well before the wait ran out
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["attempts"] == 1
    assert response.json()["result"] == ANSWERED
    assert held < 15


@pytest.mark.parametrize("wait", [30.5, 31, 60, -1])
def test_a_wait_outside_0_to_30_seconds_is_a_validation_problem(api, connection, wait):
    # Given: a job
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    # When: the client asks to wait longer than 30 seconds, or a negative time
    response = api.client.get(f"/v1/executions/{job['id']}", params={"wait": wait}, headers=api.headers())
    # Then: 422 validation_error located at wait
    problem = assert_problem(response, 422, "validation_error")
    assert ["query", "wait"] in error_locs(problem)


def test_jobs_are_listed_by_status_and_connection(api, connection):
    # Given: on sfdc-prod, two queued jobs and one cancelled; on another connection, one queued
    other = make_connection(api, name="other")
    make_request(api, other, name="ping", url="/ping")
    first = submit(api, connection="sfdc-prod", request="list-accounts").json()
    second = submit(api, connection="sfdc-prod", request="get-account", **STUDIO_VALUES).json()
    third = submit(api, connection="sfdc-prod", request="list-accounts").json()
    assert api.client.post(f"/v1/executions/{third['id']}/cancel", headers=api.headers()).status_code == 200
    elsewhere = submit(api, connection="other", request="ping").json()
    # When: the client lists queued jobs of sfdc-prod, by name and by id
    by_name = listed(api, status="queued", connection="sfdc-prod")
    by_id = listed(api, status="queued", connection=connection["id"])
    # Then: it gets exactly that connection's two queued jobs, oldest first
    assert by_name == [first["id"], second["id"]]
    assert by_id == [first["id"], second["id"]]
    # And: the other filters select what they say
    assert len(listed(api, connection="sfdc-prod")) == 3
    assert listed(api, status="queued", connection="other") == [elsewhere["id"]]
    assert listed(api, status="cancelled") == [third["id"]]
    assert listed(api, status="succeeded") == []
    assert len(listed(api)) == 4


def test_listing_jobs_of_an_unknown_connection_is_404(api, connection):
    # When: the client filters by a connection it does not have
    response = api.client.get("/v1/executions", params={"connection": "no-such"}, headers=api.headers())
    # Then: 404
    assert_problem(response, 404, "not_found")


def test_listing_jobs_with_an_unknown_status_is_a_validation_problem(api, connection):
    # When: the client filters by a status that does not exist
    response = api.client.get("/v1/executions", params={"status": "done"}, headers=api.headers())
    # Then: 422 validation_error located at status
    problem = assert_problem(response, 422, "validation_error")
    assert ["query", "status"] in error_locs(problem)


def test_jobs_are_paginated(api, connection):
    # Given: three jobs
    ids = [submit(api, connection="sfdc-prod", request="list-accounts").json()["id"] for _ in range(3)]
    # When: the client walks them one at a time
    walked = listed(api, limit=1)
    # Then: it sees each once, oldest first
    assert walked == ids


def test_a_queued_job_can_be_cancelled_and_is_then_never_run(api, connection):
    # Given a queued job
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    # When it is cancelled
    response = api.client.post(f"/v1/executions/{job['id']}/cancel", headers=api.headers())
    # Then it is cancelled, finished, and a worker that gets its message later leaves it alone
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]
    with Session(api.engine) as session:
        assert jobs.claim(session, job["id"], lease_s=60) is None
    # and cancelling again says why not
    again = api.client.post(f"/v1/executions/{job['id']}/cancel", headers=api.headers())
    assert_problem(again, 409, "job_not_cancellable")


def test_a_started_job_cannot_be_cancelled(api, connection):
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    with Session(api.engine) as session:
        assert jobs.claim(session, job["id"], lease_s=60) == 1
    response = api.client.post(f"/v1/executions/{job['id']}/cancel", headers=api.headers())
    assert_problem(response, 409, "job_not_cancellable")
    assert api.client.get(f"/v1/executions/{job['id']}", headers=api.headers()).json()["status"] == "running"


def test_another_tenants_job_cannot_be_cancelled(api, connection):
    job = submit(api, connection="sfdc-prod", request="list-accounts").json()
    response = api.client.post(f"/v1/executions/{job['id']}/cancel", headers=api.headers("b"))
    assert_problem(response, 404, "not_found")
    assert api.client.get(f"/v1/executions/{job['id']}", headers=api.headers()).json()["status"] == "queued"
