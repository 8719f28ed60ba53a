"""Log lines: a job's transition as text and as JSON, with its fields and nothing else."""

from __future__ import annotations

import json
import logging

import pytest

from models.logs import JsonFormatter, TextFormatter, dict_config, job_event


def record_of(caplog: pytest.LogCaptureFixture, **fields: object) -> logging.LogRecord:
    logger = logging.getLogger("hub.test")
    with caplog.at_level(logging.INFO, logger="hub.test"):
        job_event(logger, "retrying", "job-1", **fields)
    (record,) = caplog.records
    return record


def test_a_transition_as_json_has_its_fields_as_keys(caplog: pytest.LogCaptureFixture) -> None:
    # When a retry is logged with its fields
    record = record_of(caplog, tenant="t1", connection="c1", attempt=2, outcome="upstream_status", elapsed_ms=41.7,
                       status_code=None)
    # Then the JSON line holds them as keys, beside the time, level, logger and message
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "retrying" and line["job_id"] == "job-1"
    assert (line["tenant"], line["connection"], line["attempt"]) == ("t1", "c1", 2)
    assert line["outcome"] == "upstream_status" and line["elapsed_ms"] == 41.7
    assert line["level"] == "info" and line["logger"] == "hub.test"
    assert line["message"] == "job job-1 retrying tenant=t1 connection=c1 attempt=2 outcome=upstream_status elapsed_ms=41.7"
    assert "status_code" not in line  # None is left out
    assert line["ts"].endswith("+00:00")


def test_a_transition_as_text_is_one_line_with_key_value_pairs(caplog: pytest.LogCaptureFixture) -> None:
    record = record_of(caplog, tenant="t1", attempt=1)
    line = TextFormatter().format(record)
    assert line.endswith("INFO hub.test: job job-1 retrying tenant=t1 attempt=1")
    assert "\n" not in line


def test_json_shows_an_exceptions_type_but_not_its_text() -> None:
    # Given an error whose text quotes something secret (as a URL in an exception might)
    try:
        raise ValueError("https://api.example/?token=s3cr3t")
    except ValueError:
        record = logging.LogRecord("hub.worker", logging.ERROR, __file__, 1, "job %s failed", ("job-1",),
                                   exc_info=__import__("sys").exc_info())
    # Then its JSON line names the type only
    line = JsonFormatter().format(record)
    assert json.loads(line)["exception"] == "ValueError"
    assert "s3cr3t" not in line and "Traceback" not in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_process_configuration_quiets_httpx(log_format: str) -> None:
    # httpx logs every request's URL at INFO, and a URL may hold a secret
    config = dict_config(log_format, "INFO")
    assert config["loggers"]["httpx"]["level"] == "WARNING"
    assert config["formatters"]["hub"]["()"].endswith("JsonFormatter" if log_format == "json" else "TextFormatter")
