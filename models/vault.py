"""The secret vault: AES-256-GCM under the configured master keys.

Each encryption uses a fresh 96-bit random nonce, and binds the ciphertext to its tenant,
connection and secret name as associated data, so a ciphertext copied to another row does not
decrypt. Several master keys can be configured: the first encrypts, all decrypt; each
ciphertext records the id of the key that sealed it (a fingerprint, never the key).

Nothing here puts a secret's value in an exception or a log line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from models import errors

KEY_BYTES = 32
NONCE_BYTES = 12


class Sealed(NamedTuple):
    """A secret as stored: the sealing key's id, the nonce and the ciphertext (with its tag)."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


def generate_key() -> str:
    """A new random master key, base64-encoded as ``HUB_MASTER_KEYS`` takes it."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def key_id(key: bytes) -> str:
    """The public id of a master key: a truncated SHA-256 fingerprint."""
    return hashlib.sha256(b"integration-hub master key\0" + key).hexdigest()[:16]


def associated_data(*, tenant_id: str, connection_id: str, name: str) -> bytes:
    """The row a ciphertext belongs to, encoded without ambiguity."""
    return json.dumps([tenant_id, connection_id, name], separators=(",", ":")).encode()


class Vault:
    """Seals and opens secrets with a list of master keys; the first seals."""

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise errors.MasterKeyMissing()
        if any(len(key) != KEY_BYTES for key in keys):
            raise errors.InvalidMasterKey()
        self._ciphers = {key_id(key): AESGCM(key) for key in keys}
        self.current_key_id = key_id(keys[0])

    def __repr__(self) -> str:
        return f"Vault(key_ids={list(self._ciphers)})"

    @classmethod
    def from_setting(cls, value: str | None) -> Vault:
        """A vault from ``HUB_MASTER_KEYS``: comma-separated base64 keys."""
        if not value or not value.strip():
            raise errors.MasterKeyMissing()
        keys = []
        for part in value.split(","):
            try:
                keys.append(base64.b64decode(part.strip(), validate=True))
            except (binascii.Error, ValueError):
                raise errors.InvalidMasterKey() from None  # the cause would quote the key
        return cls(keys)

    def seal(self, plaintext: str, *, tenant_id: str, connection_id: str, name: str) -> Sealed:
        """``plaintext`` encrypted under the current key, bound to its row."""
        nonce = os.urandom(NONCE_BYTES)
        aad = associated_data(tenant_id=tenant_id, connection_id=connection_id, name=name)
        ciphertext = self._ciphers[self.current_key_id].encrypt(nonce, plaintext.encode(), aad)
        return Sealed(self.current_key_id, nonce, ciphertext)

    def open(self, sealed: Sealed, *, tenant_id: str, connection_id: str, name: str) -> str:
        """The plaintext of ``sealed``; :class:`~models.errors.SecretUnreadable` if it is not
        this row's, was changed, or its key is not configured."""
        cipher = self._ciphers.get(sealed.key_id)
        if cipher is None:
            raise errors.SecretUnreadable(f"secret {name!r} was sealed with a key that is not configured")
        aad = associated_data(tenant_id=tenant_id, connection_id=connection_id, name=name)
        try:
            return cipher.decrypt(sealed.nonce, sealed.ciphertext, aad).decode()
        except (InvalidTag, UnicodeDecodeError, ValueError) as exc:  # ValueError: a damaged nonce
            raise errors.SecretUnreadable(f"secret {name!r} could not be decrypted") from exc

    def reseal(self, sealed: Sealed, *, tenant_id: str, connection_id: str, name: str) -> Sealed:
        """``sealed`` re-encrypted under the current key (unchanged if it already is)."""
        if sealed.key_id == self.current_key_id:
            return sealed
        plaintext = self.open(sealed, tenant_id=tenant_id, connection_id=connection_id, name=name)
        return self.seal(plaintext, tenant_id=tenant_id, connection_id=connection_id, name=name)
