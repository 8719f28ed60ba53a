"""Settings, the migrations against the models, ids, and the Celery configuration."""

from __future__ import annotations

import base64
import os
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from models.base import new_id
from models.db import _engines, make_engine
from models.migrate import alembic_config, upgrade
from models.settings import DEFAULT_REDIS_URL, Settings
from worker.celery_app import create_app


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No ``HUB_*`` variable and no ``.env`` in reach: only what a test sets counts."""
    for name in list(os.environ):
        if name.upper().startswith("HUB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://hub:pw@db.internal:5432/hub", "postgresql+psycopg://hub:pw@db.internal:5432/hub"),
        ("postgres://hub:pw@db.internal/hub", "postgresql+psycopg://hub:pw@db.internal/hub"),
        ("postgresql+psycopg://hub@db.internal/hub", "postgresql+psycopg://hub@db.internal/hub"),
        ("sqlite:////var/lib/hub/hub.db", "sqlite:////var/lib/hub/hub.db"),
    ],
)
def test_database_url_gets_the_psycopg_driver(clean_env: Path, given: str, expected: str) -> None:
    # Given a database URL as an operator writes it
    settings = Settings(_env_file=None, database_url=given)  # type: ignore[call-arg]
    # When the hub decides which database to use
    url = settings.effective_database_url()
    # Then a bare PostgreSQL URL uses the psycopg 3 driver, and others are kept
    assert url == expected


def test_database_url_is_read_from_the_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given HUB_DATABASE_URL in the environment
    monkeypatch.setenv("HUB_DATABASE_URL", "postgres://hub@db.internal/hub")
    # When settings are read
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Then it is used, normalized
    assert settings.effective_database_url() == "postgresql+psycopg://hub@db.internal/hub"


def test_default_database_is_a_sqlite_file_in_the_data_dir(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given no database URL and a data directory from the environment
    data_dir = clean_env / "hubdata"
    monkeypatch.setenv("HUB_DATA_DIR", str(data_dir))
    # When settings are read
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Then the database is hub.db inside the data directory, as an absolute SQLite URL
    url = settings.effective_database_url()
    assert url == f"sqlite:///{(data_dir / 'hub.db').resolve()}"
    # And it is usable: the migrations create it there
    upgrade(url)
    _dispose(url)
    assert (data_dir / "hub.db").is_file()


def test_default_data_dir_is_dot_hub_in_the_working_directory(clean_env: Path) -> None:
    # Given nothing configured
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # When the database is chosen
    url = settings.effective_database_url()
    # Then it is ./.hub/hub.db, made absolute
    assert url == f"sqlite:///{(clean_env / '.hub' / 'hub.db').resolve()}"


def test_master_keys_are_hidden_in_repr(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given master keys and Flower credentials in the environment
    key_1 = base64.b64encode(b"\x01" * 32).decode()
    key_2 = base64.b64encode(b"\x02" * 32).decode()
    monkeypatch.setenv("HUB_MASTER_KEYS", f"{key_1},{key_2}")
    monkeypatch.setenv("HUB_FLOWER_BASIC_AUTH", "admin:flower-pw-91x")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # When the settings are shown (a log line, a traceback, a JSON dump)
    shown = [repr(settings), str(settings), settings.model_dump_json()]
    # Then no secret value appears, yet the hub can still read them
    for text in shown:
        assert key_1 not in text and key_2 not in text
        assert "flower-pw-91x" not in text
    assert settings.master_keys is not None
    assert settings.master_keys.get_secret_value() == f"{key_1},{key_2}"


def test_broker_falls_back_to_redis_url(clean_env: Path) -> None:
    # Given a Redis URL and no broker URL
    settings = Settings(_env_file=None, redis_url="redis://cache.internal:6380/2")  # type: ignore[call-arg]
    # When the broker is chosen
    # Then it is the Redis URL
    assert settings.effective_broker_url() == "redis://cache.internal:6380/2"


def test_broker_url_overrides_the_broker_alone(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given both HUB_REDIS_URL and HUB_BROKER_URL
    monkeypatch.setenv("HUB_REDIS_URL", "redis://cache.internal:6379/0")
    monkeypatch.setenv("HUB_BROKER_URL", "amqp://guest@mq.internal//")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # When broker and Redis are chosen
    # Then the broker is the override and Redis stays
    assert settings.effective_broker_url() == "amqp://guest@mq.internal//"
    assert settings.effective_redis_url() == "redis://cache.internal:6379/0"


def test_nothing_configured_uses_local_redis_for_both(clean_env: Path) -> None:
    # Given nothing configured
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # When broker and Redis are chosen
    # Then both are the local default
    assert settings.effective_redis_url() == DEFAULT_REDIS_URL
    assert settings.effective_broker_url() == DEFAULT_REDIS_URL


def test_safe_defaults(clean_env: Path) -> None:
    # Given nothing configured
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # When the security-relevant defaults are read
    # Then private destinations and http are off, and the cap is 32 KB
    assert settings.allow_private_destinations is False
    assert settings.allow_http is False
    assert settings.response_cap_bytes == 32_768
    assert settings.retention_days == 7


# --- migrations against the models ------------------------------------------------------


def _dispose(url: str) -> None:
    for key in [k for k in _engines if k[1] == url]:
        _engines.pop(key).dispose()


def _differences(url: str) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, SQLModel.metadata))
    finally:
        engine.dispose()


def test_migrations_on_a_fresh_sqlite_file_match_the_models(tmp_path: Path) -> None:
    # Given a fresh SQLite file
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    # When the migrations are applied
    upgrade(url)
    _dispose(url)
    # Then the schema is what the models describe, to the column type
    assert _differences(url) == []


def test_migrated_database_matches_the_models(database_url: str) -> None:
    # Given a database migrated by the test fixture (SQLite, and PostgreSQL when configured)
    # When its schema is compared to the models
    differences = _differences(database_url)
    # Then there is no difference
    assert differences == []


def test_migrations_go_down_and_up_again(tmp_path: Path) -> None:
    # Given a migrated SQLite file
    url = f"sqlite:///{tmp_path / 'roundtrip.db'}"
    upgrade(url)
    # When it is downgraded to nothing, then upgraded again
    command.downgrade(alembic_config(url), "base")
    engine = make_engine(url)
    with engine.connect() as connection:
        left = set(sa.inspect(connection).get_table_names()) - {"alembic_version"}
    engine.dispose()
    upgrade(url)
    _dispose(url)
    # Then the downgrade removed every table, and the upgrade restored the schema
    assert left == set()
    assert _differences(url) == []


# --- ids ---------------------------------------------------------------------------------


def test_ids_are_unique_version_7_uuids() -> None:
    # Given many ids made in a tight loop
    ids = [new_id() for _ in range(10_000)]
    # When they are parsed
    parsed = [uuid.UUID(value) for value in ids]
    # Then none repeats, each is a canonical RFC 4122 version 7 UUID string
    assert len(set(ids)) == len(ids)
    for value, item in zip(ids, parsed, strict=True):
        assert item.version == 7
        assert value[14] == "7"
        assert item.variant == uuid.RFC_4122
        assert str(item) == value


def test_id_carries_its_creation_time() -> None:
    # Given the time just before and after making an id
    before = time.time_ns() // 1_000_000
    value = new_id()
    after = time.time_ns() // 1_000_000
    # When its 48-bit millisecond timestamp is read back
    ms = uuid.UUID(value).int >> 80
    # Then it is the creation time
    assert before <= ms <= after


def test_ids_made_in_different_milliseconds_sort_in_creation_order() -> None:
    # Given ids made at least a millisecond apart
    ids = []
    for _ in range(50):
        ids.append(new_id())
        time.sleep(0.0015)
    # When they are sorted as strings (as the database sorts them for pagination)
    # Then the order is the creation order
    assert sorted(ids) == ids


def test_ids_sort_in_creation_order() -> None:
    # Given 1,000 ids made in a loop, with a tiny pause every few
    ids = []
    for index in range(1000):
        ids.append(new_id())
        if index % 5 == 4:
            time.sleep(0.0001)
    # When they are sorted as strings
    # Then the order is the creation order
    assert len(set(ids)) == len(ids)
    assert sorted(ids) == ids


# --- Celery ------------------------------------------------------------------------------


def _celery_settings(**values: object) -> Settings:
    return Settings(_env_file=None, redis_url="redis://127.0.0.1:1/0", **values)  # type: ignore[arg-type]


def test_celery_delivers_at_least_once_one_message_at_a_time(clean_env: Path) -> None:
    # Given the hub's Celery app
    app = create_app(_celery_settings())
    # When its configuration is read
    conf = app.conf
    # Then a message is acknowledged after its task ran, and a process takes one at a time
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


@pytest.mark.parametrize("events", [False, True])
def test_celery_sends_task_events_as_the_setting_says(clean_env: Path, events: bool) -> None:
    # Given the hub's Celery app, made with task events off or on
    app = create_app(_celery_settings(task_events=events))
    # When its configuration is read
    # Then the API's task-sent events and the workers' task events are as asked
    assert app.conf.task_send_sent_event is events
    assert app.conf.worker_send_task_events is events


def test_task_events_are_off_unless_hub_task_events_turns_them_on(clean_env: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Given no HUB_TASK_EVENTS, then HUB_TASK_EVENTS=true
    # Then the Celery app sends no task events, then both kinds
    assert create_app(_celery_settings()).conf.worker_send_task_events is False
    assert create_app(_celery_settings()).conf.task_send_sent_event is False
    monkeypatch.setenv("HUB_TASK_EVENTS", "true")
    assert create_app(_celery_settings()).conf.worker_send_task_events is True
    assert create_app(_celery_settings()).conf.task_send_sent_event is True


def test_celery_needs_no_result_backend(clean_env: Path) -> None:
    # Given the hub's Celery app
    app = create_app(_celery_settings())
    # When its configuration is read
    # Then results are ignored and no backend is configured: the job row is the result
    assert app.conf.task_ignore_result is True
    assert app.conf.result_backend is None


def test_celery_uses_the_configured_broker_and_queue(clean_env: Path) -> None:
    # Given settings with a broker override and a queue name
    settings = _celery_settings(broker_url="redis://127.0.0.1:2/5", queue_name="hub.test")
    # When the app is created
    app = create_app(settings)
    # Then it uses them, and only JSON is accepted on the wire
    assert app.conf.broker_url == "redis://127.0.0.1:2/5"
    assert app.conf.task_default_queue == "hub.test"
    assert app.conf.task_serializer == "json"
    assert list(app.conf.accept_content) == ["json"]


def test_execute_task_is_registered_with_late_acks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the worker's tasks module, with the executor replaced by a recorder
    import worker.tasks
    from worker.celery_app import app

    ran: list[tuple[str, object]] = []
    sentinel = object()
    monkeypatch.setattr(worker.tasks, "runtime", lambda: sentinel)
    monkeypatch.setattr(worker.tasks, "run_job", lambda job_id, runtime: ran.append((job_id, runtime)))
    # When the task is looked up by the name the API sends, and run with a job id
    task = app.tasks["hub.execute"]
    task("job-123")
    # Then it is acknowledged late, ignores results, and runs that job with the process runtime
    assert task.name == "hub.execute"
    assert task.acks_late is True
    assert task.ignore_result is True
    assert ran == [("job-123", sentinel)]
