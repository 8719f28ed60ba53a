"""The token cache: one OAuth token per connection version, shared by every worker, fetched
once at a time.

Tokens live in Redis sealed by the vault (bound to the tenant, the connection and the
version), with a TTL of their lifetime less a leeway (at most half the lifetime). On a miss,
one worker takes a Redis lock (its own random owner value, a TTL, released only by its owner),
reads the cache again, fetches and stores; the others wait for the cache instead of fetching.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from models import errors
from models.settings import Settings
from models.vault import Sealed, Vault
from worker import keys
from worker.oauth import Token

# Deletes the lock only if this worker still owns it.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Deletes the cached token only if it is the one the caller saw refused.
DROP_IF_SAME = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
POLL_S = 0.05


@dataclass(frozen=True)
class Cached:
    """A token out of the cache (or just fetched), and whether another job had fetched it."""

    token: Token
    expires_at: float | None
    cached: bool

    @property
    def id(self) -> str:
        """A fingerprint of the access token, safe to compare and log."""
        return token_id(self.token.access_token)


def token_id(access_token: str) -> str:
    """A fingerprint of an access token."""
    return hashlib.sha256(access_token.encode()).hexdigest()[:16]


def ttl(expires_in: float | None, settings: Settings) -> float:
    """How long a token stays cached: its lifetime less the leeway (at most half of it)."""
    if expires_in is None:
        return max(1.0, settings.token_default_lifetime_s)
    return max(1.0, expires_in - min(settings.token_leeway_s, expires_in / 2))


@dataclass
class Slot:
    """Where one connection version's token lives."""

    tenant_id: str
    connection_id: str
    version: int

    @property
    def key(self) -> str:
        return keys.token_key(self.tenant_id, self.connection_id, self.version)

    @property
    def lock(self) -> str:
        return keys.token_lock_key(self.tenant_id, self.connection_id, self.version)

    @property
    def name(self) -> str:
        """The vault's associated-data name for this slot's token."""
        return f"token:v{self.version}"


class TokenCache:
    """Tokens in Redis, sealed, with single-flight fetching."""

    def __init__(self, client: redis.Redis, vault: Vault, settings: Settings) -> None:
        self.redis = client
        self.vault = vault
        self.settings = settings

    def read(self, slot: Slot) -> Cached | None:
        """The cached token of ``slot``, or None."""
        try:
            found = self.redis.hgetall(slot.key)
        except redis.RedisError as exc:
            raise errors.Unavailable("the token cache (Redis) is unavailable") from exc
        if not found or b"sealed" not in found:
            return None
        stored = json.loads(found[b"sealed"])
        sealed = Sealed(stored["key_id"], bytes.fromhex(stored["nonce"]), bytes.fromhex(stored["ciphertext"]))
        try:
            plain = json.loads(self.vault.open(sealed, tenant_id=slot.tenant_id,
                                               connection_id=slot.connection_id, name=slot.name))
        except errors.SecretUnreadable:
            return None  # sealed under a key this worker lacks: fetch a new one
        return Cached(Token(**plain["token"]), plain["expires_at"], cached=True)

    def write(self, slot: Slot, token: Token) -> Cached:
        """Cache ``token`` for its lifetime less the leeway."""
        now = time.time()
        expires_at = now + token.expires_in if token.expires_in is not None else None
        document = {"token": {**token.__dict__, "refresh_token": None}, "expires_at": expires_at}
        sealed = self.vault.seal(json.dumps(document), tenant_id=slot.tenant_id,
                                 connection_id=slot.connection_id, name=slot.name)
        stored = json.dumps({"key_id": sealed.key_id, "nonce": sealed.nonce.hex(),
                             "ciphertext": sealed.ciphertext.hex()})
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(slot.key)
        pipe.hset(slot.key, mapping={"id": token_id(token.access_token), "sealed": stored})
        pipe.pexpire(slot.key, int(ttl(token.expires_in, self.settings) * 1000))
        pipe.execute()
        return Cached(token, expires_at, cached=False)

    def drop(self, slot: Slot, refused: Cached) -> None:
        """Forget the cached token if it is still the one that was refused."""
        self.redis.eval(DROP_IF_SAME, 1, slot.key, refused.id)

    def obtain(self, slot: Slot, fetch: Callable[[], Token]) -> Cached:
        """The slot's token: from the cache, else fetched by exactly one worker at a time."""
        found = self.read(slot)
        if found is not None:
            return found
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + self.settings.token_wait_s
        lock_ms = int(self.settings.token_lock_ttl_s * 1000)
        while time.monotonic() < deadline:
            if self.redis.set(slot.lock, owner, nx=True, px=lock_ms):
                try:
                    found = self.read(slot)  # another worker may have stored it meanwhile
                    if found is not None:
                        return found
                    return self.write(slot, fetch())
                finally:
                    self.redis.eval(RELEASE, 1, slot.lock, owner)
            time.sleep(POLL_S)
            found = self.read(slot)
            if found is not None:
                return found
        raise errors.TokenRequestFailed("timed out waiting for another worker's token request")
