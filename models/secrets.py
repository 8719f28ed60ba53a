"""A connection's secrets: stored sealed by the vault, opened only for the job that uses them.

A secret is usable only by its own connection: it is looked up by connection id, and its
ciphertext is bound to that connection by the vault's associated data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from models import errors
from models.base import utcnow
from models.callbacks import reseal_callback_key
from models.db import lock_row
from models.tables import Connection, Secret, Tenant
from models.vault import Sealed, Vault

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")


def check_name(name: str) -> None:
    """A secret name is what ``{{secrets.NAME}}`` can refer to."""
    if not NAME.fullmatch(name):
        raise errors.InvalidInput(
            "a secret name starts with a letter or _, then letters, digits, _ . -; at most 128",
            errors=[{"loc": ["path", "name"], "msg": "not a secret name"}],
        )


def put(session: Session, vault: Vault, *, tenant_id: str, connection_id: str, name: str, value: str) -> None:
    """Create or replace the connection's secret ``name`` with ``value``, sealed.

    Writes to one connection's secrets queue on its row lock, so two PUTs of a new name both
    succeed (the later one replaces) instead of one tripping the unique name.
    """
    check_name(name)
    lock_row(session, Connection, connection_id)
    sealed = vault.seal(value, tenant_id=tenant_id, connection_id=connection_id, name=name)
    row = session.exec(select(Secret).where(Secret.connection_id == connection_id, Secret.name == name)).first()
    if row is None:
        now = utcnow()  # one reading: a new secret's two times are equal, not a millisecond apart
        row = Secret(tenant_id=tenant_id, connection_id=connection_id, name=name, created_at=now, updated_at=now,
                     key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
    else:
        row.key_id, row.nonce, row.ciphertext, row.updated_at = (*sealed, utcnow())
    session.add(row)


_SECRETS = Secret.__table__  # type: ignore[attr-defined]
_OPEN = sa.select(_SECRETS.c.name, _SECRETS.c.key_id, _SECRETS.c.nonce, _SECRETS.c.ciphertext).where(
    _SECRETS.c.connection_id == sa.bindparam("connection_id"),
    _SECRETS.c.tenant_id == sa.bindparam("tenant_id"),
    _SECRETS.c.name.in_(sa.bindparam("names", expanding=True)),
)
"""Built once, on the table: every job that uses secrets runs it."""


def open_secrets(session: Session, vault: Vault, *, tenant_id: str, connection_id: str,
                 names: Iterable[str]) -> dict[str, str]:
    """The plaintexts of the connection's secrets ``names``, for one job, in memory only.

    :class:`~models.errors.SecretMissing` names the first that does not exist.
    """
    wanted = sorted(set(names))
    if not wanted:
        return {}
    rows = session.execute(_OPEN, {"connection_id": connection_id, "tenant_id": tenant_id, "names": wanted}).all()
    found = {row.name: row for row in rows}
    for name in wanted:
        if name not in found:
            raise errors.SecretMissing(f"the connection has no secret {name!r}")
    return {
        name: vault.open(Sealed(row.key_id, row.nonce, row.ciphertext),
                         tenant_id=tenant_id, connection_id=connection_id, name=name)
        for name, row in found.items()
    }


@dataclass
class RotationReport:
    """What a rotation did."""

    resealed: int = 0
    unreadable: int = 0
    """Secrets sealed with a key that is not configured (left as they are)."""


def rotate(engine: Engine, vault: Vault, *, batch_size: int = 200) -> RotationReport:
    """Re-encrypt every secret not sealed with the vault's current key, one batch per transaction.

    It can be interrupted and run again: each batch is committed, and a secret already under
    the current key is not touched. A row changed meanwhile (a new value was PUT) is skipped:
    its update matches on the old nonce.
    """
    report = RotationReport()
    after = ""
    while True:
        with Session(engine) as session:
            rows = session.exec(
                select(Secret)
                .where(Secret.key_id != vault.current_key_id, Secret.id > after)
                .order_by(Secret.id)  # type: ignore[arg-type]
                .limit(batch_size)
            ).all()
            if not rows:
                _rotate_callback_keys(session, vault, report)
                return report
            for row in rows:
                after = row.id
                try:
                    sealed = vault.reseal(Sealed(row.key_id, row.nonce, row.ciphertext),
                                          tenant_id=row.tenant_id, connection_id=row.connection_id, name=row.name)
                except errors.SecretUnreadable:
                    report.unreadable += 1
                    continue
                changed = session.execute(
                    sa.update(Secret)
                    .where(Secret.id == row.id, Secret.nonce == row.nonce)  # type: ignore[arg-type]
                    .values(key_id=sealed.key_id, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
                )
                report.resealed += changed.rowcount  # type: ignore[attr-defined]
            session.commit()


def _rotate_callback_keys(session: Session, vault: Vault, report: RotationReport) -> None:
    """The tenants' callback signing keys, sealed like secrets, re-encrypted the same way."""
    for tenant_id, stored in session.execute(
        sa.select(col(Tenant.id), col(Tenant.callback_key)).where(Tenant.callback_key.is_not(None))  # type: ignore[union-attr]
    ).all():
        try:
            fresh = reseal_callback_key(vault, tenant_id, stored)
        except errors.SecretUnreadable:
            report.unreadable += 1
            continue
        if fresh is not None:
            changed = session.execute(sa.update(Tenant).where(Tenant.id == tenant_id, Tenant.callback_key == stored)  # type: ignore[arg-type]
                                      .values(callback_key=fresh))
            report.resealed += changed.rowcount  # type: ignore[attr-defined]
    session.commit()
