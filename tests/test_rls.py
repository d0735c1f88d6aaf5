"""Row-level security, proven for every mapped table that carries an organization.

The table list comes from the ORM metadata, so a new org-scoped table is tested without
anyone remembering to add it — and fails here until it has RLS and a row factory.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text
from sqlalchemy.exc import DBAPIError

import hiddenmodel.registry
from hiddenmodel.db import (
    Base,
    async_engine,
    async_global_session,
    async_tenant_session,
    ops_session,
    tenant_session,
)
from hiddenmodel.tenancy import TenantContextMissing, org_context
from tests.conftest import db_rows, db_scalar, unique

# Mapped tables whose isolation column is not ``organization_id``.
ISOLATION_COLUMN = {"organizations": "id"}


def _org_scoped_tables() -> list[str]:
    tables = [t.name for t in Base.metadata.sorted_tables if "organization_id" in t.c]
    # Foreign-key order, the tenant table first: parents exist before their children.
    return [*ISOLATION_COLUMN, *(t for t in tables if t not in ISOLATION_COLUMN)]


def _user(conn_rows: Callable[..., Any]) -> uuid.UUID:
    user_id = uuid.uuid4()
    conn_rows(
        "INSERT INTO users (id, email, hashed_password, is_active, is_superuser, is_verified) "
        "VALUES (:id, :email, 'x', true, false, false)",
        id=user_id,
        email=f"{unique()}@example.com",
    )
    return user_id


def _now() -> datetime:
    return datetime.now(UTC)


# Rows that reference another org-scoped row (the outbox points at a job) take the parent's
# latest id from here; seeding follows foreign-key order, so parents come first.
JOB_IDS: dict[uuid.UUID, uuid.UUID] = {}


def _new_job_id(org: uuid.UUID) -> uuid.UUID:
    JOB_IDS[org] = uuid.uuid4()
    return JOB_IDS[org]


# One factory per org-scoped table: the column values of a valid row for ``org_id``.
ROW_FACTORIES: dict[str, Callable[[uuid.UUID, uuid.UUID], dict[str, Any]]] = {
    "organizations": lambda org, user: {"id": org, "slug": unique("rls"), "name": "RLS"},
    "memberships": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "user_id": user,
        "role": "member",
    },
    "invitations": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "email": "x@example.com",
        "role": "member",
        "token_hash": uuid.uuid4().hex,
        "expires_at": _now() + timedelta(days=1),
    },
    "api_keys": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "name": "k",
        "prefix": "hmk_x",
        "key_hash": uuid.uuid4().hex,
        "scopes": ["jobs:read"],
    },
    "jobs": lambda org, user: {
        "id": _new_job_id(org),
        "organization_id": org,
        "operation": "resize",
        "operation_version": "1.0",
        "queue": "cpu",
        "params": {},
        "status": "queued",
        "inputs": {},
        "request_hash": "x",
    },
    "batches": lambda org, user: {
        "id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:batch:{org}"),
        "organization_id": org,
        "operation": "resize",
        "params": {},
        "status": "open",
    },
    "batch_items": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "batch_id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:batch:{org}"),
        "position": 0,
        "name": "a.png",
        "params": {},
        "inputs": {},
        "job_id": uuid.uuid4(),
    },
    "job_outbox": lambda org, user: {
        "organization_id": org,
        "job_id": JOB_IDS[org],
        "queue": "cpu",
    },
    "webhook_endpoints": lambda org, user: {
        "id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:webhook-endpoint:{org}"),
        "organization_id": org,
        "url": "https://example.com/hook",
        "secret_ciphertext": b"sealed",
    },
    "webhook_deliveries": lambda org, user: {
        "id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:webhook-delivery:{org}"),
        "organization_id": org,
        "endpoint_id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:webhook-endpoint:{org}"),
        "event_type": "webhook.test",
        "payload": {},
        "message_id": "msg_rls",
        "next_attempt_at": _now(),
    },
    "webhook_delivery_attempts": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "delivery_id": uuid.uuid5(uuid.NAMESPACE_URL, f"rls:webhook-delivery:{org}"),
        "attempt": 1,
        "duration_ms": 1,
    },
    "org_retention": lambda org, user: {"organization_id": org, "days": 7},
    # Zero concurrent jobs: a dispatcher running beside these tests must leave the seeded
    # outbox rows alone.
    "org_billing": lambda org, user: {
        "organization_id": org,
        "plan_id": uuid.UUID("00000000-0000-4000-8000-000000000001"),
        "overrides": {"max_running_jobs": 0},
    },
    "quota_limits": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "subject_type": "member",
        "subject_id": user,
        "limits": {"monthly_images": 1},
    },
    "quota_counters": lambda org, user: {
        "organization_id": org,
        "subject_type": "org",
        "subject_id": uuid.uuid4(),
        "period": date(2026, 11, 1),
    },
    "quota_reservations": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "job_id": JOB_IDS[org],
        "period": date(2026, 11, 1),
        "gpu_seconds": 1.0,
        "images": 1,
    },
    "usage_events": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "job_id": JOB_IDS[org],
        "operation": "resize",
        "outcome": "succeeded",
        "gpu_seconds": 1.0,
        "images": 1,
        "megapixels": 1.0,
    },
    "usage_daily": lambda org, user: {
        "organization_id": org,
        "day": date(2026, 11, 1),
        "operation": "rls-roll-up",
        "jobs": 1,
        "gpu_seconds": 1,
        "images": 1,
        "megapixels": 1,
    },
    "job_counts": lambda org, user: {
        "organization_id": org,
        "subject_type": "member",
        "subject_id": uuid.uuid4(),
        "queued": 0,
        "running": 0,
    },
    "job_queue_minutes": lambda org, user: {
        "organization_id": org,
        "minute": datetime(2026, 11, 1, 12, 0, tzinfo=UTC),
        "queued": 1,
    },
    "billing_reconciliations": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "day": date(2026, 11, 1),
        "stripe_customer_id": "cus_rls",
        "our_value": 0,
        "our_events": 0,
        "status": "match",
        "checked_at": _now(),
    },
    "audit_events": lambda org, user: {
        "id": uuid.uuid4(),
        "organization_id": org,
        "action": "test",
        "target_type": "test",
    },
}

TABLES = _org_scoped_tables()


def test_every_models_module_is_registered() -> None:
    root = Path(__file__).resolve().parents[1]
    found = {
        ".".join(p.relative_to(base).with_suffix("").parts)
        for base in (root / "platform", root)
        for p in base.glob("*/**/models.py")
        if "platform" not in p.relative_to(base).parts[:1] and ".venv" not in p.parts
    }
    registered = {m.__name__ for m in hiddenmodel.registry.MODEL_MODULES}
    assert found <= registered, f"add to hiddenmodel.registry: {sorted(found - registered)}"


def test_every_org_scoped_table_has_a_factory() -> None:
    missing = set(TABLES) - set(ROW_FACTORIES)
    assert not missing, f"add RLS row factories for: {sorted(missing)}"


def _table(name: str) -> Any:
    return Base.metadata.tables[name]


async def _seed(org_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """One row in every org-scoped table for ``org_id``, written through RLS as the app."""
    async with async_tenant_session(org_id) as session, session.begin():
        for name in TABLES:
            await session.execute(
                insert(_table(name)).values(**ROW_FACTORIES[name](org_id, user_id))
            )


@pytest.fixture(scope="module")
async def two_orgs() -> tuple[uuid.UUID, uuid.UUID]:
    a, b = uuid.uuid4(), uuid.uuid4()
    user = _user(db_rows)
    await _seed(a, user)
    await _seed(b, user)
    return a, b


@pytest.mark.parametrize("table", TABLES)
def test_rls_enabled_forced_and_policy_present(table: str) -> None:
    row = db_rows(
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = :t", t=table
    )[0]
    assert row == (True, True)
    policies = db_rows("SELECT qual, with_check FROM pg_policies WHERE tablename = :t", t=table)
    assert len(policies) == 1, policies
    qual, with_check = policies[0]
    column = ISOLATION_COLUMN.get(table, "organization_id")
    assert column in qual and "hm_current_org_id()" in qual
    assert column in with_check and "hm_current_org_id()" in with_check


@pytest.mark.parametrize("table", TABLES)
def test_indexes_and_unique_keys_begin_with_the_organization(table: str) -> None:
    column = ISOLATION_COLUMN.get(table, "organization_id")
    rows = db_rows(
        "SELECT i.relname, a.attname, ix.indisunique, ix.indisprimary "
        "FROM pg_index ix JOIN pg_class t ON t.oid = ix.indrelid "
        "JOIN pg_class i ON i.oid = ix.indexrelid "
        "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = ix.indkey[0] "
        "WHERE t.relname = :t",
        t=table,
    )
    # Primary keys on a random uuid are the exception: they cannot leak or collide.
    # ix_memberships_user serves the one definer lookup of a user's own organizations.
    allowed = {"ix_memberships_user", "organizations_slug_key"}
    for name, first_column, _unique, primary in rows:
        if primary or name in allowed:
            continue
        assert first_column == column, f"{name} on {table} starts with {first_column}"


@pytest.mark.parametrize("table", TABLES)
async def test_other_org_reads_none_of_its_rows(
    table: str, two_orgs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_orgs
    column = ISOLATION_COLUMN.get(table, "organization_id")
    t = _table(table)
    async with async_tenant_session(b) as session:
        rows = (await session.execute(select(t.c[column]))).scalars().all()
        # Every column the app role may read (not the hashes: see test_least_privilege.py).
        readable = [c for c in t.c if c.name not in ("key_hash", "token_hash")]
        leaked = (await session.execute(select(*readable).where(t.c[column] == a))).all()
    assert rows and set(rows) == {b}
    assert leaked == []
    # The superuser sees both: the rows exist, RLS is what hides them.
    assert db_scalar(f"SELECT count(*) FROM {table} WHERE {column} = :a", a=a) >= 1


@pytest.mark.parametrize("table", TABLES)
async def test_other_org_cannot_insert_with_its_id(
    table: str, two_orgs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_orgs
    user = _user(db_rows)
    values = ROW_FACTORIES[table](a, user)
    if table == "organizations":
        values["id"] = uuid.uuid4()
    before = db_scalar(f"SELECT count(*) FROM {table}")
    with pytest.raises(DBAPIError, match="row-level security"):
        async with async_tenant_session(b) as session, session.begin():
            await session.execute(insert(_table(table)).values(**values))
    assert db_scalar(f"SELECT count(*) FROM {table}") == before


@pytest.mark.parametrize("table", TABLES)
async def test_other_org_cannot_update_its_rows(
    table: str, two_orgs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    a, b = two_orgs
    column = ISOLATION_COLUMN.get(table, "organization_id")
    async with async_tenant_session(b) as session, session.begin():
        # Rows of A are invisible to an UPDATE from B ...
        result = await session.execute(
            text(f"UPDATE {table} SET {column} = {column} WHERE {column} = :a"), {"a": a}
        )
        assert result.rowcount == 0  # type: ignore[attr-defined]
    # ... and B cannot move its own rows into A.
    with pytest.raises(DBAPIError, match="row-level security"):
        async with async_tenant_session(b) as session, session.begin():
            await session.execute(
                text(f"UPDATE {table} SET {column} = :a WHERE {column} = :b"), {"a": a, "b": b}
            )


@pytest.mark.parametrize("table", TABLES)
async def test_session_without_org_sees_nothing(
    table: str, two_orgs: tuple[uuid.UUID, uuid.UUID]
) -> None:
    async with async_global_session() as session:
        count = (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar()
    assert count == 0


async def test_tenant_session_without_org_raises_before_sql() -> None:
    statements: list[str] = []
    engine = async_engine().sync_engine

    def _count(*args: Any) -> None:
        statements.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", _count)
    try:
        with pytest.raises(TenantContextMissing):
            async_tenant_session()
        with pytest.raises(TenantContextMissing), tenant_session():
            pass
    finally:
        event.remove(engine, "before_cursor_execute", _count)
    assert statements == []


async def test_bound_context_is_used_and_pooled_connection_does_not_keep_it(
    two_orgs: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, _ = two_orgs
    with org_context(a):
        async with async_tenant_session() as session:
            org_ids = (await session.execute(text("SELECT id FROM organizations"))).scalars().all()
    assert org_ids == [a]
    # The setting was transaction-local: the next user of any pooled connection sees nothing.
    for _ in range(3):
        async with async_global_session() as session:
            setting = (
                await session.execute(text("SELECT current_setting('app.org_id', true)"))
            ).scalar()
            assert not setting
            assert (await session.execute(text("SELECT count(*) FROM memberships"))).scalar() == 0


def test_app_role_is_neither_superuser_nor_bypassrls() -> None:
    row = db_rows(
        "SELECT rolsuper, rolbypassrls, rolcreaterole FROM pg_roles WHERE rolname = 'hm_app'"
    )[0]
    assert tuple(row) == (False, False, False)
    owner = db_rows("SELECT tableowner FROM pg_tables WHERE tablename = 'memberships'")[0][0]
    assert owner == "hm_owner"


async def test_app_connects_as_hm_app() -> None:
    async with async_global_session() as session:
        who = (await session.execute(text("SELECT current_user"))).scalar()
    assert who == "hm_app"


async def test_ops_session_crosses_tenants_and_is_audited(
    two_orgs: tuple[uuid.UUID, uuid.UUID],
) -> None:
    a, b = two_orgs
    purpose = unique("purpose")
    async with ops_session(actor="test-operator", purpose=purpose, detail={"why": "test"}) as s:
        seen = set((await s.execute(text("SELECT id FROM organizations"))).scalars())
    assert {a, b} <= seen
    rows = db_rows("SELECT actor, detail FROM operator_audit_events WHERE purpose = :p", p=purpose)
    assert rows == [("test-operator", {"why": "test"})]


async def test_app_role_cannot_rewrite_operator_audit() -> None:
    with pytest.raises(DBAPIError, match="permission denied"):
        async with async_global_session() as session, session.begin():
            await session.execute(text("DELETE FROM operator_audit_events"))
