"""The token cache on fakeredis: how long a token stays, that it is stored sealed, that a
refused token is dropped only if it is still the cached one, and that concurrent jobs on a
cold cache make one token request between them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import fakeredis
import pytest

from models import errors
from models.settings import Settings
from models.vault import Vault, generate_key
from tests.conftest import TEST_MASTER_KEY, test_settings
from worker.oauth import Token
from worker.tokens import Cached, Slot, TokenCache, token_id, ttl

ACCESS_TOKEN = "at-PLAINTEXT-5e1f9a"


@pytest.fixture
def settings() -> Settings:
    return test_settings("sqlite://")


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def cache(redis_client: fakeredis.FakeRedis, settings: Settings) -> TokenCache:
    return TokenCache(redis_client, Vault.from_setting(TEST_MASTER_KEY), settings)


@pytest.fixture
def slot() -> Slot:
    return Slot("tenant-1", "connection-1", 1)


class Fetcher:
    """A token request that counts its calls and hands out a new token each time."""

    def __init__(self, *, expires_in: float | None = 3600, delay: float = 0.0, prefix: str = ACCESS_TOKEN) -> None:
        self.calls = 0
        self.expires_in = expires_in
        self.delay = delay
        self.prefix = prefix
        self._lock = threading.Lock()

    def __call__(self) -> Token:
        with self._lock:
            self.calls += 1
            number = self.calls
        time.sleep(self.delay)
        return Token(access_token=f"{self.prefix}-{number}", token_type="Bearer", expires_in=self.expires_in,
                     scope="api", refresh_token="rt-PLAINTEXT-77")


def failing(message: str) -> Callable[[], Token]:
    def fetch() -> Token:
        raise errors.TokenRequestFailed(message)

    return fetch


# --- ttl -----------------------------------------------------------------------------------


def test_ttl_is_the_lifetime_less_the_leeway() -> None:
    # Given a leeway of 60 s
    settings = test_settings("sqlite://", token_leeway_s=60)
    # When a token lives an hour
    # Then it is cached for an hour less a minute
    assert ttl(3600, settings) == 3540


def test_ttl_leeway_is_at_most_half_the_lifetime() -> None:
    # Given a leeway of 60 s
    settings = test_settings("sqlite://", token_leeway_s=60)
    # When a token lives only 60 s
    # Then it is cached for half of that, not for zero
    assert ttl(60, settings) == 30


def test_ttl_of_a_token_without_expires_in_is_the_default_lifetime() -> None:
    # Given a default lifetime of 123 s
    settings = test_settings("sqlite://", token_default_lifetime_s=123)
    # When the token endpoint said nothing of the lifetime
    # Then the token is cached for the default lifetime
    assert ttl(None, settings) == 123


# --- obtain, read, write -------------------------------------------------------------------


def test_a_cold_cache_fetches_once_then_answers_from_the_cache(cache: TokenCache, slot: Slot) -> None:
    # Given an empty cache
    fetch = Fetcher()
    # When a token is obtained twice
    first = cache.obtain(slot, fetch)
    second = cache.obtain(slot, fetch)
    # Then the first fetched it, the second came from the cache without fetching
    assert fetch.calls == 1
    assert first.cached is False
    assert second.cached is True
    assert first.token.access_token == second.token.access_token == f"{ACCESS_TOKEN}-1"
    assert second.token.token_type == "Bearer"
    assert second.token.scope == "api"
    assert second.token.expires_in == 3600
    # And both know when it expires
    assert first.expires_at is not None and second.expires_at == pytest.approx(first.expires_at)
    assert first.expires_at == pytest.approx(time.time() + 3600, abs=5)


def test_the_cache_does_not_keep_the_refresh_token(cache: TokenCache, slot: Slot) -> None:
    # Given a token granted with a refresh token
    cache.obtain(slot, Fetcher())
    # When it is read back from the cache
    found = cache.read(slot)
    # Then it has no refresh token (that lives only as the connection's secret)
    assert found is not None
    assert found.token.refresh_token is None


def test_redis_holds_no_plaintext_token(cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis) -> None:
    # Given a token in the cache
    cache.obtain(slot, Fetcher())
    # When everything Redis holds is read
    stored: list[Any] = []
    for key in redis_client.scan_iter():
        stored.append(key)
        kind = redis_client.type(key)
        if kind == b"hash":
            for field, value in redis_client.hgetall(key).items():
                stored += [field, value]
        elif kind == b"string":
            stored.append(redis_client.get(key))
    # Then there is a token entry, and neither the access token nor the refresh token is in it
    assert slot.key.encode() in stored
    blob = b"\n".join(stored)
    assert ACCESS_TOKEN.encode() not in blob
    assert b"rt-PLAINTEXT-77" not in blob


def test_the_entry_expires_after_the_ttl(cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis,
                                          settings: Settings) -> None:
    # Given a token granted for an hour
    cache.obtain(slot, Fetcher(expires_in=3600))
    # When Redis is asked how long the entry lives
    remaining = redis_client.pttl(slot.key)
    # Then it is the ttl (an hour less the leeway), in milliseconds
    expected = ttl(3600, settings) * 1000
    assert expected - 2000 <= remaining <= expected


def test_a_token_without_expires_in_lives_the_default_lifetime(
    cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis, settings: Settings
) -> None:
    # Given a token granted without expires_in
    got = cache.obtain(slot, Fetcher(expires_in=None))
    # When its entry and its expiry are looked at
    remaining = redis_client.pttl(slot.key)
    # Then it is cached for the default lifetime, and its expiry is unknown
    assert settings.token_default_lifetime_s * 1000 - 2000 <= remaining <= settings.token_default_lifetime_s * 1000
    assert got.expires_at is None
    found = cache.read(slot)
    assert found is not None and found.expires_at is None


def test_an_expired_entry_is_fetched_again(cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis) -> None:
    # Given a cached token whose entry has expired
    fetch = Fetcher()
    cache.obtain(slot, fetch)
    redis_client.pexpire(slot.key, 1)
    time.sleep(0.01)
    # When a token is obtained
    got = cache.obtain(slot, fetch)
    # Then a new one is fetched
    assert fetch.calls == 2
    assert got.cached is False
    assert got.token.access_token == f"{ACCESS_TOKEN}-2"


def test_a_vault_with_another_key_cannot_read_the_token(
    cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis, settings: Settings
) -> None:
    # Given a token cached by a worker with the test master key
    cache.obtain(slot, Fetcher())
    other = TokenCache(redis_client, Vault.from_setting(generate_key()), settings)
    # When a worker with another master key looks for it
    found = other.read(slot)
    fetch = Fetcher(prefix="at-other")
    got = other.obtain(slot, fetch)
    # Then it cannot read it, and fetches its own
    assert found is None
    assert fetch.calls == 1
    assert got.cached is False
    assert got.token.access_token == "at-other-1"


def test_a_token_copied_to_another_slot_does_not_open(
    cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis
) -> None:
    # Given a token cached for one connection, and its entry copied under another connection's key
    cache.obtain(slot, Fetcher())
    other = Slot("tenant-1", "connection-2", 1)
    entry: dict[Any, Any] = redis_client.hgetall(slot.key)  # type: ignore[assignment]
    redis_client.hset(other.key, mapping=entry)
    # When the other connection's token is read
    # Then the copy does not open there (it is sealed to its own connection)
    assert cache.read(other) is None


def test_versions_are_separate_caches(cache: TokenCache) -> None:
    # Given a token cached for version 1 of a connection
    fetch = Fetcher()
    v1 = cache.obtain(Slot("tenant-1", "connection-1", 1), fetch)
    # When version 2 of the same connection needs a token
    v2 = cache.obtain(Slot("tenant-1", "connection-1", 2), fetch)
    # Then it fetches its own, and version 1 still has its token
    assert fetch.calls == 2
    assert v2.cached is False
    assert v1.token.access_token != v2.token.access_token
    again = cache.read(Slot("tenant-1", "connection-1", 1))
    assert again is not None and again.token.access_token == v1.token.access_token


# --- drop ----------------------------------------------------------------------------------


def test_drop_removes_the_refused_token(cache: TokenCache, slot: Slot) -> None:
    # Given a cached token that the service refused
    fetch = Fetcher()
    refused = cache.obtain(slot, fetch)
    # When it is dropped
    cache.drop(slot, refused)
    # Then the next job fetches a new one
    got = cache.obtain(slot, fetch)
    assert fetch.calls == 2
    assert got.cached is False
    assert got.token.access_token != refused.token.access_token


def test_drop_of_an_older_token_keeps_the_newer_one(cache: TokenCache, slot: Slot) -> None:
    # Given a token refused by the service, which another job has already replaced
    fetch = Fetcher()
    refused = cache.obtain(slot, fetch)
    cache.drop(slot, refused)
    newer = cache.obtain(slot, fetch)
    # When the stale refusal drops its token
    cache.drop(slot, refused)
    # Then the newer token stays cached and is used without fetching
    found = cache.obtain(slot, fetch)
    assert fetch.calls == 2
    assert found.cached is True
    assert found.token.access_token == newer.token.access_token


def test_drop_on_an_empty_cache_does_nothing(cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis) -> None:
    # Given nothing cached
    ghost = Cached(Token("at-ghost", "Bearer", 60.0, None, None), None, cached=True)
    # When a token is dropped
    cache.drop(slot, ghost)
    # Then nothing is created
    assert redis_client.exists(slot.key) == 0


def test_token_id_is_a_fingerprint_not_the_token() -> None:
    # Given two access tokens
    # When they are fingerprinted
    first, second = token_id(ACCESS_TOKEN), token_id(ACCESS_TOKEN + "x")
    # Then each has its own stable id that does not show the token
    assert first == token_id(ACCESS_TOKEN)
    assert first != second
    assert ACCESS_TOKEN not in first


# --- single flight -------------------------------------------------------------------------


def test_concurrent_jobs_on_a_cold_cache_make_one_token_request(cache: TokenCache, slot: Slot,
                                                                 redis_client: fakeredis.FakeRedis) -> None:
    # Given 16 jobs that need the token at once, and a token endpoint that takes 0.3 s
    fetch = Fetcher(delay=0.3)
    start = threading.Barrier(16)
    results: list[Cached] = []
    failures: list[BaseException] = []
    guard = threading.Lock()

    def job() -> None:
        try:
            start.wait()
            got = cache.obtain(slot, fetch)
            with guard:
                results.append(got)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            with guard:
                failures.append(exc)

    # When they all obtain it
    threads = [threading.Thread(target=job) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    # Then exactly one token request was made and all 16 got that token
    assert failures == []
    assert len(results) == 16
    assert fetch.calls == 1
    assert {got.token.access_token for got in results} == {f"{ACCESS_TOKEN}-1"}
    # And one of them fetched it, the others had it from the cache
    assert sorted(got.cached for got in results) == [False] + [True] * 15
    # And the lock is gone
    assert redis_client.exists(slot.lock) == 0


def test_the_lock_is_released_after_obtain(cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis) -> None:
    # Given an empty cache
    # When a token is fetched
    cache.obtain(slot, Fetcher())
    # Then no lock is left behind
    assert redis_client.exists(slot.lock) == 0


def test_a_failed_fetch_propagates_and_releases_the_lock(cache: TokenCache, slot: Slot,
                                                           redis_client: fakeredis.FakeRedis) -> None:
    # Given a token endpoint that refuses the request
    # When a token is obtained
    with pytest.raises(errors.TokenRequestFailed) as caught:
        cache.obtain(slot, failing("the token endpoint refused the request (invalid_client)"))
    # Then the refusal reaches the caller, nothing is cached, and the lock is free
    assert "invalid_client" in caught.value.message
    assert redis_client.exists(slot.key) == 0
    assert redis_client.exists(slot.lock) == 0
    # And the next job can fetch at once
    fetch = Fetcher()
    started = time.monotonic()
    got = cache.obtain(slot, fetch)
    assert fetch.calls == 1
    assert got.cached is False
    assert time.monotonic() - started < 1


def test_a_job_waits_for_another_workers_lock_then_uses_its_token(
    cache: TokenCache, slot: Slot, redis_client: fakeredis.FakeRedis
) -> None:
    # Given another worker holding the lock, about to store a token
    redis_client.set(slot.lock, "another-worker", px=30_000)
    fetch = Fetcher()

    def other_worker() -> None:
        time.sleep(0.2)
        cache.write(slot, Token("at-from-other", "Bearer", 3600.0, None, None))
        redis_client.delete(slot.lock)

    thread = threading.Thread(target=other_worker)
    thread.start()
    # When this job obtains the token
    got = cache.obtain(slot, fetch)
    thread.join()
    # Then it did not fetch: it waited and used the other worker's token
    assert fetch.calls == 0
    assert got.cached is True
    assert got.token.access_token == "at-from-other"
    # And the other worker's lock was not touched by this one
    assert redis_client.exists(slot.lock) == 0


def test_a_job_gives_up_when_the_lock_is_never_freed(
    redis_client: fakeredis.FakeRedis, slot: Slot
) -> None:
    # Given a worker that holds the lock and never stores a token, and a short wait
    settings = test_settings("sqlite://", token_wait_s=0.3)
    cache = TokenCache(redis_client, Vault.from_setting(TEST_MASTER_KEY), settings)
    redis_client.set(slot.lock, "stuck-worker", px=30_000)
    fetch = Fetcher()
    # When a job obtains the token
    with pytest.raises(errors.TokenRequestFailed):
        cache.obtain(slot, fetch)
    # Then it failed without fetching, and left the other worker's lock alone
    assert fetch.calls == 0
    assert redis_client.get(slot.lock) == b"stuck-worker"
