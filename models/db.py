"""The database engine and sessions.

One engine per process, made on first use and remade after a fork, so Celery's prefork
children never share their parent's connections. SQLite (the embedded default) gets WAL
mode and a busy timeout, because the API and the worker write to the same file.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models.settings import get_settings

try:
    import fcntl
except ImportError:  # not POSIX: turns among threads only
    fcntl = None  # type: ignore[assignment]

_engines: dict[tuple[int, str], Engine] = {}

UNAVAILABLE = (sa.exc.OperationalError, sa.exc.InterfaceError)
"""What SQLAlchemy raises when the database cannot be reached or a connection to it broke (a
restart, a failover): the same work may succeed later. Their text can quote the statement and
its parameters, so the hub logs their type only."""


def make_engine(url: str) -> Engine:
    """A new engine for ``url``, configured for the hub's use of that database."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine(url: str | None = None) -> Engine:
    """This process's engine for ``url`` (default: the configured database)."""
    url = url or get_settings().effective_database_url()
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(url)
    return engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


class _Turns:
    """Turns at SQLite's write lock: a lock for the threads of this process and, for the hub's
    processes, an advisory lock (``flock``) on a file beside the database. A waiter there is
    woken as soon as the turn is free, where SQLite's busy handler sleeps in steps of up to
    100 ms however soon the lock frees (the benchmark saw submissions take 400 ms at p99 so).
    Re-entrant within a thread."""

    def __init__(self, path: str | None) -> None:
        self._threads = threading.RLock()
        self._depth = 0
        self._path = path
        self._fd: int | None = None
        self._pid = os.getpid()

    def __enter__(self) -> None:
        self._threads.acquire()
        self._depth += 1
        if self._depth == 1:
            try:
                fd = self._file()
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self._depth -= 1
                self._threads.release()
                raise

    def __exit__(self, *_: object) -> None:
        try:
            if self._depth == 1 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._depth -= 1
            self._threads.release()

    def _file(self) -> int | None:
        if self._path is None or fcntl is None:
            return None
        if self._fd is None or self._pid != os.getpid():  # a forked child opens its own
            try:
                self._fd, self._pid = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600), os.getpid()
            except OSError:  # a read-only directory: the threads' lock alone
                self._path = None
                return None
        return self._fd


_turns: weakref.WeakKeyDictionary[Any, _Turns] = weakref.WeakKeyDictionary()
_turns_lock = threading.Lock()


def writing(session: Session) -> AbstractContextManager[Any]:
    """Hold around a write transaction, from its first write to its commit or rollback: on
    SQLite, the hub's writers then take turns (see :class:`_Turns`). Elsewhere it does nothing."""
    engine = session.get_bind().engine
    if engine.dialect.name != "sqlite":
        return nullcontext()
    with _turns_lock:
        turns = _turns.get(engine)
        if turns is None:
            database = engine.url.database
            path = f"{os.path.abspath(database)}.writers" if database and database != ":memory:" else None
            turns = _turns[engine] = _Turns(path)
    return turns


def lock_row(session: Session, model: Any, row_id: str) -> None:
    """Hold the write lock on one row until the transaction ends (on SQLite: the database's).

    A no-op UPDATE, so it works the same on PostgreSQL (a row lock) and SQLite (the write
    lock): checks made after it, such as a count against a limit, cannot race another writer.
    """
    session.execute(sa.update(model).where(model.id == row_id).values(id=model.id))


def rowcount(result: Any) -> int:
    """How many rows an UPDATE or DELETE changed (its ``CursorResult``'s count)."""
    return int(result.rowcount)
