"""What keeps jobs from being lost and tells their callers: due times, slots, leases,
re-dispatch counts, callbacks, and the tenant's callback signing key.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.add_column(sa.Column("due_at", _TIME, nullable=True))
        batch_op.add_column(sa.Column("slot_at", _TIME, nullable=True))
        batch_op.add_column(sa.Column("lease_until", _TIME, nullable=True))
        batch_op.add_column(sa.Column("dispatches", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("callback_url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("callback_state", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("callback_attempts", sa.Integer(), server_default="0", nullable=False))
        batch_op.create_index("ix_job_status_due_at", ["status", "due_at"], unique=False)
        batch_op.create_index("ix_job_finished_at", ["finished_at"], unique=False)
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.add_column(sa.Column("callback_key", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenant", schema=None) as batch_op:
        batch_op.drop_column("callback_key")
    with op.batch_alter_table("job", schema=None) as batch_op:
        batch_op.drop_index("ix_job_finished_at")
        batch_op.drop_index("ix_job_status_due_at")
        for column in ("callback_attempts", "callback_state", "callback_url", "dispatches", "lease_until",
                       "slot_at", "due_at"):
            batch_op.drop_column(column)
