"""``python -m bench.instrument <integration-hub arguments>``: a hub command that counts its
database statements, commits, connection checkouts and Redis round trips.

Used by ``python -m bench --profile`` for the API and the workers; the hub's code is not
changed: SQLAlchemy's engine and pool events are listened to on the classes, and redis-py's
``Connection.send_packed_command`` (one write: a command or a whole pipeline, so one round
trip) is wrapped. Each process (a prefork worker's pool processes too) writes its counts to
``$BENCH_COUNT_DIR/<pid>.json`` every half second and when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_role = "?"
_TABLE = re.compile(r'^\s*(?:SELECT\b.*?\bFROM|UPDATE|INSERT\s+INTO|DELETE\s+FROM)\s+"?(\w+)', re.IGNORECASE | re.DOTALL)


def statement_kind(statement: str) -> str:
    """``SELECT job``, ``UPDATE job``, ``INSERT job``...: the verb and the first table."""
    words = statement.split(None, 1)
    verb = words[0].upper() if words else "?"
    found = _TABLE.match(statement)
    return f"{verb} {found.group(1)}" if found else verb


def count(key: str, n: int = 1) -> None:
    with _lock:
        _counts[key] += n


def _dump() -> None:
    directory = os.environ.get("BENCH_COUNT_DIR")
    if not directory:
        return
    with _lock:
        snapshot = dict(_counts)
    path = Path(directory) / f"{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    try:
        temporary.write_text(json.dumps({"pid": os.getpid(), "role": _role, "counts": snapshot}))
        temporary.replace(path)
    except OSError:
        pass


def _dumper() -> None:
    while True:
        time.sleep(0.5)
        _dump()


def _start_dumper() -> None:
    threading.Thread(target=_dumper, name="bench-counts", daemon=True).start()


def install() -> None:
    """Count statements, commits, checkouts and Redis round trips in this process and its forks."""
    import redis.connection
    import sqlalchemy as sa
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    def before_cursor_execute(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any,
                              executemany: bool) -> None:
        count("sql")
        count("sql: " + statement_kind(statement))

    sa.event.listen(Engine, "before_cursor_execute", before_cursor_execute)
    sa.event.listen(Engine, "commit", lambda _conn: count("commit"))
    sa.event.listen(Engine, "rollback", lambda _conn: count("rollback"))
    sa.event.listen(Pool, "checkout", lambda *_: count("pool checkout"))
    sa.event.listen(Pool, "connect", lambda *_: count("pool connect"))

    original = redis.connection.AbstractConnection.send_packed_command

    def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
        count("redis round trip")
        return original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    os.register_at_fork(after_in_child=_after_fork)
    atexit.register(_dump)
    _start_dumper()


def _after_fork() -> None:
    with _lock:
        _counts.clear()
    _start_dumper()


def read_counts(directory: Path) -> dict[str, Counter[str]]:
    """What every instrumented process counted so far, summed per role (``api``, ``worker``)."""
    roles: dict[str, Counter[str]] = {}
    for path in directory.glob("*.json"):
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        roles.setdefault(document.get("role", "?"), Counter()).update(document["counts"])
    return roles


def main() -> int:
    global _role
    _role = sys.argv[1] if len(sys.argv) > 1 else "?"
    install()
    from api_shim.cli import main as hub_main

    return hub_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
