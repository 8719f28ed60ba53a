"""Logging of every hub process: text by default, one JSON object per line when
``HUB_LOG_FORMAT=json``.

A job's transitions (submitted, deferred, running, retrying, succeeded, failed, cancelled,
callback, swept) are logged by :func:`job_event` as one line each, with the job id, tenant,
connection, attempt, outcome and timings as fields: ``key=value`` in the message, and in JSON
keys of the object too. Nothing logged here holds a secret, a token, a URL or
a body: the fields are ids, codes, counts and durations.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import datetime, timezone
from typing import Any

HUB_FIELDS = "hub_fields"
"""The ``extra`` key under which :func:`job_event` passes its fields to the formatter."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the job's fields, and the
    exception's type (never its text or traceback, which may quote a URL or a header)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update(getattr(record, HUB_FIELDS, None) or {})
        if record.exc_info and record.exc_info[0] is not None:
            document["exception"] = record.exc_info[0].__name__
        return json.dumps(document, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``time level logger: message`` (a job's fields are already in its message)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def formatter(log_format: str) -> logging.Formatter:
    """The formatter for ``HUB_LOG_FORMAT`` (``json`` or ``text``)."""
    return JsonFormatter() if log_format == "json" else TextFormatter()


def dict_config(log_format: str, level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for a hub process (uvicorn takes it as ``log_config``)."""
    factory = f"{__name__}.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"hub": {"()": factory}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "hub", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"level": level.upper()},
            "httpx": {"level": "WARNING"},  # httpx logs every URL at INFO, and a URL may hold a secret
            "httpcore": {"level": "WARNING"},
        },
    }


def configure(log_format: str, level: str) -> None:
    """Set this process's logging up as :func:`dict_config` says."""
    logging.config.dictConfig(dict_config(log_format, level))


def job_event(logger: logging.Logger, event: str, job_id: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one transition of a job: ``job <id> <event> key=value …`` (ids, codes, timings); in
    JSON the fields are keys of the object as well."""
    shown = {key: value for key, value in fields.items() if value is not None}
    text = "".join(f" {key}={value}" for key, value in shown.items())
    logger.log(level, "job %s %s%s", job_id, event, text,
               extra={HUB_FIELDS: {"event": event, "job_id": job_id, **shown}})
