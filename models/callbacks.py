"""Signed callbacks: each tenant's signing key, and the signature of a callback's body.

The hub POSTs a finished job to its ``callback_url`` with the header
``X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the exact body bytes>``, keyed with the
tenant's callback key. The key is made on first use, kept sealed by the vault (like a secret),
and shown to its tenant by ``GET /v1/callback-key``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

import sqlalchemy as sa
from sqlmodel import Session, col

from models import errors
from models.tables import Tenant
from models.vault import Sealed, Vault

SIGNATURE_HEADER = "X-Hub-Signature-256"
KEY_PREFIX = "whsec_"
_NAME = "callback-key"


def _seal(vault: Vault, tenant_id: str, key: str) -> str:
    sealed = vault.seal(key, tenant_id=tenant_id, connection_id="", name=_NAME)
    return ":".join([sealed.key_id, base64.b64encode(sealed.nonce).decode(), base64.b64encode(sealed.ciphertext).decode()])


def _open(vault: Vault, tenant_id: str, stored: str) -> str:
    try:
        key_id, nonce, ciphertext = stored.split(":")
        sealed = Sealed(key_id, base64.b64decode(nonce), base64.b64decode(ciphertext))
    except ValueError as exc:
        raise errors.SecretUnreadable("the tenant's callback key is damaged") from exc
    return vault.open(sealed, tenant_id=tenant_id, connection_id="", name=_NAME)


def callback_key(session: Session, vault: Vault, tenant_id: str) -> str:
    """The tenant's callback signing key, made now if it has none (two callers racing get the
    same key: only the first conditional UPDATE stores one)."""
    stored = session.execute(sa.select(col(Tenant.callback_key)).where(col(Tenant.id) == tenant_id)).scalar_one_or_none()
    if stored is None:
        fresh = _seal(vault, tenant_id, KEY_PREFIX + secrets.token_urlsafe(32))
        session.execute(sa.update(Tenant).where(col(Tenant.id) == tenant_id, col(Tenant.callback_key).is_(None))
                        .values(callback_key=fresh))
        session.commit()
        stored = session.execute(sa.select(col(Tenant.callback_key)).where(col(Tenant.id) == tenant_id)).scalar_one()
    return _open(vault, tenant_id, stored)


def rotate_callback_key(session: Session, vault: Vault, tenant_id: str) -> str:
    """A new callback key for the tenant; callbacks sent from now on are signed with it."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.execute(sa.update(Tenant).where(col(Tenant.id) == tenant_id).values(callback_key=_seal(vault, tenant_id, key)))
    session.commit()
    return key


def reseal_callback_key(vault: Vault, tenant_id: str, stored: str) -> str | None:
    """``stored`` sealed under the vault's current key, or None when it already is."""
    if stored.split(":", 1)[0] == vault.current_key_id:
        return None
    return _seal(vault, tenant_id, _open(vault, tenant_id, stored))


def signature(key: str, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` for ``body``."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify(key: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` under ``key`` (constant time), as a
    receiver checks it."""
    return hmac.compare_digest(signature(key, body), header)
