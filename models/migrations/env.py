"""Alembic environment: runs the migrations on the engine handed over by ``models.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import models.tables  # noqa: F401  (registers the tables on SQLModel.metadata)
from models.db import get_engine

target_metadata = SQLModel.metadata

engine = context.config.attributes.get("engine") or get_engine()
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
