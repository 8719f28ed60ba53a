"""The command line as operators use it: tenants, master keys, and refusing to start without one."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from models.db import make_engine
from models.secrets import open_secrets, put
from models.tables import Connection, Secret
from models.tenants import tenant_for_key
from models.vault import Vault
from tests.conftest import TEST_REDIS_URL
from tests.processes import HUB, free_port, http_ok, start, stop, wait_until

pytestmark = pytest.mark.e2e


def hub(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``integration-hub ARGS`` and return what it printed."""
    return subprocess.run([*HUB, *args], env=env, capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """An environment with a migrated SQLite database of its own."""
    values = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    values["HUB_DATABASE_URL"] = f"sqlite:///{tmp_path / 'hub.db'}"
    values["HUB_DATA_DIR"] = str(tmp_path)
    hub("migrate", env=values)
    yield values


def test_tenants_create_prints_a_working_key_last(env: dict[str, str]) -> None:
    # When an operator creates a tenant
    done = hub("tenants", "create", "acme", "--rate", "5", "--burst", "10", "--max-inflight", "20", env=env)
    key = done.stdout.strip().splitlines()[-1]
    # Then the last line alone is a key that authenticates as that tenant, with its limits
    engine = make_engine(env["HUB_DATABASE_URL"])
    with Session(engine) as session:
        tenant = tenant_for_key(session, key)
        assert tenant is not None and tenant.name == "acme"
        assert (tenant.rate_per_s, tenant.burst, tenant.max_inflight) == (5.0, 10, 20)
    engine.dispose()
    # and a second tenant of the same name is refused, with a message and no traceback
    again = hub("tenants", "create", "acme", env=env, check=False)
    assert again.returncode == 1
    assert "exists" in again.stderr and "Traceback" not in again.stderr


def test_keys_rotate_moves_every_secret_to_the_new_key(env: dict[str, str]) -> None:
    # Given secrets sealed under an old key
    old = hub("keys", "generate", env=env).stdout.strip().splitlines()[-1]
    new = hub("keys", "generate", env=env).stdout.strip().splitlines()[-1]
    assert old != new and len(Vault.from_setting(old).current_key_id) == 16
    engine = make_engine(env["HUB_DATABASE_URL"])
    tenant_key = hub("tenants", "create", "keys", env=env).stdout.strip().splitlines()[-1]
    with Session(engine) as session:
        tenant = tenant_for_key(session, tenant_key)
        assert tenant is not None
        connection = Connection(tenant_id=tenant.id, name="c", allowed_hosts=[], auth_header_values={},
                                template={"auth_type": "none", "auth_headers": [], "verbs": ["GET"]})
        session.add(connection)
        session.commit()
        tenant_id, connection_id = tenant.id, connection.id
        values = {f"s{i}": f"value-{i}" for i in range(7)}
        for name, value in values.items():
            put(session, Vault.from_setting(old), tenant_id=tenant_id, connection_id=connection_id,
                name=name, value=value)
        session.commit()

    # When the new key is put first and the operator rotates (twice: it can run again)
    env = {**env, "HUB_MASTER_KEYS": f"{new},{old}"}
    first = hub("keys", "rotate", "--batch-size", "3", env=env)
    second = hub("keys", "rotate", env=env)

    # Then every secret moved once, and opens with the new key alone
    assert "Re-encrypted 7 secret(s)" in first.stdout
    assert "Re-encrypted 0 secret(s)" in second.stdout
    with Session(engine) as session:
        rows = session.exec(select(Secret)).all()
        assert {row.key_id for row in rows} == {Vault.from_setting(new).current_key_id}
        opened = open_secrets(session, Vault.from_setting(new), tenant_id=tenant_id,
                              connection_id=connection_id, names=values)
    engine.dispose()
    assert opened == values


@pytest.mark.parametrize("command", [["api", "--port", "1"], ["worker", "-c", "1"]])
def test_api_and_worker_refuse_to_start_without_a_master_key(env: dict[str, str], command: list[str]) -> None:
    # Given no HUB_MASTER_KEYS (and a broker that is there, so only the key is missing)
    if TEST_REDIS_URL:
        env = {**env, "HUB_REDIS_URL": TEST_REDIS_URL}
    # When the API or a worker starts, then it stops at once and says how to make a key
    done = hub(*command, env=env, check=False)
    assert done.returncode == 1
    assert "HUB_MASTER_KEYS" in done.stderr and "integration-hub keys generate" in done.stderr
    assert "Traceback" not in done.stderr


def test_flower_asks_for_the_configured_basic_auth(env: dict[str, str], redis_url: str) -> None:
    # Given Flower started the way docker-compose starts it, with HUB_FLOWER_BASIC_AUTH
    port = free_port()
    env = {**env, "HUB_REDIS_URL": redis_url, "HUB_FLOWER_BASIC_AUTH": "ops:s3cret-pass"}
    log = Path(env["HUB_DATA_DIR"]) / "flower.log"
    flower = start([*HUB, "flower", "--port", str(port)], env, log)
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthcheck"), "flower", process=flower, log=log)
        # When someone opens it without credentials, then they are asked for them
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/api/workers", timeout=5).status_code == 401
        # and with the configured ones they get in; the password is in no process argument
        assert httpx.get(f"http://127.0.0.1:{port}/", auth=("ops", "s3cret-pass"), timeout=5).status_code == 200
        assert b"s3cret-pass" not in Path(f"/proc/{flower.pid}/cmdline").read_bytes()
    finally:
        stop(flower)
