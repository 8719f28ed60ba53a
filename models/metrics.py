"""Prometheus metrics of the whole hub, kept in Redis so that every process adds to one set.

The API and every worker process add to counters and histograms in one Redis hash
(``hub:metrics``, a field per series); the API's ``/metrics`` reads the hash and answers it in
the Prometheus text format. So one scrape of any API process shows the work of all workers,
on any host, and a worker that restarts loses nothing. A process batches what one job records
and sends it in one round trip; a Redis error while recording is logged and dropped: metrics
never fail a job.

Labels hold ids and codes only (tenant id, status, error code, HTTP status), never a URL, a
header or a body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import redis
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from models.jobs import FINAL_CHANNEL

log = logging.getLogger("hub.metrics")

KEY = "hub:metrics"

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

COUNTERS: dict[str, str] = {
    "hub_jobs_submitted_total": "Jobs accepted by POST /v1/executions.",
    "hub_jobs_finished_total": "Jobs that reached a final state, by status and error code.",
    "hub_job_retries_total": "Attempts that ended in a retry, by the error that caused it.",
    "hub_upstream_responses_total": "Answers of the web services, by HTTP status.",
    "hub_token_cache_total": "OAuth tokens a job needed: hit (from the cache), miss (fetched), refresh (refetched after a 401).",
    "hub_rate_limit_deferrals_total": "Jobs sent back to wait: over the tenant's rate, held at a due slot, or cooling down.",
    "hub_responses_truncated_total": "Answers cut at the response cap.",
    "hub_callbacks_total": "Callback deliveries tried, by outcome.",
    "hub_sweeper_actions_total": "What the sweeper did, by action.",
}
HISTOGRAMS: dict[str, str] = {
    "hub_job_queue_wait_seconds": "From submission to the start of the first attempt.",
    "hub_job_execution_seconds": "One attempt, from its claim to its outcome.",
}


def _field(name: str, labels: Mapping[str, str]) -> str:
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _parse(raw: str) -> tuple[str, dict[str, str]]:
    name, _, encoded = raw.partition("|")
    labels = dict(part.split("=", 1) for part in encoded.split(",") if part)
    return name, labels


def _label(value: object) -> str:
    # the field encoding's separators cannot appear in a value
    return str(value).replace("|", "_").replace(",", "_").replace("=", "_")


@dataclass
class Batch:
    """What one unit of work records, sent to Redis in one round trip by :meth:`flush`."""

    client: redis.Redis | None
    counts: dict[str, float] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    """Jobs to announce on :data:`~models.jobs.FINAL_CHANNEL` (it wakes ``?wait`` requests)."""

    def announce(self, job_id: str) -> None:
        """Tell the API's waiting requests that the job ``job_id`` is final."""
        self.finished.append(job_id)

    def inc(self, name: str, by: float = 1.0, **labels: object) -> None:
        assert name in COUNTERS, name
        key = _field(name, {k: _label(v) for k, v in labels.items()})
        self.counts[key] = self.counts.get(key, 0.0) + by

    def observe(self, name: str, seconds: float, **labels: object) -> None:
        assert name in HISTOGRAMS, name
        plain = {k: _label(v) for k, v in labels.items()}
        # Only the one bucket the observation falls in: the scrape adds them up into
        # Prometheus's cumulative buckets, so an observation costs one field, not fifteen.
        bound = next((repr(b) for b in SECONDS_BUCKETS if seconds <= b), "+Inf")
        key = _field(name + "_bucket", {**plain, "le": bound})
        self.counts[key] = self.counts.get(key, 0.0) + 1
        total = _field(name + "_sum", plain)
        self.counts[total] = self.counts.get(total, 0.0) + max(0.0, seconds)

    def flush(self) -> None:
        """Add what was recorded to the hub's metrics, then forget it."""
        if self.client is None or not (self.counts or self.finished):
            self.counts.clear()
            self.finished.clear()
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for job_id in self.finished:
                pipe.publish(FINAL_CHANNEL, job_id)
            for key, value in self.counts.items():
                # a histogram's sum holds a float: HINCRBY on it fails, even by a whole number
                if float(value).is_integer() and not key.partition("|")[0].endswith("_sum"):
                    pipe.hincrby(KEY, key, int(value))
                else:
                    pipe.hincrbyfloat(KEY, key, value)
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("metrics not recorded: Redis is unavailable (%s)", type(exc).__name__)
        finally:
            self.counts.clear()
            self.finished.clear()


class HubCollector:
    """A prometheus_client collector that reads the hub's metrics from Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        raw: dict[bytes, bytes] = self.client.hgetall(KEY)  # type: ignore[assignment]
        series = [(_parse(k.decode()), float(v)) for k, v in raw.items()]
        yield from counters(series)
        yield from histograms(series)


def counters(series: Iterable[tuple[tuple[str, dict[str, str]], float]]) -> Iterator[Metric]:
    by_name: dict[str, list[tuple[dict[str, str], float]]] = {name: [] for name in COUNTERS}
    for (name, labels), value in series:
        if name in by_name:
            by_name[name].append((labels, value))
    for name, samples in by_name.items():
        keys = sorted({k for labels, _ in samples for k in labels})
        family = CounterMetricFamily(name.removesuffix("_total"), COUNTERS[name], labels=keys)
        for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())):
            family.add_metric([labels.get(k, "") for k in keys], value)
        yield family


def histograms(series: Iterable[tuple[tuple[str, dict[str, str]], float]]) -> Iterator[Metric]:
    buckets: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, float]] = {}
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for (name, labels), value in series:
        if name.endswith("_bucket") and name.removesuffix("_bucket") in HISTOGRAMS:
            le = labels.pop("le", "+Inf")
            buckets.setdefault((name.removesuffix("_bucket"), tuple(sorted(labels.items()))), {})[le] = value
        elif name.endswith("_sum") and name.removesuffix("_sum") in HISTOGRAMS:
            sums[(name.removesuffix("_sum"), tuple(sorted(labels.items())))] = value
    for name, documentation in HISTOGRAMS.items():
        mine = {series_labels: found for (metric, series_labels), found in buckets.items() if metric == name}
        keys = sorted({k for series_labels in mine for k, _ in series_labels})
        family = HistogramMetricFamily(name, documentation, labels=keys)
        for series_labels, found in sorted(mine.items()):
            ordered, running = [], 0.0
            for bound in [*map(repr, SECONDS_BUCKETS), "+Inf"]:
                running += found.get(bound, 0.0)
                ordered.append((bound, running))
            values = dict(series_labels)
            family.add_metric([values.get(k, "") for k in keys], ordered, sums.get((name, series_labels), 0.0))
        yield family
