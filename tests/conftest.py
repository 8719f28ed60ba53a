"""Fixtures shared by every tier.

Databases: ``database_url`` is parametrized over ``sqlite`` (always) and ``postgres`` (when
``HUB_TEST_DATABASE_URL`` names a server: a fresh database is created for the test session
and dropped after it). Every test gets migrated, empty tables.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fakeredis
import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, SQLModel

import models.tables  # noqa: F401
from api_shim import embedded_redis
from api_shim.app import create_app
from models.db import make_engine
from models.migrate import upgrade
from models.settings import Settings
from models.tenants import create_tenant, issue_key
from models.vault import Vault, generate_key
from tests import processes
from worker import guard, tls, upstream
from worker.executor import Runtime
from worker.tokens import TokenCache

TEST_DATABASE_URL = os.environ.get("HUB_TEST_DATABASE_URL")
TEST_REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL")
TEST_MASTER_KEY = generate_key()


def _normalize(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session."""
    if not TEST_DATABASE_URL:
        pytest.skip("HUB_TEST_DATABASE_URL is not set")
    admin_url = make_url(_normalize(TEST_DATABASE_URL))
    name = f"hub_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = admin_url.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    from models.db import _engines

    for key in [k for k in _engines if k[1] == url]:
        _engines.pop(key).dispose()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database with empty tables: SQLite, then PostgreSQL when configured."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'hub.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    names = ", ".join(f'"{t.name}"' for t in SQLModel.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(sa.text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()
    yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine on the test database."""
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server: the configured one, flushed, or one started for this session."""
    if TEST_REDIS_URL:
        client = redis.Redis.from_url(TEST_REDIS_URL)
        client.flushdb()
        client.close()
        yield TEST_REDIS_URL
        return
    directory = tmp_path_factory.mktemp("redis")
    binary, _origin = embedded_redis.find_redis_server()
    port = processes.free_port()
    log = directory / "redis.log"
    server = processes.start(embedded_redis.server_command(binary, port, directory), dict(os.environ), log)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        processes.wait_until(lambda: bool(client.ping()), "redis", process=server, log=log)
        client.close()
        yield url
    finally:
        processes.stop(server)


def new_tenant(engine: Engine, name: str) -> tuple[str, str]:
    """A tenant named ``name`` and one API key of it: ``(tenant_id, key)``."""
    with Session(engine) as session:
        tenant = create_tenant(session, name=name)
        key = issue_key(session, tenant_id=tenant.id)
        session.commit()
        return tenant.id, key


@dataclass
class RecordingQueue:
    """Stands in for the broker in API tests: records what would have been sent."""

    sent: list[str] = field(default_factory=list)
    down: bool = False

    def __call__(self, job_id: str) -> None:
        from models.errors import BrokerUnavailable

        if self.down:
            raise BrokerUnavailable()
        self.sent.append(job_id)


@dataclass
class Api:
    """A test client of the API with two tenants, ``a`` and ``b``."""

    client: TestClient
    queue: RecordingQueue
    engine: Engine
    tenant_a: str
    key_a: str
    tenant_b: str
    key_b: str

    def headers(self, tenant: str = "a") -> dict[str, str]:
        """The ``Authorization`` header of tenant ``a`` or ``b``."""
        return {"Authorization": f"Bearer {self.key_a if tenant == 'a' else self.key_b}"}


def test_settings(database_url: str, **overrides: object) -> Settings:
    """Settings for a test: the given database, loopback and http allowed."""
    values: dict[str, object] = {
        "database_url": database_url,
        "redis_url": TEST_REDIS_URL or "redis://127.0.0.1:1/0",
        "allow_http": True,
        "allow_private_destinations": True,
        "master_keys": TEST_MASTER_KEY,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


test_settings.__test__ = False  # type: ignore[attr-defined]


def in_process_runtime(
    settings: Settings,
    engine: Engine,
    transport: httpx.BaseTransport | None,
    resolve: Callable[[str, int], list[str]],
    redis_client: redis.Redis | None = None,
) -> Runtime:
    """A worker runtime in this process: the given transport (None: real connections, for
    servers the test runs on loopback) and resolver, and a token cache on fakeredis unless a
    real client is given."""
    vault = Vault.from_setting(settings.master_keys_value())
    return Runtime(
        settings=settings,
        engine=engine,
        client=upstream.build_client(settings, transport=transport or guard.PinnedTransport(tls.context(settings))),
        vault=vault,
        tokens=TokenCache(redis_client or fakeredis.FakeRedis(), vault, settings),
        resolve=resolve,
    )


@pytest.fixture
def api(engine: Engine, database_url: str) -> Iterator[Api]:
    """The API in-process on the test database, with a recording queue and two tenants."""
    queue = RecordingQueue()
    app = create_app(test_settings(database_url), engine=engine, enqueue=queue)
    tenant_a, key_a = new_tenant(engine, "tenant-a")
    tenant_b, key_b = new_tenant(engine, "tenant-b")
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client, queue, engine, tenant_a, key_a, tenant_b, key_b)
