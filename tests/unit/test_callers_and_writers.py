"""Two things the benchmark's profile asked for: which tenant an API key names, remembered for
a few seconds per process (:class:`models.tenants.Callers`), and SQLite writers of one process
taking turns instead of sleeping in SQLite's busy handler (:func:`models.db.writing`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import tenants
from models.base import utcnow
from models.db import make_engine, writing
from models.migrate import upgrade
from models.tables import ApiKey
from models.tenants import Callers, create_tenant, hash_key, issue_key


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def tenant_with_key(engine: Engine, name: str = "acme") -> tuple[str, str]:
    with Session(engine) as session:
        tenant = create_tenant(session, name=name)
        key = issue_key(session, tenant_id=tenant.id)
        session.commit()
        return tenant.id, key


def revoke(engine: Engine, key: str) -> None:
    with Session(engine) as session:
        session.execute(sa.update(ApiKey).where(ApiKey.key_hash == hash_key(key)).values(revoked_at=utcnow()))  # type: ignore[arg-type]
        session.commit()


def test_a_key_names_its_tenant_and_is_remembered_until_its_time_is_up(engine: Engine,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tenant_id, key = tenant_with_key(engine)
    clock = [1000.0]
    monkeypatch.setattr(tenants.time, "monotonic", lambda: clock[0])
    callers = Callers(ttl_s=5)
    with Session(engine) as session:
        caller = callers.lookup(session, key)
    assert caller is not None and (caller.id, caller.name) == (tenant_id, "acme")

    revoke(engine, key)
    clock[0] += 4.9
    with Session(engine) as session:
        assert callers.lookup(session, key) == caller  # remembered: the database is not asked
    clock[0] += 0.2
    with Session(engine) as session:
        assert callers.lookup(session, key) is None  # asked again, and refused


def test_without_a_time_to_remember_every_lookup_asks_the_database(engine: Engine) -> None:
    _, key = tenant_with_key(engine)
    callers = Callers(ttl_s=0)
    with Session(engine) as session:
        assert callers.lookup(session, key) is not None
    revoke(engine, key)
    with Session(engine) as session:
        assert callers.lookup(session, key) is None


def test_an_unknown_key_is_not_remembered(engine: Engine) -> None:
    tenant_id, _ = tenant_with_key(engine)
    callers = Callers(ttl_s=60)
    key = "hub_" + "k" * 43
    with Session(engine) as session:
        assert callers.lookup(session, key) is None
        session.add(ApiKey(tenant_id=tenant_id, prefix=key[:12], key_hash=hash_key(key)))
        session.commit()
        found = callers.lookup(session, key)
    assert found is not None and found.id == tenant_id


def test_the_remembered_keys_are_bounded(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Callers, "MAX_KEYS", 3)
    keys = [tenant_with_key(engine, f"t{n}")[1] for n in range(4)]
    callers = Callers(ttl_s=60)
    with Session(engine) as session:
        for key in keys:
            assert callers.lookup(session, key) is not None
    assert 1 <= len(callers._known) <= 3


def test_sqlite_writers_of_one_process_take_turns(engine: Engine) -> None:
    first, second = Session(engine), Session(engine)
    order: list[str] = []

    def other() -> None:
        with writing(second):
            order.append("second")

    with writing(first):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join(0.3)
        assert thread.is_alive(), "the second writer went in while the first held the turn"
        order.append("first done")
    thread.join(5)
    assert order == ["first done", "second"]
    first.close()
    second.close()


def test_other_databases_need_no_turns() -> None:
    engine = sa.create_engine("postgresql+psycopg://hub@127.0.0.1:1/hub")  # never connected
    with Session(engine) as session:
        assert isinstance(writing(session), nullcontext)
    engine.dispose()


def test_sqlite_writers_of_other_processes_take_turns_too(engine: Engine, tmp_path: Path) -> None:
    """A writer in another process waits for the turn this one holds (a lock on a file beside
    the database), and goes as soon as it is released."""
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from sqlmodel import Session\n"
        "from models.db import make_engine, writing\n"
        "engine = make_engine(sys.argv[1])\n"
        "print('waiting', flush=True)\n"
        "with Session(engine) as session, writing(session):\n"
        "    print('in', flush=True)\n"
    )
    with Session(engine) as session:
        with writing(session):
            assert Path(f"{engine.url.database}.writers").exists()
            other = subprocess.Popen([sys.executable, "-c", script, str(engine.url)], stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).resolve().parents[2])
            assert other.stdout is not None
            assert other.stdout.readline().strip() == "waiting"
            with pytest.raises(subprocess.TimeoutExpired):
                other.wait(0.5)  # still waiting for the turn this process holds
        out, _ = other.communicate(timeout=30)
    assert out.strip() == "in"


def test_a_thread_may_take_its_own_turn_again(engine: Engine) -> None:
    with Session(engine) as session:
        with writing(session):
            with writing(session):
                pass
        done = threading.Event()

        def other() -> None:
            with writing(session):
                done.set()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(5)
        assert done.is_set(), "the turn was not given back after nested use"
