"""Alembic runs as the schema owner (HM_DATABASE_OWNER_URL), never as the app role."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

from hiddenmodel.settings import get_settings

config = context.config


def run_migrations_online() -> None:
    url = config.attributes.get("url") or get_settings().database_owner_url
    connectable = create_engine(url, poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, transaction_per_migration=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported: run `hiddenmodel migrate`")
run_migrations_online()
