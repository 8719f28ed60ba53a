"""``GET /metrics``: what the API and the workers recorded, as a Prometheus scrape shows it."""

from __future__ import annotations

import dataclasses

import fakeredis
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_executor_retries import Hub, answer, hub  # noqa: F401 (the fixture)
from worker.executor import run_job


def scrape(running: Hub) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of ``GET /metrics``, asked without an API key as Prometheus asks."""
    response = running.api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_metrics_show_submissions_outcomes_and_upstream_answers_of_every_process(hub: Hub) -> None:  # noqa: F811
    # Given the API and a worker adding up their metrics in one Redis
    shared = fakeredis.FakeRedis()
    hub.api.client.app.state.redis = shared  # type: ignore[attr-defined]
    tenant = hub.api.tenant_a
    # When three jobs are submitted, one is cancelled, one succeeds, and one is retried after a 503
    ok, retried, cancelled = hub.submit(), hub.submit(), hub.submit()
    assert hub.api.client.post(f"/v1/executions/{cancelled}/cancel", headers=hub.api.headers()).status_code == 200
    worker = dataclasses.replace(hub.runtime(), metrics=shared)
    run_job(ok, worker)
    hub.service.respond = answer(503)
    run_job(retried, worker)
    samples = scrape(hub)
    # Then the scrape counts each, by tenant
    assert samples["hub_jobs_submitted_total"] == {(("action", "request"), ("tenant", tenant)): 3}
    finished = samples["hub_jobs_finished_total"]
    assert finished == {(("code", ""), ("status", "cancelled"), ("tenant", tenant)): 1,
                        (("code", ""), ("status", "succeeded"), ("tenant", tenant)): 1}
    assert samples["hub_upstream_responses_total"] == {(("status_code", "200"), ("tenant", tenant)): 1,
                                                       (("status_code", "503"), ("tenant", tenant)): 1}
    assert samples["hub_job_retries_total"] == {(("code", "upstream_status"), ("tenant", tenant)): 1}
    # and the time each waited in the queue, and each attempt's time, by outcome
    assert samples["hub_job_queue_wait_seconds_count"] == {(("tenant", tenant),): 2}
    assert samples["hub_job_execution_seconds_count"] == {(("outcome", "retrying"), ("tenant", tenant)): 1,
                                                          (("outcome", "succeeded"), ("tenant", tenant)): 1}
    # and the job waiting for its retry is in flight
    assert samples["hub_jobs_in_flight"] == {(("status", "retrying"), ("tenant", tenant)): 1}
