"""SQL that every migration creating an org-scoped table must run."""

from __future__ import annotations

from alembic import op

from hiddenmodel.sqlfunctions import function_file

APP_ROLE = "hm_app"
OPS_ROLE = "hm_ops"
OWNER_ROLE = "hm_owner"
LOOKUP_ROLE = "hm_lookup"
# The worker processes: a member of hm_app (the same rights on tables) that alone may run
# the cross-tenant sweeps (dispatch, reconcile, retention, webhook and usage scans).
WORKER_ROLE = "hm_worker"
# Sign-in's password check: may read a user's id and password hash, nothing else.
AUTH_ROLE = "hm_auth"


def enable_tenant_rls(table: str, column: str = "organization_id") -> None:
    """ENABLE + FORCE row-level security with one policy on the bound organization."""
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON {table} "
        f"USING ({column} = hm_current_org_id()) "
        f"WITH CHECK ({column} = hm_current_org_id())"
    )


def disable_tenant_rls(table: str) -> None:
    op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
    op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")


def create_function(name: str, version: int) -> None:
    """Create or replace a function from ``migrations/sql/<name>/v<version>.sql``."""
    # Straight to the driver with no parameters: the body is SQL, not a template (its ``%``
    # and ``:name`` are PL/pgSQL's own).
    op.get_bind().exec_driver_sql(
        function_file(name, version).read(), execution_options={"no_parameters": True}
    )
