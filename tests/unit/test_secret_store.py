"""A connection's secrets in the database: stored sealed, opened only by their own connection,
and re-encrypted under a new master key by ``rotate`` (which can be interrupted and rerun)."""

from __future__ import annotations

import os
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from models import errors, secrets
from models.base import as_utc
from models.tables import Connection, Secret
from models.vault import Sealed, Vault, key_id
from tests.conftest import new_tenant

SECRET_TABLE: sa.Table = SQLModel.metadata.tables["secret"]

K1 = os.urandom(32)
K2 = os.urandom(32)
K3 = os.urandom(32)

TEMPLATE = {
    "service_name": "Example",
    "integration_method": "rest",
    "auth_type": "api_key",
    "auth_headers": [{"name": "X-Client-Key", "required": True, "default": None}],
    "verbs": ["GET", "POST"],
}


def new_connection(engine: Engine, tenant_id: str, name: str) -> str:
    """A connection row of the tenant, made directly; its id."""
    with Session(engine) as session:
        connection = Connection(
            tenant_id=tenant_id, name=name, allowed_hosts=[], auth_header_values={}, template=dict(TEMPLATE)
        )
        session.add(connection)
        session.commit()
        return connection.id


@dataclass
class World:
    engine: Engine
    tenant_id: str
    connection_a: str
    connection_b: str

    def put(self, vault: Vault, name: str, value: str, connection_id: str | None = None) -> None:
        with Session(self.engine) as session:
            secrets.put(session, vault, tenant_id=self.tenant_id,
                        connection_id=connection_id or self.connection_a, name=name, value=value)
            session.commit()

    def open(self, vault: Vault, *names: str, connection_id: str | None = None,
             tenant_id: str | None = None) -> dict[str, str]:
        with Session(self.engine) as session:
            return secrets.open_secrets(session, vault, tenant_id=tenant_id or self.tenant_id,
                                        connection_id=connection_id or self.connection_a, names=names)

    def raw_rows(self) -> list[dict[str, Any]]:
        """Every secret row as the database holds it, read with SQLAlchemy Core."""
        with self.engine.connect() as connection:
            result = connection.execute(sa.select(SECRET_TABLE).order_by(SECRET_TABLE.c.id))
            return [dict(row._mapping) for row in result]

    def key_ids(self) -> list[str]:
        return [row["key_id"] for row in self.raw_rows()]


@pytest.fixture
def world(engine: Engine) -> World:
    tenant_id, _key = new_tenant(engine, "tenant-a")
    return World(engine, tenant_id, new_connection(engine, tenant_id, "crm"), new_connection(engine, tenant_id, "erp"))


def as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


# --- put and open ----------------------------------------------------------------------------


def test_a_secret_that_was_put_opens_to_its_value(world: World) -> None:
    # Given a secret put on a connection
    vault = Vault([K1])
    world.put(vault, "client_secret", "s3cr3t-\u00e9-value")
    # When the connection's job opens it
    opened = world.open(vault, "client_secret")
    # Then it has the value that was put
    assert opened == {"client_secret": "s3cr3t-\u00e9-value"}


def test_a_second_put_replaces_the_value(world: World) -> None:
    # Given a secret put once
    vault = Vault([K1])
    world.put(vault, "client_secret", "first-value-1111")
    [before] = world.raw_rows()
    time.sleep(0.01)
    # When it is put again with another value
    world.put(vault, "client_secret", "second-value-2222")
    # Then there is still one row, it opens to the new value, and only updated_at moved
    [after] = world.raw_rows()
    assert world.open(vault, "client_secret") == {"client_secret": "second-value-2222"}
    assert after["id"] == before["id"]
    assert as_utc(after["created_at"]) == as_utc(before["created_at"])
    moved_from, moved_to = as_utc(before["updated_at"]), as_utc(after["updated_at"])
    assert moved_from is not None and moved_to is not None and moved_to > moved_from
    assert after["nonce"] != before["nonce"]


def test_the_database_holds_no_plaintext(world: World) -> None:
    # Given two secrets put on a connection
    vault = Vault([K1])
    values = {"client_secret": "PLAINTEXT-" + uuid.uuid4().hex, "api.key-2": "\u00e9t\u00e9-" + uuid.uuid4().hex}
    for name, value in values.items():
        world.put(vault, name, value)
    # When the rows are read straight from the database
    rows = world.raw_rows()
    # Then no column of any row holds a value, in UTF-8 or its hex part alone
    assert sorted(row["name"] for row in rows) == sorted(values)
    for row in rows:
        assert row["key_id"] == key_id(K1)
        assert len(as_bytes(row["nonce"])) == 12
        for column, stored in row.items():
            for value in values.values():
                assert value.encode() not in as_bytes(stored), column
                assert value[-32:].encode() not in as_bytes(stored), column


# --- usable only by its own connection -------------------------------------------------------


def test_a_missing_secret_is_named(world: World) -> None:
    # Given a connection with one secret
    vault = Vault([K1])
    world.put(vault, "client_secret", "s3cr3t-value")
    # When a job opens it together with one that does not exist
    with pytest.raises(errors.SecretMissing) as caught:
        world.open(vault, "client_secret", "refresh_token")
    # Then the error names the missing one, and not the value of the other
    assert caught.value.code == "secret_missing"
    assert "refresh_token" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_opening_no_secrets_gives_nothing(world: World) -> None:
    # Given a connection without secrets
    # When a job opens none
    # Then it gets an empty mapping
    assert world.open(Vault([K1])) == {}


def test_a_secret_is_not_found_through_another_connection(world: World) -> None:
    # Given a secret of connection A
    vault = Vault([K1])
    world.put(vault, "client_secret", "s3cr3t-of-a")
    # When connection B (same tenant) asks for a secret of that name
    # Then it has none
    with pytest.raises(errors.SecretMissing):
        world.open(vault, "client_secret", connection_id=world.connection_b)
    # ... while A still has it
    assert world.open(vault, "client_secret") == {"client_secret": "s3cr3t-of-a"}


def test_a_secret_is_not_found_for_another_tenant(world: World) -> None:
    # Given a secret of tenant A's connection
    vault = Vault([K1])
    world.put(vault, "client_secret", "s3cr3t-of-a")
    other_tenant, _key = new_tenant(world.engine, "tenant-b")
    # When tenant B asks for it through A's connection id
    # Then it is not there
    with pytest.raises(errors.SecretMissing):
        world.open(vault, "client_secret", tenant_id=other_tenant)


def test_two_connections_keep_separate_values_under_one_name(world: World) -> None:
    # Given the same secret name on two connections, with different values
    vault = Vault([K1])
    world.put(vault, "client_secret", "value-of-a", connection_id=world.connection_a)
    world.put(vault, "client_secret", "value-of-b", connection_id=world.connection_b)
    # When each connection opens it
    # Then each gets its own
    assert world.open(vault, "client_secret") == {"client_secret": "value-of-a"}
    assert world.open(vault, "client_secret", connection_id=world.connection_b) == {"client_secret": "value-of-b"}


@pytest.mark.parametrize("target", ["other connection", "other tenant"])
def test_a_secret_row_copied_to_another_connection_does_not_decrypt(world: World, target: str) -> None:
    # Given a secret of connection A
    vault = Vault([K1])
    world.put(vault, "client_secret", "s3cr3t-of-a")
    [row] = world.raw_rows()
    if target == "other connection":
        tenant_id, connection_id = world.tenant_id, world.connection_b
    else:
        tenant_id, _ = new_tenant(world.engine, "tenant-b")
        connection_id = new_connection(world.engine, tenant_id, "crm")
    # When its row is copied, ciphertext, nonce and key id alike, to connection B
    with world.engine.begin() as connection:
        connection.execute(sa.insert(SECRET_TABLE).values(
            {**row, "id": str(uuid.uuid4()), "tenant_id": tenant_id, "connection_id": connection_id}
        ))
    # Then B finds the row but cannot read it, and the message does not show the value
    with pytest.raises(errors.SecretUnreadable) as caught:
        world.open(vault, "client_secret", connection_id=connection_id, tenant_id=tenant_id)
    assert "s3cr3t" not in str(caught.value)
    # ... and A still reads its own
    assert world.open(vault, "client_secret") == {"client_secret": "s3cr3t-of-a"}


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["client_secret", "api.key-2", "_token", "A", "a" * 128, "x-1.y_2"])
def test_a_good_secret_name_is_accepted(name: str) -> None:
    # Given a name of letters, digits, _ . - starting with a letter or _, at most 128 long
    # When it is checked
    # Then nothing is raised
    secrets.check_name(name)


@pytest.mark.parametrize(
    "name",
    ["1abc", "a b", "a/b", "", "a" * 129, "-abc", ".abc", "a{b}", "caf\u00e9", "a\tb", "\nabc"],
)
def test_a_bad_secret_name_is_refused(name: str) -> None:
    # Given a name a {{secrets.NAME}} placeholder could not refer to
    # When it is checked
    with pytest.raises(errors.InvalidInput) as caught:
        secrets.check_name(name)
    # Then it is refused as a validation error pointing at the name
    assert caught.value.code == "validation_error"
    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["loc"] == ["path", "name"]


def test_a_secret_name_with_a_trailing_newline_is_refused() -> None:
    # Given a good name followed by a newline
    # When it is checked
    # Then it is refused
    with pytest.raises(errors.InvalidInput):
        secrets.check_name("client_secret\n")


def test_put_refuses_a_bad_name_and_stores_nothing(world: World) -> None:
    # Given a name with a slash
    # When a secret is put under it
    with pytest.raises(errors.InvalidInput):
        world.put(Vault([K1]), "a/b", "s3cr3t-value")
    # Then no row was written
    assert world.raw_rows() == []


# --- rotation --------------------------------------------------------------------------------


def put_many(world: World, vault: Vault, count: int) -> dict[tuple[str, str], str]:
    """``count`` secrets spread over three connections: {(connection id, name): value}."""
    connections = [world.connection_a, world.connection_b, new_connection(world.engine, world.tenant_id, "billing")]
    values = {(connections[i % 3], f"secret_{i}"): f"value-{i}-{uuid.uuid4().hex}" for i in range(count)}
    with Session(world.engine) as session:
        for (connection_id, name), value in values.items():
            secrets.put(session, vault, tenant_id=world.tenant_id, connection_id=connection_id, name=name, value=value)
        session.commit()
    return values


def assert_all_readable(world: World, vault: Vault, values: dict[tuple[str, str], str]) -> None:
    by_connection: dict[str, dict[str, str]] = {}
    for (connection_id, name), value in values.items():
        by_connection.setdefault(connection_id, {})[name] = value
    for connection_id, expected in by_connection.items():
        assert world.open(vault, *expected, connection_id=connection_id) == expected


def test_rotation_moves_every_secret_to_the_new_key(world: World) -> None:
    # Given 250 secrets on three connections, sealed with k1
    values = put_many(world, Vault([K1]), 250)
    assert set(world.key_ids()) == {key_id(K1)}
    # When k2 is put in front of k1 and the secrets are rotated in batches of 40
    report = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=40)
    # Then all 250 were resealed, all are under k2, and k2 alone opens every one
    assert report.resealed == 250
    assert report.unreadable == 0
    assert world.key_ids() == [key_id(K2)] * 250
    assert_all_readable(world, Vault([K2]), values)
    # ... while k1 alone no longer opens any
    with pytest.raises(errors.SecretUnreadable):
        world.open(Vault([K1]), "secret_0", connection_id=next(iter(values))[0])


def test_an_interrupted_rotation_can_be_run_again(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given 250 secrets sealed with k1
    values = put_many(world, Vault([K1]), 250)
    vault = Vault([K2, K1])
    # When a rotation in batches of 40 dies at the 95th secret, in its third batch
    calls = 0
    real_reseal = vault.reseal

    def dying_reseal(sealed: Sealed, **row: str) -> Sealed:
        nonlocal calls
        calls += 1
        if calls == 95:
            raise RuntimeError("worker killed")
        return real_reseal(sealed, **row)

    monkeypatch.setattr(vault, "reseal", dying_reseal)
    with pytest.raises(RuntimeError, match="worker killed"):
        secrets.rotate(world.engine, vault, batch_size=40)
    # Then the two committed batches are under k2, the failed batch was rolled back,
    # and every secret can still be read with both keys
    first_run = world.key_ids().count(key_id(K2))
    assert first_run == 80
    assert world.key_ids().count(key_id(K1)) == 170
    assert_all_readable(world, Vault([K2, K1]), values)

    # When the rotation is run again, normally
    monkeypatch.undo()
    report = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=40)
    # Then it finishes the rest: nothing lost, all under k2, 250 resealed in all
    assert report.resealed == 170
    assert first_run + report.resealed == 250
    assert world.key_ids() == [key_id(K2)] * 250
    assert_all_readable(world, Vault([K2]), values)

    # When it is run a third time
    again = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=40)
    # Then there is nothing left to do
    assert (again.resealed, again.unreadable) == (0, 0)


def test_a_secret_under_an_unknown_key_is_counted_and_left_alone(world: World) -> None:
    # Given secrets under k1, and one sealed with k3, which the rotating vault does not have
    values = put_many(world, Vault([K1]), 10)
    world.put(Vault([K3]), "legacy_token", "legacy-value-3333")
    [legacy_before] = [row for row in world.raw_rows() if row["name"] == "legacy_token"]
    # When the secrets are rotated to k2, in small batches, twice
    report = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=3)
    second = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=3)
    # Then the others were resealed, the k3 one was counted unreadable each time
    assert (report.resealed, report.unreadable) == (10, 1)
    assert (second.resealed, second.unreadable) == (0, 1)
    # ... and its row is byte-for-byte as it was, still readable with k3
    [legacy_after] = [row for row in world.raw_rows() if row["name"] == "legacy_token"]
    assert legacy_after == legacy_before
    assert world.open(Vault([K3]), "legacy_token") == {"legacy_token": "legacy-value-3333"}
    assert_all_readable(world, Vault([K2]), values)


def test_a_damaged_secret_does_not_stop_the_rotation(world: World) -> None:
    # Given secrets under k1, one of which has a damaged (truncated) nonce in the database
    values = put_many(world, Vault([K1]), 5)
    world.put(Vault([K1]), "aaa_damaged", "damaged-value")
    with world.engine.begin() as connection:
        connection.execute(sa.update(SECRET_TABLE).where(SECRET_TABLE.c.name == "aaa_damaged")
                           .values(nonce=b"\x00" * 4))
    # When the secrets are rotated
    report = secrets.rotate(world.engine, Vault([K2, K1]), batch_size=2)
    # Then the damaged one is counted unreadable and the others are moved
    assert (report.resealed, report.unreadable) == (5, 1)
    assert_all_readable(world, Vault([K2]), values)


def test_a_value_put_during_rotation_is_not_overwritten(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given secrets under k1
    values = put_many(world, Vault([K1]), 6)
    vault = Vault([K2, K1])
    [first, *_] = world.raw_rows()
    real_reseal: Callable[..., Sealed] = vault.reseal

    # When a new value of the first secret is PUT while the rotation has read it but not written it
    def reseal_after_a_put(sealed: Sealed, **row: str) -> Sealed:
        resealed = real_reseal(sealed, **row)
        if row["name"] == first["name"] and row["connection_id"] == first["connection_id"]:
            world.put(vault, first["name"], "new-value-put-meanwhile", connection_id=first["connection_id"])
        return resealed

    monkeypatch.setattr(vault, "reseal", reseal_after_a_put)
    report = secrets.rotate(world.engine, vault, batch_size=100)
    # Then the rotation skipped that row, and the new value is what the connection reads
    assert report.resealed == 5
    assert world.open(Vault([K2]), first["name"], connection_id=first["connection_id"]) == {
        first["name"]: "new-value-put-meanwhile"
    }
    values.pop((first["connection_id"], first["name"]))
    assert_all_readable(world, Vault([K2]), values)


secret_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + "_"),
    st.text(alphabet=string.ascii_letters + string.digits + "_.-", max_size=30),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.dictionaries(secret_names, st.text(max_size=300), max_size=20))
def test_rotation_keeps_every_value(engine: Engine, pairs: dict[str, str]) -> None:
    # Given any secrets, on a connection of their own, sealed with k1
    tenant_id, _key = new_tenant(engine, f"tenant-{uuid.uuid4()}")
    connection_id = new_connection(engine, tenant_id, "crm")
    with Session(engine) as session:
        for name, value in pairs.items():
            secrets.put(session, Vault([K1]), tenant_id=tenant_id, connection_id=connection_id, name=name, value=value)
        session.commit()
    # When they are rotated to k2 (secrets of earlier examples are already under k2)
    report = secrets.rotate(engine, Vault([K2, K1]), batch_size=7)
    # Then exactly these were resealed, and k2 alone reads every value back identical
    assert report.resealed == len(pairs)
    with Session(engine) as session:
        rows = session.exec(select(Secret).where(Secret.connection_id == connection_id)).all()
        assert {row.key_id for row in rows} <= {key_id(K2)}
        opened = secrets.open_secrets(session, Vault([K2]), tenant_id=tenant_id, connection_id=connection_id,
                                      names=pairs)
    assert opened == pairs
