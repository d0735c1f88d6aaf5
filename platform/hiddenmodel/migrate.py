"""``hiddenmodel migrate``: bootstrap roles and database, then ``alembic upgrade head``."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.engine import URL

from hiddenmodel.migration_helpers import (
    APP_ROLE,
    AUTH_ROLE,
    LOOKUP_ROLE,
    OPS_ROLE,
    OWNER_ROLE,
    WORKER_ROLE,
)
from hiddenmodel.settings import Settings, get_settings

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Role attributes are set explicitly every time, so a role created by hand cannot keep a
# dangerous attribute (the app role must never be superuser or bypass RLS).
ROLE_ATTRIBUTES = {
    OWNER_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
    APP_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
    OPS_ROLE: "LOGIN NOSUPERUSER BYPASSRLS NOCREATEROLE NOCREATEDB",
    LOOKUP_ROLE: "NOLOGIN NOSUPERUSER BYPASSRLS NOCREATEROLE NOCREATEDB",
    WORKER_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
    AUTH_ROLE: "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB",
}


class BootstrapError(RuntimeError):
    pass


def _role_urls(settings: Settings) -> dict[str, URL]:
    urls = {
        OWNER_ROLE: make_url(settings.database_owner_url),
        APP_ROLE: make_url(settings.database_url),
        OPS_ROLE: make_url(settings.database_ops_url),
        WORKER_ROLE: make_url(settings.database_worker_url),
        AUTH_ROLE: make_url(settings.database_auth_url),
    }
    for role, url in urls.items():
        if url.username != role:
            raise BootstrapError(f"the URL for role {role} logs in as {url.username!r}")
    databases = {url.database for url in urls.values()}
    if len(databases) != 1:
        raise BootstrapError(
            f"the role URLs name different databases: {sorted(map(str, databases))}"
        )
    return urls


def bootstrap(settings: Settings | None = None) -> None:
    """Create or correct the roles and the database (needs ``HM_DATABASE_ADMIN_URL``)."""
    settings = settings or get_settings()
    urls = _role_urls(settings)
    database = urls[APP_ROLE].database
    admin = create_engine(
        settings.database_admin_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        for role, attributes in ROLE_ATTRIBUTES.items():
            exists = conn.execute(
                text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}
            ).scalar()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(text(f'{verb} ROLE "{role}" {attributes}'))
            password = urls[role].password if role in urls else None
            if password:
                conn.execute(text(f'ALTER ROLE "{role}" PASSWORD ' + _literal(str(password))))
        conn.execute(text(f'GRANT "{LOOKUP_ROLE}" TO "{OWNER_ROLE}"'))
        # The workers act on tenant tables exactly as the app does (row-level security
        # included); what they may do beyond it is granted to hm_worker alone.
        conn.execute(text(f'GRANT "{APP_ROLE}" TO "{WORKER_ROLE}"'))
        if not conn.execute(
            text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database}
        ).scalar():
            conn.execute(text(f'CREATE DATABASE "{database}" OWNER "{OWNER_ROLE}"'))
        for role in (APP_ROLE, OPS_ROLE, WORKER_ROLE, AUTH_ROLE):
            conn.execute(text(f'GRANT CONNECT ON DATABASE "{database}" TO "{role}"'))
    admin.dispose()


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def alembic_config(url: str | None = None) -> Config:
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    if url:
        config.attributes["url"] = url
    return config


def upgrade(settings: Settings | None = None, revision: str = "head") -> None:
    settings = settings or get_settings()
    command.upgrade(alembic_config(settings.database_owner_url), revision)


def migrate(settings: Settings | None = None) -> None:
    settings = settings or get_settings()
    bootstrap(settings)
    upgrade(settings)
