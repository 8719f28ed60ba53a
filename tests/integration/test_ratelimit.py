"""The rate limiter and the cooldowns (one Lua script on Redis's clock), on fakeredis and on a
real Redis. Every test uses tenant and connection ids of its own, and deletes its keys after.

Delays are checked against the GCRA's arithmetic: the k-th acquisition past the burst is due
``k · interval`` after the first, less the time that passed since; that time is measured around
the calls, so no bound depends on how fast the machine is.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise

import fakeredis
import pytest
import redis

from worker.keys import cooldown_key, departures_key, held_key, rate_key
from worker.ratelimit import Decision, Limiter, Outcome, Rate

RATE = Rate(per_s=20, burst=5)
INTERVAL_S = 0.05
CLOCKS_S = 0.002
"""Slack between Redis's clock and ours (both µs; the calls themselves are measured)."""


@dataclass
class Bucket:
    """A limiter on one Redis, and fresh ids whose keys are deleted after the test."""

    client: redis.Redis
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    made: int = 0

    def limiter(self, horizon_s: float = 30.0) -> Limiter:
        return Limiter(self.client, horizon_s=horizon_s)

    def new_id(self, kind: str) -> str:
        self.made += 1
        return f"{kind}-{self.made}-{self.marker}"

    def keys(self) -> list[str]:
        """Every key this test's ids made."""
        return sorted(key.decode() for key in self.client.scan_iter(match=f"hub:*{self.marker}*"))

    def state(self, tenant_id: str) -> object:
        """The tenant's stored theoretical arrival time (None: nothing stored)."""
        return self.client.get(rate_key(tenant_id))


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.integration)])
def bucket(request: pytest.FixtureRequest) -> Iterator[Bucket]:
    """fakeredis (with Lua), then the real Redis of ``redis_url``."""
    if request.param == "fakeredis":
        client: redis.Redis = fakeredis.FakeRedis()
    else:
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    found = Bucket(client)
    yield found
    leftover = found.keys()
    if leftover:
        client.delete(*leftover)
    client.close()


def acquire_timed(limiter: Limiter, tenant_id: str, connection_id: str, rate: Rate, count: int,
                  ) -> tuple[list[Decision], float]:
    """``count`` acquisitions in a row, and the seconds they took together."""
    started = time.monotonic()
    decisions = [limiter.acquire(tenant_id, connection_id, rate) for _ in range(count)]
    return decisions, time.monotonic() - started


def test_burst_goes_then_slots_are_reserved_one_interval_apart(bucket: Bucket) -> None:
    # Given a fresh tenant at 20 requests/s with a burst of 5
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    # When it asks 10 times at once
    decisions, elapsed = acquire_timed(limiter, tenant, connection, RATE, 10)
    # Then the first 6 go now (one, plus the burst)
    assert [d.outcome for d in decisions[:6]] == [Outcome.GO] * 6
    assert all(d.delay_s == 0 for d in decisions[:6])
    # And each next one reserves the slot one interval (0.05 s) after the one before
    assert [d.outcome for d in decisions[6:]] == [Outcome.RESERVED] * 4
    for k, decision in enumerate(decisions[6:], start=1):
        due = k * INTERVAL_S
        assert due - elapsed - CLOCKS_S <= decision.delay_s <= due + CLOCKS_S, (k, decision, elapsed)
    steps = [b.delay_s - a.delay_s for a, b in pairwise(decisions[6:])]
    assert all(INTERVAL_S - elapsed - CLOCKS_S <= step <= INTERVAL_S + CLOCKS_S for step in steps), steps


def test_beyond_the_horizon_asks_again_and_reserves_nothing(bucket: Bucket) -> None:
    # Given a tenant at 2 requests/s with a burst of 1, and slots reserved at most 0.75 s ahead
    limiter = bucket.limiter(horizon_s=0.75)
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    rate = Rate(per_s=2, burst=1)
    # When it asks 3 times: two go, the third reserves the slot 0.5 s ahead
    decisions, elapsed = acquire_timed(limiter, tenant, connection, rate, 3)
    assert [d.outcome for d in decisions] == [Outcome.GO, Outcome.GO, Outcome.RESERVED]
    before = bucket.state(tenant)
    # And then twice more, when the next slot (1 s ahead) is past the horizon
    started = time.monotonic()
    late = [limiter.acquire(tenant, connection, rate) for _ in range(2)]
    elapsed += time.monotonic() - started
    # Then each asks again once the slot is within the horizon (after about 1 - 0.75 s)
    assert [d.outcome for d in late] == [Outcome.ASK_AGAIN] * 2
    for decision in late:
        assert 0.25 - elapsed - CLOCKS_S <= decision.delay_s <= 0.25 + CLOCKS_S, (decision, elapsed)
    # And nothing was reserved: the stored state is unchanged, the second wait is no longer
    assert bucket.state(tenant) == before
    assert late[1].delay_s <= late[0].delay_s


def test_a_due_slot_goes_without_reserving_another(bucket: Bucket) -> None:
    # Given a tenant whose burst went out, and a job that reserved the next slot
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    decisions, _ = acquire_timed(limiter, tenant, connection, RATE, 7)
    assert [d.outcome for d in decisions] == [Outcome.GO] * 6 + [Outcome.RESERVED]
    before = bucket.state(tenant)
    # When that job comes back at its slot
    time.sleep(decisions[-1].delay_s + 0.01)
    back = limiter.acquire(tenant, connection, RATE, reserved=True)
    # Then it goes, and no second slot was reserved for it
    assert back == Decision(Outcome.GO, 0.0)
    assert bucket.state(tenant) == before


def test_jobs_back_late_and_together_leave_one_interval_apart(bucket: Bucket) -> None:
    # Given a tenant whose burst went out just now
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    acquire_timed(limiter, tenant, connection, RATE, 6)
    # When five jobs whose slots are due all come back at once (a busy queue delivered them late)
    started = time.monotonic()
    back = [limiter.acquire(tenant, connection, RATE, reserved=True) for _ in range(5)]
    elapsed = time.monotonic() - started
    # Then they do not all go: each is held and told to come back one interval after the one before
    assert [d.outcome for d in back] == [Outcome.HELD] * 5
    delays = [d.delay_s for d in back]
    assert INTERVAL_S - elapsed - CLOCKS_S <= delays[0] <= INTERVAL_S + CLOCKS_S, (delays, elapsed)
    for earlier, later in itertools.pairwise(delays):
        assert INTERVAL_S - elapsed - CLOCKS_S <= later - earlier <= INTERVAL_S + CLOCKS_S, delays
    # And holding them reserved no new slots
    assert limiter.acquire(tenant, connection, RATE).delay_s <= INTERVAL_S + CLOCKS_S


def test_a_due_slot_on_a_fresh_tenant_goes(bucket: Bucket) -> None:
    # When a job that holds a slot asks for a tenant the limiter never saw
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    # Then it goes, counted as a departure only (no reservation is stored)
    assert limiter.acquire(tenant, connection, RATE, reserved=True) == Decision(Outcome.GO, 0.0)
    assert bucket.state(tenant) is None
    assert bucket.keys() == [departures_key(tenant)]


@pytest.mark.parametrize("reserved", [False, True])
def test_a_cooling_connection_holds_every_acquisition(bucket: Bucket, reserved: bool) -> None:
    # Given a connection that a service asked to wait 5 s
    limiter = bucket.limiter()
    tenant, connection, other = bucket.new_id("tenant"), bucket.new_id("conn"), bucket.new_id("conn")
    started = time.monotonic()
    limiter.cool_down(connection, 5)
    # When its jobs ask, holding a slot or not
    held = [limiter.acquire(tenant, connection, RATE, reserved=reserved) for _ in range(10)]
    elapsed = time.monotonic() - started
    # Then every one is told to come back when the cooldown ends
    assert {d.outcome for d in held} == {Outcome.COOLING_DOWN}
    assert all(5 - elapsed - CLOCKS_S <= d.delay_s <= 5 for d in held), (held, elapsed)
    # And none of them was charged to the tenant's rate
    assert bucket.state(tenant) is None
    # And another connection of the same tenant is not held
    assert limiter.acquire(tenant, other, RATE).outcome is Outcome.GO


def test_a_shorter_cooldown_does_not_shorten_a_longer_one(bucket: Bucket) -> None:
    # Given a connection cooling down for 5 s
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    started = time.monotonic()
    limiter.cool_down(connection, 5)
    # When another answer asks for 0.5 s, and nothing at all
    limiter.cool_down(connection, 0.5)
    limiter.cool_down(connection, 0)
    held = limiter.acquire(tenant, connection, RATE)
    elapsed = time.monotonic() - started
    # Then the 5 s still hold
    assert held.outcome is Outcome.COOLING_DOWN
    assert 5 - elapsed - CLOCKS_S <= held.delay_s <= 5, (held, elapsed)
    # And a longer one lengthens it
    limiter.cool_down(connection, 8)
    longer = limiter.acquire(tenant, connection, RATE)
    assert longer.outcome is Outcome.COOLING_DOWN
    assert 5 < longer.delay_s <= 8


@pytest.mark.parametrize("seconds", [0, -3])
def test_no_cooldown_for_no_time(bucket: Bucket, seconds: float) -> None:
    # When a connection is cooled down for no time / Then nothing is stored and jobs go
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    limiter.cool_down(connection, seconds)
    assert bucket.client.exists(cooldown_key(connection)) == 0
    assert limiter.acquire(tenant, connection, RATE).outcome is Outcome.GO


def test_two_tenants_have_rates_of_their_own(bucket: Bucket) -> None:
    # Given tenant A that used its burst
    limiter = bucket.limiter()
    tenant_a, tenant_b = bucket.new_id("tenant"), bucket.new_id("tenant")
    conn_a, conn_b = bucket.new_id("conn"), bucket.new_id("conn")
    decisions_a, _ = acquire_timed(limiter, tenant_a, conn_a, RATE, 7)
    assert decisions_a[-1].outcome is Outcome.RESERVED
    # When tenant B asks as often
    decisions_b, _ = acquire_timed(limiter, tenant_b, conn_b, RATE, 7)
    # Then B gets a burst of its own, and reserves its own first slot
    assert [d.outcome for d in decisions_b] == [Outcome.GO] * 6 + [Outcome.RESERVED]
    assert decisions_b[-1].delay_s <= INTERVAL_S + CLOCKS_S
    # And A, asking again, is still behind only its own slots
    again = limiter.acquire(tenant_a, conn_a, RATE)
    assert again.outcome is Outcome.RESERVED
    assert again.delay_s <= 2 * INTERVAL_S + CLOCKS_S


def test_every_key_expires(bucket: Bucket) -> None:
    # Given a tenant that reserved slots, a job held at its slot, and a connection that cooled down
    limiter = bucket.limiter()
    tenant, connection = bucket.new_id("tenant"), bucket.new_id("conn")
    acquire_timed(limiter, tenant, connection, RATE, 10)  # the next arrival is 10 intervals ahead
    assert limiter.acquire(tenant, connection, RATE, reserved=True).outcome is Outcome.HELD
    limiter.cool_down(bucket.new_id("conn"), 3)
    # Then every key the limiter wrote has a TTL: nothing is left forever
    keys = bucket.keys()
    assert {rate_key(tenant), departures_key(tenant), held_key(tenant)} <= set(keys) and len(keys) == 4
    ttls = {key: bucket.client.pttl(key) for key in keys}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    # And the rate's lasts only as long as it means something: to the next arrival, plus 1 s
    assert 1000 < ttls[rate_key(tenant)] <= 10 * INTERVAL_S * 1000 + 1000
    cooling = next(key for key in keys if key.startswith("hub:cooldown:"))
    assert ttls[cooling] <= 3000