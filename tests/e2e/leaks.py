"""Where a secret must never turn up: everything in Redis and in the database, dumped."""

from __future__ import annotations

import redis
import sqlalchemy as sa
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (all tables on the metadata)


def redis_dump(url: str) -> bytes:
    """Every key and value in the Redis database at ``url``, as one blob."""
    client = redis.Redis.from_url(url)
    parts = []
    for key in client.scan_iter(count=500):
        kind = client.type(key)
        parts.append(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind == b"hash":
            parts.extend(b"%s=%s" % (k, v) for k, v in client.hgetall(key).items())
        elif kind == b"set":
            parts.extend(client.smembers(key))
        elif kind == b"zset":
            parts.extend(client.zrange(key, 0, -1))
    client.close()
    return b"\n".join(parts)


def database_dump(url: str) -> list[object]:
    """Every value of every row of every table of the hub's database."""
    engine = sa.create_engine(url)
    values: list[object] = []
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            for row in connection.execute(sa.select(table)):
                values.extend(row)
    engine.dispose()
    return values


def found_in(needle: str, values: list[object]) -> list[object]:
    """The values (text or bytes) that contain ``needle``."""
    return [v for v in values if needle.encode() in (v if isinstance(v, bytes) else str(v).encode())]
