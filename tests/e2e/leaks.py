"""Where a secret must never turn up: everything in Redis and in the database, dumped; the
broker's messages, decoded; and a search that finds a value as is or inside base64."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import redis
import sqlalchemy as sa
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (all tables on the metadata)


def redis_values(url: str) -> list[bytes]:
    """Every key and every value (each list item, hash field, set or sorted-set member) in the
    Redis database at ``url``."""
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
            parts.extend(part for pair in client.hgetall(key).items() for part in pair)
        elif kind == b"set":
            parts.extend(client.smembers(key))
        elif kind == b"zset":
            parts.extend(client.zrange(key, 0, -1))
    client.close()
    return parts


def redis_dump(url: str) -> bytes:
    """Every key and value in the Redis database at ``url``, as one blob."""
    return b"\n".join(redis_values(url))


def database_rows(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the hub's database, by table."""
    engine = sa.create_engine(url)
    rows: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            rows[table.name] = [tuple(row) for row in connection.execute(sa.select(table))]
    engine.dispose()
    return rows


def database_dump(url: str) -> list[object]:
    """Every value of every row of every table of the hub's database."""
    return [value for rows in database_rows(url).values() for row in rows for value in row]


def found_in(needle: str, values: list[object]) -> list[object]:
    """The values (text or bytes) that contain ``needle``."""
    return [v for v in values if needle.encode() in (v if isinstance(v, bytes) else str(v).encode())]


def broker_messages(values: Iterable[bytes]) -> list[dict[str, Any]]:
    """The kombu messages among ``values`` (Redis values or pub/sub payloads: a message alone,
    or inside a list as the ``unacked`` hash keeps it), each with its body decoded. The Redis
    transport keeps a message's body in base64, where a plain search would miss a value."""
    found = []
    for value in values:
        try:
            document = json.loads(value)
        except ValueError:
            continue
        for message in _envelopes(document):
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body).decode("utf-8", "replace")
            found.append({"headers": message.get("headers") or {}, "properties": message.get("properties") or {},
                          "body": body})
    return found


def _envelopes(document: Any) -> Iterator[dict[str, Any]]:
    if isinstance(document, dict) and "body" in document and "properties" in document:
        yield document
    elif isinstance(document, list):
        for item in document:
            yield from _envelopes(item)


def forms(needle: str) -> list[bytes]:
    """How ``needle`` can be written where a search should find it: as is, and inside base64
    (standard and URL-safe, at each of the three alignments a longer blob can put it at), as
    an HTTP Basic header or a base64 message body holds it."""
    raw = needle.encode()
    found = [raw]
    for shift in range(3):
        size = shift + len(raw)
        first, last = -(-shift // 3), size // 3  # the 3-byte groups made of the needle's bytes only
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            found.append(encode(b"\0" * shift + raw)[4 * first:4 * last])
    return found


def leaks(needles: Mapping[str, str], places: Mapping[str, bytes]) -> list[str]:
    """``"<needle's label> in <place>"`` for each needle found in each place: as is (in any
    letter case) or inside base64 (exactly)."""
    found = []
    for place, haystack in places.items():
        folded = haystack.lower()
        for label, needle in needles.items():
            plain, *encoded = forms(needle)
            if plain.lower() in folded or any(form in haystack for form in encoded):
                found.append(f"{label} in {place}")
    return found
