"""Operating the hub through real processes, as an operator sees it: the Prometheus metrics at
``/metrics``, one JSON object per log line with ``HUB_LOG_FORMAT=json``, a worker's warm
shutdown bounded by ``HUB_WORKER_SHUTDOWN_GRACE_S``, and ``/readyz`` naming what is down.

Each test runs a stack of its own (``tests/e2e/delivery_stack.py``). The metrics and ``/readyz``
tests run it on a Redis server of their own (the bundled binary, on a free loopback port): the
metrics are one hash in Redis that every stack on the same Redis adds to (series without a
tenant label, such as the token cache's, would mix with other tests'), and ``/readyz`` needs a
Redis it can kill and start again.
"""

from __future__ import annotations

import json
import os
import re
import secrets as random_secrets
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from api_shim import embedded_redis
from tests import processes
from tests.e2e.delivery_stack import DeliveryStack, fresh_database, running_stack, submit, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CLIENT_SECRET = "ops-client s3cret+/="
"""The OAuth client's secret at the demo token server: it must never show up either."""


# -- helpers ----------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A Redis server of a test's own on a fixed loopback port, persisting nothing."""

    binary: str
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it (again, on the same port) and wait until it answers."""
        log = self.directory / "redis.log"
        self.process = processes.start(embedded_redis.server_command(self.binary, self.port, self.directory),
                                       dict(os.environ), log)
        with redis.Redis.from_url(self.url) as client:
            processes.wait_until(lambda: bool(client.ping()), "redis", process=self.process, log=log, timeout=30)

    def kill(self) -> None:
        """SIGKILL it, as when its machine dies."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, started; stopped after the test."""
    binary, _origin = embedded_redis.find_redis_server()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, processes.free_port(), directory)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            processes.stop(server.process)


def new_tenant(stack: DeliveryStack, name: str, *, rate: float, burst: int) -> tuple[str, str]:
    """Create a tenant with the CLI, as an operator does; its id (the metrics' ``tenant``
    label, which the CLI prints) and its API key."""
    created = subprocess.run(
        [*processes.HUB, "tenants", "create", name, "--rate", str(rate), "--burst", str(burst),
         "--max-inflight", "1000"],
        env=stack.env, check=True, timeout=60, capture_output=True, text=True,
    )
    lines = created.stdout.strip().splitlines()
    found = re.match(r"Created tenant \S+ \(([^()\s]+)\)\.", lines[0])
    assert found, created.stdout
    return found.group(1), lines[-1]


def hub_connection(hub: httpx.Client, upstream: str, name: str, canary: str,
                   requests: dict[str, dict[str, Any]], *, oauth: bool = False) -> str:
    """A template whose required ``X-Client-Key`` header a connection fills from the secret
    ``client_key`` (the ``canary``), the connection (to the demo OAuth server's client
    ``<name>-client`` when ``oauth``) and its stored ``requests``; the connection's id."""
    template: dict[str, Any] = {"name": name, "service_name": "Ops", "verbs": ["GET", "POST"],
                                "auth_headers": [{"name": "X-Client-Key", "required": True}]}
    body: dict[str, Any] = {"name": name, "base_url": upstream,
                            "auth_header_values": {"X-Client-Key": "{{secrets.client_key}}"}}
    secrets = {"client_key": canary}
    if oauth:
        with httpx.Client(base_url=f"{upstream}/oauth/admin", timeout=10) as idp:
            registered = idp.post("/clients", json={"client_id": f"{name}-client", "client_secret": CLIENT_SECRET})
            assert registered.status_code == 200, registered.text
        template["auth_type"] = "oauth2"
        body["oauth2"] = {"grant_type": "client_credentials", "token_url": f"{upstream}/oauth/token",
                          "client_id": f"{name}-client", "client_auth_method": "client_secret_basic",
                          "client_secret": "{{secrets.client_secret}}", "scope": "api"}
        secrets["client_secret"] = CLIENT_SECRET
    made = hub.post("/v1/templates", json=template)
    assert made.status_code == 201, made.text
    created = hub.post("/v1/connections", json={**body, "template_id": made.json()["id"]})
    assert created.status_code == 201, created.text
    for secret, value in secrets.items():
        stored = hub.put(f"/v1/connections/{name}/secrets/{secret}", json={"value": value})
        assert stored.status_code == 204, stored.text
    for request, definition in requests.items():
        stored = hub.post(f"/v1/connections/{name}/requests", json={"name": request, **definition})
        assert stored.status_code == 201, stored.text
    connection_id: str = created.json()["id"]
    return connection_id


def listed_jobs(hub: httpx.Client) -> list[dict[str, Any]]:
    """Every job of the client's tenant, as ``GET /v1/executions`` lists them."""
    listed = hub.get("/v1/executions", params={"limit": 200})
    assert listed.status_code == 200, listed.text
    assert listed.json().get("next_cursor") is None, "more jobs than one page"
    items: list[dict[str, Any]] = listed.json()["items"]
    return items


def scrape(api: str) -> tuple[str, list[Sample]]:
    """``GET /metrics`` without an API key, as Prometheus scrapes it: the text, and every sample."""
    answer = httpx.get(f"{api}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain"), answer.headers
    return answer.text, [sample for family in text_string_to_metric_families(answer.text) for sample in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def per(samples: list[Sample], name: str, key: str, **labels: str) -> dict[str, float]:
    """The samples called ``name`` whose labels include ``labels``, added up per value of ``key``."""
    found: dict[str, float] = {}
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            found[s.labels[key]] = found.get(s.labels[key], 0.0) + s.value
    return found


def check_buckets(samples: list[Sample], name: str, **labels: str) -> None:
    """A histogram's buckets grow with ``le`` and its ``+Inf`` bucket is its count."""
    buckets = sorted(((float(s.labels["le"]), s.value) for s in samples
                      if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())))
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), buckets
    assert buckets and buckets[-1][0] == float("inf"), buckets
    assert buckets[-1][1] == total(samples, f"{name}_count", **labels)


# -- 1. metrics -------------------------------------------------------------------------------------


def test_metrics_count_what_the_jobs_did_and_show_no_secret(own_redis: RedisServer, tmp_path: Path) -> None:
    """Jobs of every kind (a success, a 404, a retried 503, a truncated answer, a missing
    secret, OAuth with a cold then a warm token cache, a rated tenant's deferrals) run on two
    worker processes; one scrape of the API shows each as a user would count it."""
    canary = "CANARY-" + random_secrets.token_hex(12)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    with fresh_database(tmp_path) as database_url, \
            running_stack(own_redis.url, database_url, tmp_path, beat=False) as stack:
        # Given a tenant with a connection whose auth header is a secret (the canary), one with
        # OAuth 2.0 too, and a tenant limited to 2 requests a second with no burst
        main_id, main_key = new_tenant(stack, f"ops-main-{tag}", rate=1000, burst=1000)
        slow_id, slow_key = new_tenant(stack, f"ops-slow-{tag}", rate=2, burst=0)
        with stack.client(main_key) as hub:
            hub_connection(hub, stack.upstream, "plain", canary, {
                "echo": {"method": "GET", "url": f"/echo/metrics-{tag}"},
                "missing": {"method": "GET", "url": "/status/404"},
                "flaky": {"method": "GET", "url": f"/flaky/metrics-{tag}/1/503"},
                "big": {"method": "GET", "url": "/bytes/100000"},
                "unset": {"method": "GET", "url": "/echo/unset", "headers": {"X-Other": "{{secrets.nope}}"}},
            })
            hub_connection(hub, stack.upstream, "oauth", canary,
                           {"items": {"method": "GET", "url": "/oauth/protected/items"}}, oauth=True)
        with stack.client(slow_key) as slow:
            hub_connection(slow, stack.upstream, "rated", canary, {"echo": {"method": "GET", "url": "/echo/rated"}})

        # When the jobs run: five at once; two OAuth jobs one after the other (a cold, then a
        # warm token cache); four of the rated tenant at once (three must wait for their slots)
        with stack.client(main_key) as hub, stack.client(slow_key) as slow:
            named = {request: submit(hub, connection="plain", request=request)
                     for request in ("echo", "missing", "flaky", "big", "unset")}
            rated = [submit(slow, connection="rated", request="echo") for _ in range(4)]
            for turn in ("cold", "warm"):
                named[f"oauth-{turn}"] = submit(hub, connection="oauth", request="items")
                wait_final(hub, [named[f"oauth-{turn}"]], timeout=30)
            done = wait_final(hub, list(named.values()), timeout=40)
            wait_final(slow, rated, timeout=40)
            main_jobs, slow_jobs = listed_jobs(hub), listed_jobs(slow)
        with httpx.Client(base_url=f"{stack.upstream}/oauth/admin", timeout=10) as idp:
            token_requests = idp.get("/stats").json()["token_requests"]
        deferred_lines = [line for name in ("worker-1", "worker-2") for line in stack.log(name).splitlines()
                          if " deferred " in line and f"tenant={slow_id}" in line]

        # (the jobs ended as this scenario means them to)
        shown = {name: done[job_id] for name, job_id in named.items()}
        assert [(shown[n]["status"], shown[n]["attempts"]) for n in named] == [
            ("succeeded", 1), ("succeeded", 1), ("succeeded", 2), ("succeeded", 1), ("failed", 1),
            ("succeeded", 1), ("succeeded", 1)], shown
        assert [shown[n]["result"]["status_code"] for n in ("echo", "missing", "flaky", "big")] == [200, 404, 200, 200]
        assert shown["big"]["result"]["truncated"] is True
        assert shown["unset"]["error"]["code"] == "secret_missing"
        assert {(job["status"], job["attempts"]) for job in slow_jobs} == {("succeeded", 1)}
        assert token_requests == 1

        def finished(jobs: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
            return dict(Counter((job["status"], job["error"]["code"] if job["status"] == "failed" else "") for job in jobs))

        expected_finished = {main_id: finished(main_jobs), slow_id: finished(slow_jobs)}

        def scraped_finished(samples: list[Sample], tenant: str) -> dict[tuple[str, str], float]:
            return {(s.labels["status"], s.labels["code"]): s.value for s in samples
                    if s.name == "hub_jobs_finished_total" and s.labels["tenant"] == tenant}

        # Then /metrics (no API key needed) soon counts every finished job (a worker records a
        # job's metrics right after its outcome)
        scraped: list[tuple[str, list[Sample]]] = []

        def all_recorded() -> bool:
            scraped.append(scrape(stack.api))
            return all(scraped_finished(scraped[-1][1], tenant) == counts
                       for tenant, counts in expected_finished.items())

        try:
            processes.wait_until(all_recorded, "every finished job in /metrics", timeout=15)
        except AssertionError:
            raise AssertionError(f"expected {expected_finished}, /metrics:\n{scraped[-1][0]}") from None
        text, samples = scraped[-1]

    # and the jobs submitted, per tenant and action, are what the API lists
    for tenant, jobs in ((main_id, main_jobs), (slow_id, slow_jobs)):
        assert per(samples, "hub_jobs_submitted_total", "action", tenant=tenant) == \
            dict(Counter(job["action"] for job in jobs)), tenant
    assert expected_finished[main_id] == {("succeeded", ""): 6, ("failed", "secret_missing"): 1}
    # the services' answers by HTTP status: the 404, the 503 before the retry, and the 200s
    assert per(samples, "hub_upstream_responses_total", "status_code", tenant=main_id) == \
        {"200": 5, "404": 1, "503": 1}
    assert per(samples, "hub_upstream_responses_total", "status_code", tenant=slow_id) == {"200": 4}
    # one retry, caused by the upstream's status; the 404 was not retried
    assert per(samples, "hub_job_retries_total", "code", tenant=main_id) == {"upstream_status": 1}
    assert total(samples, "hub_job_retries_total", tenant=slow_id) == 0
    # the answer cut at the response cap
    assert total(samples, "hub_responses_truncated_total", tenant=main_id) == 1
    # the rated tenant's deferrals, as many as the worker logged, for a reserved or held slot
    deferrals = per(samples, "hub_rate_limit_deferrals_total", "reason", tenant=slow_id)
    assert sum(deferrals.values()) >= 1, text
    assert set(deferrals) <= {"reserved", "held"}, deferrals
    assert sum(deferrals.values()) == len(deferred_lines), deferred_lines
    assert total(samples, "hub_rate_limit_deferrals_total", tenant=main_id) == 0
    # the OAuth token fetched once (a miss), then taken from the cache (a hit)
    assert per(samples, "hub_token_cache_total", "result") == {"miss": 1, "hit": 1}
    for tenant, jobs in ((main_id, main_jobs), (slow_id, slow_jobs)):
        # a queue wait per job that started, an execution time per attempt, by its outcome
        assert total(samples, "hub_job_queue_wait_seconds_count", tenant=tenant) == \
            sum(1 for job in jobs if job["started_at"])
        assert total(samples, "hub_job_execution_seconds_count", tenant=tenant) == sum(job["attempts"] for job in jobs)
        by_outcome = per(samples, "hub_job_execution_seconds_count", "outcome", tenant=tenant)
        assert by_outcome.pop("retrying", 0) == total(samples, "hub_job_retries_total", tenant=tenant)
        assert by_outcome == {status: float(count) for status, count in Counter(job["status"] for job in jobs).items()}
        assert total(samples, "hub_job_queue_wait_seconds_sum", tenant=tenant) >= 0
        assert total(samples, "hub_job_execution_seconds_sum", tenant=tenant) > 0
        check_buckets(samples, "hub_job_queue_wait_seconds", tenant=tenant)
        for outcome in by_outcome:
            check_buckets(samples, "hub_job_execution_seconds", tenant=tenant, outcome=outcome)
    # no job in flight any more, no callback and no sweep (there is no beat)
    assert total(samples, "hub_jobs_in_flight", tenant=main_id) == total(samples, "hub_jobs_in_flight",
                                                                          tenant=slow_id) == 0
    assert total(samples, "hub_callbacks_total") == total(samples, "hub_sweeper_actions_total") == 0
    # and no secret value, client secret, token or API key is anywhere in the metrics
    for needle in (canary, CLIENT_SECRET, "demo-at-", main_key, slow_key):
        assert needle not in text, needle


# -- 2. JSON logs -----------------------------------------------------------------------------------

TEXT_RECORD = re.compile(r"^(\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+: |\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ )")
"""The start of a log record formatted as text: Celery's own format, or the hub's."""


def json_lines(name: str, text: str) -> list[dict[str, Any]]:
    """Every line of a running process's log from its first JSON line on, each parsed; fails
    on a line that is not one JSON object. Before it, only what a process prints before its
    logging is set up may be (Celery's banner, Python's warnings), and no log record as text.

    (Checked while the processes run: at its stop, Celery prints "worker: Warm shutdown" as
    plain text, outside logging.)"""
    lines = [line for line in text.splitlines() if line.strip()]
    first = next((n for n, line in enumerate(lines) if line.startswith("{")), None)
    assert first is not None, f"{name}: no JSON line:\n{text[-3000:]}"
    for line in lines[:first]:
        assert not TEXT_RECORD.match(line), f"{name}: a log record as text: {line}"
    documents = []
    for line in lines[first:]:
        try:
            document = json.loads(line)
        except ValueError:
            raise AssertionError(f"{name}: not a JSON line: {line!r}") from None
        assert isinstance(document, dict), line
        assert {"ts", "level", "logger", "message"} <= set(document), line
        documents.append(document)
    return documents


def test_json_logs_have_one_object_per_line_and_one_line_per_transition(redis_url: str, tmp_path: Path) -> None:
    canary = "CANARY-" + random_secrets.token_hex(12)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, extra_env={"HUB_LOG_FORMAT": "json"}) as stack:
        # Given every process logging JSON, and an OAuth connection whose auth header is a secret
        tenant_id, key = new_tenant(stack, f"ops-logs-{tag}", rate=1000, burst=1000)
        with stack.client(key) as hub:
            connection_id = hub_connection(hub, stack.upstream, "logged", canary, {
                "ok": {"method": "GET", "url": "/oauth/protected/items"},
                "flaky": {"method": "GET", "url": f"/flaky/logs-{tag}/1/503"},
            }, oauth=True)
            # When a job succeeds at once and another after one retry
            ok, flaky = submit(hub, connection="logged", request="ok"), submit(hub, connection="logged", request="flaky")
            done = wait_final(hub, [ok, flaky], timeout=40)
        assert (done[ok]["status"], done[ok]["attempts"]) == ("succeeded", 1), done[ok]
        assert (done[flaky]["status"], done[flaky]["attempts"]) == ("succeeded", 2), done[flaky]
        # (a worker logs a job's end right after recording it)
        processes.wait_until(lambda: stack.log("worker-1").count('"event":"succeeded"') +
                             stack.log("worker-2").count('"event":"succeeded"') >= 2, "the jobs' last lines", timeout=10)
        logs = {name: stack.log(name) for name in ("api", "worker-1", "worker-2", "beat")}
        upstream_log = stack.log("upstream")

    # Then from its first JSON line on, every line of the API, the workers and beat is a JSON object
    documents = {name: json_lines(name, text) for name, text in logs.items()}
    assert logs["api"].lstrip().startswith("{"), logs["api"][:500]  # uvicorn's every line, from the start
    for name in ("worker-1", "worker-2"):
        assert any(d["message"].endswith(" ready.") for d in documents[name]), name
    assert any("Sending due task" in d["message"] for d in documents["beat"])
    # and each job has one line per transition, in order: submitted in the API's log ...
    for job_id in (ok, flaky):
        submitted = [d for d in documents["api"] if d.get("job_id") == job_id]
        assert [d["event"] for d in submitted] == ["submitted"], submitted
        assert submitted[0]["tenant"] == tenant_id and submitted[0]["connection"] == connection_id
        assert submitted[0]["logger"] == "hub.api" and submitted[0]["message"].startswith(f"job {job_id} submitted")
    # ... and running, (retrying, running,) succeeded in the workers' logs, whichever ran them
    in_workers = [d for name in ("worker-1", "worker-2") for d in documents[name] if d.get("job_id") in (ok, flaky)]
    assert all(d.get("event") for d in in_workers), in_workers  # every line about them is a transition
    for job_id, expected in ((ok, [("running", 1), ("succeeded", 1)]),
                             (flaky, [("running", 1), ("retrying", 1), ("running", 2), ("succeeded", 2)])):
        events = sorted((d for d in in_workers if d["job_id"] == job_id), key=lambda d: (d["ts"], d["attempt"]))
        assert [(d["event"], d["attempt"]) for d in events] == expected, events
        for event in events:
            assert (event["tenant"], event["connection"], event["logger"]) == (tenant_id, connection_id, "hub.worker")
            assert event["level"] == "info"
            assert event["message"].startswith(f"job {job_id} {event['event']} ")
            if event["event"] == "running":
                # the first attempt says how long the job waited for it
                assert ("queue_wait_ms" in event) == (event["attempt"] == 1), event
                assert event.get("queue_wait_ms", 0) >= 0
            else:
                # an attempt's end says how long it took and what the service answered
                assert isinstance(event["elapsed_ms"], int | float) and event["elapsed_ms"] >= 0, event
                assert event["status_code"] == (503 if event["event"] == "retrying" else 200), event
                assert event["outcome"] == ("upstream_status" if event["event"] == "retrying" else "succeeded")
        if job_id == flaky:
            assert events[1]["delay_s"] >= 0
    # and no secret value, client secret, token or API key is in any log
    for name, text in {**logs, "upstream": upstream_log}.items():
        for needle in (canary, CLIENT_SECRET, "demo-at-", key):
            assert needle not in text, (name, needle)


# -- 3. warm shutdown -------------------------------------------------------------------------------


def _running(stack: DeliveryStack, hub: httpx.Client, job_id: str, path: str) -> None:
    """Wait until the API shows the job ``running`` and its call has reached the upstream."""
    processes.wait_until(lambda: hub.get(f"/v1/executions/{job_id}").json()["status"] == "running"
                         and stack.upstream_stats().get(path, 0) == 1, f"job {job_id} running", timeout=30)


def test_a_terminated_worker_finishes_its_running_job_before_it_exits(redis_url: str, tmp_path: Path) -> None:
    tag = time.monotonic_ns()
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, workers=("worker-1",),
                          extra_env={"HUB_WORKER_SHUTDOWN_GRACE_S": "8"}) as stack:
        # Given one worker, 8 s of grace, and a job of 2 s running on it
        with stack.client() as hub:
            hub_connection(hub, stack.upstream, f"slow-{tag}", "unused", {"slow": {"method": "GET", "url": "/slow/2"}})
            job_id = submit(hub, connection=f"slow-{tag}", request="slow")
            _running(stack, hub, job_id, "/slow/2")

            # When the worker gets SIGTERM, as an orchestrator stops it
            worker = stack.started["worker-1"]
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(30)
            finally:
                processes.stop(stack.started.pop("worker-1"))

            # Then it exits by itself, with 0, after the job finished: succeeded on its one attempt
            assert code == 0, stack.log("worker-1")[-3000:]
            job = hub.get(f"/v1/executions/{job_id}").json()
        assert (job["status"], job["attempts"], job["result"]["status_code"]) == ("succeeded", 1, 200), job
        assert stack.upstream_stats()["/slow/2"] == 1
        log = stack.log("worker-1")
        assert "Warm shutdown" in log and "Cold shutdown" not in log, log[-3000:]


def test_a_worker_still_busy_after_the_grace_stops_cold_and_the_job_runs_again(redis_url: str, tmp_path: Path) -> None:
    tag = time.monotonic_ns()
    timings = {"HUB_WORKER_SHUTDOWN_GRACE_S": "1", "HUB_REQUEST_DEADLINE_S": "8", "HUB_JOB_LEASE_S": "9"}
    with fresh_database(tmp_path) as database_url, \
            running_stack(redis_url, database_url, tmp_path, workers=("worker-1",), extra_env=timings) as stack:
        # Given one worker, 1 s of grace, and a job of 6 s (within the 8 s deadline) running on it
        with stack.client() as hub:
            hub_connection(hub, stack.upstream, f"slow-{tag}", "unused", {"slow": {"method": "GET", "url": "/slow/6"}})
            job_id = submit(hub, connection=f"slow-{tag}", request="slow")
            _running(stack, hub, job_id, "/slow/6")

            # When the worker gets SIGTERM
            took = stack.terminate("worker-1")

            # Then it stops cold once the grace is over, long before the job could have finished,
            # and the job is left running (its message unacknowledged, its lease on)
            log = stack.log("worker-1")
            assert took < 6.0, (took, log[-3000:])
            assert "Cold shutdown" in log, log[-3000:]
            cut = hub.get(f"/v1/executions/{job_id}").json()
            assert (cut["status"], cut["attempts"]) == ("running", 1), cut

            # When another worker starts, then the sweeper takes the job back after its lease
            # (9 + 8 s from its claim) and the job succeeds on a second attempt: nothing is lost
            stack.start_worker("worker-2")
            job = wait_final(hub, [job_id], timeout=60)[job_id]
        assert (job["status"], job["attempts"], job["result"]["status_code"]) == ("succeeded", 2, 200), job
        assert stack.upstream_stats()["/slow/6"] == 2
        assert "sweep: reclaimed 1" in stack.log("worker-2")


# -- 4. /readyz -------------------------------------------------------------------------------------


def _start_api(stack: DeliveryStack, name: str, **env: str) -> str:
    """Another API process on the stack's environment changed by ``env``; its URL once it is up."""
    port = processes.free_port()
    log = stack.logs / f"{name}.log"
    stack.started[name] = processes.start([*processes.HUB, "api", "--port", str(port)], {**stack.env, **env}, log)
    url = f"http://127.0.0.1:{port}"
    processes.wait_until(lambda: processes.http_ok(f"{url}/healthz"), name, process=stack.started[name], log=log)
    return url


def _not_ready(url: str) -> dict[str, Any]:
    answer = httpx.get(f"{url}/readyz", timeout=20)
    assert answer.status_code == 503, answer.text
    assert answer.headers["content-type"] == "application/problem+json", answer.headers
    problem: dict[str, Any] = answer.json()
    assert (problem["status"], problem["code"]) == (503, "not_ready"), problem
    return problem


def test_readyz_names_what_is_down_and_recovers_with_it(own_redis: RedisServer, tmp_path: Path) -> None:
    with fresh_database(tmp_path) as database_url, \
            running_stack(own_redis.url, database_url, tmp_path, workers=(), beat=False) as stack:
        # Given the API up, on its own Redis: ready
        ready = httpx.get(f"{stack.api}/readyz", timeout=20)
        assert ready.status_code == 200, ready.text
        assert ready.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok", "broker": "ok"}}

        # When Redis (also its broker) dies, then /readyz answers 503 naming both, while the
        # process itself is up (/healthz)
        own_redis.kill()
        problem = _not_ready(stack.api)
        assert problem["checks"]["database"] == "ok", problem
        assert problem["checks"]["redis"].startswith("unavailable") and \
            problem["checks"]["broker"].startswith("unavailable"), problem
        assert problem["detail"] == "unavailable: redis, broker", problem
        assert httpx.get(f"{stack.api}/healthz", timeout=10).status_code == 200

        # When Redis is back on the same port, then the API is ready again
        own_redis.start()
        processes.wait_until(lambda: processes.http_ok(f"{stack.api}/readyz"), "ready again", timeout=20)

        # Given API processes whose database, or whose separate broker, is a closed port
        closed = processes.free_port()
        no_database = _start_api(stack, "api-no-database",
                                 HUB_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/hub")
        no_broker = _start_api(stack, "api-no-broker", HUB_BROKER_URL=f"redis://127.0.0.1:{closed}/0")

        # Then each is up but not ready, and its problem names what it cannot reach, alone
        problem = _not_ready(no_database)
        assert problem["checks"]["database"].startswith("unavailable"), problem
        assert (problem["checks"]["redis"], problem["checks"]["broker"]) == ("ok", "ok"), problem
        assert problem["detail"] == "unavailable: database", problem
        problem = _not_ready(no_broker)
        assert problem["checks"]["broker"].startswith("unavailable"), problem
        assert (problem["checks"]["database"], problem["checks"]["redis"]) == ("ok", "ok"), problem
        assert problem["detail"] == "unavailable: broker", problem
