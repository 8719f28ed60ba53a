"""Per-tenant outbound rates and per-connection cooldowns, kept in Redis for every worker.

The rate is a GCRA (generic cell rate algorithm) in one Lua script that reads Redis's own
clock, so every worker process sees one bucket and no clock of theirs matters. A job over the
rate does not wait holding a worker slot: the script *reserves* its slot in the future (at most
``horizon`` ahead) and the job is sent again to arrive then, so jobs keep the order they came
in. A job whose slot would be further ahead reserves nothing and asks again later.

Reservations say when a job may go; a second GCRA on the same rate counts the calls that
actually go out. Jobs that come back late for their slots (a busy queue delivers them late,
and together) would otherwise go together: the second one holds each of them back until the
tenant's departures allow it, telling each to come back one interval after the one before.

A connection that a service answered ``429`` with ``Retry-After`` cools down: no worker starts a
job through it until the cooldown ends. The check is in the same script.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import redis

from worker.keys import cooldown_key, departures_key, held_key, rate_key

# KEYS[1] the tenant's reservations, KEYS[2] the connection's cooldown, KEYS[3] the tenant's
# departures, KEYS[4] where the next held job is told to come back (each a time in µs).
# ARGV[1] emission interval (µs), ARGV[2] burst tolerance (µs), ARGV[3] horizon (µs),
# ARGV[4] 1 when the job already holds a slot it reserved.
# Returns {outcome, delay µs}: 0 go now, 1 reserved a slot after delay, 2 ask again after delay
# (nothing reserved), 3 cooling down for delay, 4 slot due but departures are ahead: come back.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cooling = redis.call('PTTL', KEYS[2])
if cooling > 0 then
  return {3, cooling * 1000}
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local horizon = tonumber(ARGV[3])
local function tat_of(key)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then
    return now
  end
  return tat
end
local function store(key, tat)
  redis.call('SET', key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if ARGV[4] ~= '1' then
  local tat = tat_of(KEYS[1])
  local wait = tat - tolerance - now
  if wait > horizon then
    return {2, wait - horizon}
  end
  store(KEYS[1], tat + interval)
  if wait > 0 then
    return {1, wait}
  end
end
local sent = tat_of(KEYS[3])
local late = sent - tolerance - now
if late <= 0 then
  store(KEYS[3], sent + interval)
  return {0, 0}
end
local held = tat_of(KEYS[4])
if held < sent then
  held = sent
end
store(KEYS[4], held + interval)
return {4, held - tolerance - now}
"""

# KEYS[1] the connection's cooldown; ARGV[1] milliseconds. Only ever lengthens it.
_COOL_DOWN = """
local left = redis.call('PTTL', KEYS[1])
if left < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
end
return left
"""


class Outcome(enum.Enum):
    """What the limiter decided for one attempt."""

    GO = 0
    RESERVED = 1
    """Over the rate: a slot is reserved, the job comes back after ``delay_s``."""
    ASK_AGAIN = 2
    """Over the rate by more than the horizon: nothing reserved, ask again after ``delay_s``."""
    COOLING_DOWN = 3
    """The connection is cooling down after a ``429``: come back after ``delay_s``."""
    HELD = 4
    """The job's slot is due but the tenant's calls that actually went out are ahead of the rate
    (jobs came back late, together): keep the slot, come back after ``delay_s``."""


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    delay_s: float


@dataclass(frozen=True)
class Rate:
    """A tenant's outbound rate: ``per_s`` requests per second, ``burst`` more at once."""

    per_s: float
    burst: int


class Limiter:
    """The rate limiter and cooldowns on one Redis."""

    def __init__(self, client: redis.Redis, *, horizon_s: float) -> None:
        self._acquire = client.register_script(_ACQUIRE)
        self._cool_down = client.register_script(_COOL_DOWN)
        self._horizon_us = int(horizon_s * 1_000_000)

    def acquire(self, tenant_id: str, connection_id: str, rate: Rate, *, reserved: bool = False) -> Decision:
        """May the tenant's job through this connection call out now? ``reserved``: it holds
        a slot reserved earlier, so only the cooldown is checked."""
        interval = int(1_000_000 / rate.per_s)
        outcome, delay_us = self._acquire(
            keys=[rate_key(tenant_id), cooldown_key(connection_id), departures_key(tenant_id), held_key(tenant_id)],
            args=[interval, interval * rate.burst, self._horizon_us, "1" if reserved else "0"],
        )
        return Decision(Outcome(int(outcome)), int(delay_us) / 1_000_000)

    def cool_down(self, connection_id: str, seconds: float) -> None:
        """Hold every job of the connection for ``seconds`` (a longer cooldown already set stays)."""
        if seconds > 0:
            self._cool_down(keys=[cooldown_key(connection_id)], args=[max(1, int(seconds * 1000))])
