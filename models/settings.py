"""The one settings object, read from ``HUB_*`` environment variables and an optional ``.env``.

Nothing else in the hub reads the environment: processes call :func:`get_settings`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    """Configuration of every hub process. Secret values are ``SecretStr`` and hidden in ``repr``."""

    model_config = SettingsConfigDict(env_prefix="HUB_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default=Path(".hub"), description="Where the dev stack keeps its files.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default a SQLite file in data_dir."
    )
    redis_url: str | None = Field(
        default=None, description="Redis for broker, token cache and rate limits."
    )
    broker_url: str | None = Field(default=None, description="Overrides the broker alone.")
    master_keys: SecretStr | None = Field(
        default=None, description="Comma-separated base64 AES-256 keys; the first encrypts."
    )

    allow_private_destinations: bool = False
    allow_http: bool = False

    response_cap_bytes: int = 32_768
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """The largest request body the API reads; a larger one is ``413 payload_too_large``."""
    retention_days: int = 7
    default_rate_per_s: float = 10.0
    default_burst: int = 20
    default_max_inflight: int = 100
    api_key_cache_s: float = Field(
        default=5.0, ge=0,
        description="How long each API process remembers which tenant an API key belongs to (0: look it up on "
                    "every request). A key revoked in the database keeps working for up to this long.",
    )

    tls_ca_file: Path | None = Field(
        default=None, description="A PEM bundle of the CAs the worker trusts, instead of the system's."
    )
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    pool_timeout_s: float = 5.0
    request_deadline_s: float = 60.0
    """The longest one attempt of a call may take, connect to last byte read: a service that
    keeps sending, each byte within the read timeout, is cut off here (``read_timeout``)."""

    token_leeway_s: float = 60.0
    """A token is dropped from the cache this long before it expires (at most half its life)."""
    token_default_lifetime_s: float = 300.0
    """How long a token whose response has no ``expires_in`` is cached."""
    token_lock_ttl_s: float = 30.0
    token_wait_s: float = 30.0
    """How long a job waits for another worker's token request before it gives up."""
    token_attempts: int = 3
    """Token requests tried this many times on timeouts, connection errors, 429 and 5xx."""
    token_backoff_s: float = 0.5

    default_max_attempts: int = 3
    """Attempts a job gets when its submission does not say (``max_attempts``, at most 10)."""
    retry_base_s: float = 1.0
    """The first retry waits up to this long; each next one up to twice as long (full jitter)."""
    retry_cap_s: float = 60.0
    """No backoff is longer than this."""
    retry_after_cap_s: float = 300.0
    """A service's ``Retry-After`` is honoured up to this many seconds (and cools its connection down)."""
    rate_horizon_s: float = 30.0
    """A job over its tenant's rate reserves a slot at most this far ahead; later, it asks again."""
    rate_max_wait_s: float = 900.0
    """A job that waited this long for its tenant's rate or its connection's cooldown fails ``rate_limited``."""
    job_lease_s: float = 300.0
    """A ``running`` job whose worker has not renewed its lease for this long (plus the job's
    deadline) is taken as lost; a worker renews the leases of its running jobs every third of it."""
    sweep_interval_s: float = 10.0
    """How often the sweeper (Celery beat) looks for lost jobs and expired results."""
    sweep_grace_s: float = 60.0
    """A job still waiting this long after its message was due has lost its message."""
    max_dispatches: int = 5
    """The sweeper sends a lost job again at most this many times, then fails it ``job_lost``."""
    callback_attempts: int = 8
    """Deliveries of a job's ``callback_url`` tried before giving up."""
    callback_backoff_s: float = 2.0
    worker_shutdown_grace_s: float = 30.0
    """On SIGTERM a worker finishes its running jobs for at most this long, then stops cold."""
    broker_visibility_timeout_s: int = 3600
    """An unacknowledged message is delivered again after this long: longer than any countdown."""
    queue_name: str = "hub.jobs"

    max_wait_s: float = 30.0
    """Longest ``?wait=`` a poll may hold (API.md: at most 30 seconds)."""

    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    """``json``: every log line of the API, workers and beat is one JSON object."""
    flower_basic_auth: SecretStr | None = Field(
        default=None, description="user:password that Flower asks for; comma-separate several."
    )
    task_events: bool = False
    """Celery's task events (``task-sent`` from the API and beat, ``task-received``,
    ``-started``, ``-succeeded`` … from the workers): only Flower reads them, and they cost
    about 4 Redis publishes per job, so they are off. Flower (``--enable_events``, its
    default) tells every worker to turn its task events on every 5 seconds, so while Flower
    runs the workers send them anyway: only ``task-sent`` stays off, and a task that a worker
    received before Flower's first broadcast is not shown. ``integration-hub dev`` turns them on."""

    @model_validator(mode="after")
    def _visibility_outlasts_every_countdown(self) -> Settings:
        longest = max(self.rate_horizon_s, self.retry_cap_s, self.retry_after_cap_s, self.job_lease_s)
        if self.broker_visibility_timeout_s <= longest + self.request_deadline_s:
            raise ValueError(
                "HUB_BROKER_VISIBILITY_TIMEOUT_S must be longer than any countdown or lease plus "
                f"the request deadline ({longest + self.request_deadline_s:.0f} s): else a waiting message is "
                "delivered twice"
            )
        if self.job_lease_s <= self.request_deadline_s:
            raise ValueError("HUB_JOB_LEASE_S must be longer than HUB_REQUEST_DEADLINE_S")
        return self

    def master_keys_value(self) -> str | None:
        """``HUB_MASTER_KEYS`` as given, for the vault."""
        return self.master_keys.get_secret_value() if self.master_keys else None

    def effective_database_url(self) -> str:
        """The database to use: ``database_url``, else a SQLite file in the data directory.

        A bare ``postgresql://`` URL is given the psycopg 3 driver that the hub ships with.
        """
        url = self.database_url or f"sqlite:///{(self.data_dir / 'hub.db').resolve()}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    def effective_redis_url(self) -> str:
        """Redis for token cache and rate limits: ``redis_url`` or a local default."""
        return self.redis_url or DEFAULT_REDIS_URL

    def effective_broker_url(self) -> str:
        """The Celery broker: ``broker_url``, else the Redis URL."""
        return self.broker_url or self.effective_redis_url()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return Settings()
