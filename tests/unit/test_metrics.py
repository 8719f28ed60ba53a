"""The hub's metrics: what a batch adds up in Redis, and what ``/metrics`` shows of it."""

from __future__ import annotations

import fakeredis
import pytest
import redis
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from models import metrics
from models.metrics import Batch, HubCollector


def scrape(client: redis.Redis) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample ``/metrics`` would show: {sample name: {sorted labels: value}}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(client))  # type: ignore[arg-type]
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_counters_from_several_processes_add_up(client: fakeredis.FakeRedis) -> None:
    # Given two processes (two batches) recording jobs of two tenants
    first, second = Batch(client), Batch(client)
    first.inc("hub_jobs_finished_total", tenant="t1", status="succeeded", code="")
    first.inc("hub_jobs_finished_total", tenant="t1", status="succeeded", code="")
    second.inc("hub_jobs_finished_total", tenant="t1", status="succeeded", code="")
    second.inc("hub_jobs_finished_total", tenant="t2", status="failed", code="connect_timeout")
    # When both flush
    first.flush()
    second.flush()
    # Then one scrape shows the sums, by tenant, status and code
    finished = scrape(client)["hub_jobs_finished_total"]
    assert finished[(("code", ""), ("status", "succeeded"), ("tenant", "t1"))] == 3
    assert finished[(("code", "connect_timeout"), ("status", "failed"), ("tenant", "t2"))] == 1
    # And a flushed batch is empty: flushing again adds nothing
    first.flush()
    assert scrape(client)["hub_jobs_finished_total"][(("code", ""), ("status", "succeeded"), ("tenant", "t1"))] == 3


def test_a_histogram_counts_each_observation_in_its_buckets_and_sums_it(client: fakeredis.FakeRedis) -> None:
    # Given attempts of 0.02 s, 0.3 s and 400 s
    batch = Batch(client)
    for seconds in (0.02, 0.3, 400.0):
        batch.observe("hub_job_execution_seconds", seconds, tenant="t1", outcome="succeeded")
    batch.flush()
    # Then the buckets are cumulative, +Inf counts all three, and the sum is theirs
    samples = scrape(client)
    labels = (("outcome", "succeeded"), ("tenant", "t1"))
    buckets = {dict(key)["le"]: value for key, value in samples["hub_job_execution_seconds_bucket"].items()}
    assert buckets["0.01"] == 0
    assert buckets["0.025"] == 1
    assert buckets["0.5"] == 2
    assert buckets["300.0"] == 2
    assert buckets["+Inf"] == 3
    assert samples["hub_job_execution_seconds_count"][labels] == 3
    assert samples["hub_job_execution_seconds_sum"][labels] == pytest.approx(400.32)


def test_every_metric_is_shown_even_before_anything_happened(client: fakeredis.FakeRedis) -> None:
    # When nothing was recorded yet, then every family is still described (HELP and TYPE)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(client))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    for name in metrics.COUNTERS:
        assert f"# TYPE {name} counter" in text, name
    for name in metrics.HISTOGRAMS:
        assert f"# TYPE {name} histogram" in text, name


def test_a_label_cannot_break_the_encoding(client: fakeredis.FakeRedis) -> None:
    # Given a label value holding the encoding's separators
    batch = Batch(client)
    batch.inc("hub_callbacks_total", outcome="a|b,c=d")
    batch.flush()
    # Then it is shown, with the separators replaced, as one series
    assert scrape(client)["hub_callbacks_total"] == {(("outcome", "a_b_c_d"),): 1}


def test_an_unknown_metric_is_a_programming_error(client: fakeredis.FakeRedis) -> None:
    with pytest.raises(AssertionError):
        Batch(client).inc("hub_not_a_metric_total")


def test_redis_down_drops_the_batch_without_failing() -> None:
    # Given Redis that does not answer (nothing listens on port 1 of loopback)
    batch = Batch(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    batch.inc("hub_jobs_submitted_total", tenant="t1", action="request")
    # When the batch is flushed, then nothing is raised and the batch is emptied
    batch.flush()
    assert batch.counts == {}


def test_no_client_records_nothing() -> None:
    batch = Batch(None)
    batch.inc("hub_jobs_submitted_total", tenant="t1", action="request")
    batch.flush()
    assert batch.counts == {}
