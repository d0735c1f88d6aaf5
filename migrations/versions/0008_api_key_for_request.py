"""Find an API key and bind its organization to the transaction in one statement.

Every API-key request began with two round trips before doing anything: ``set_config`` to
bind the organization (row-level security), then the key lookup. ``hm_api_key_for_request``
does both: it binds the organization the token names, then reads the key and its
organization under that binding, so RLS still decides what it can see. A token naming one
organization with another's key finds nothing.

It runs as the caller (SECURITY INVOKER). The rows come back as JSON so the function does
not have to list their columns: a column added to either table later comes back too.

Revision ID: 0008_api_key_for_request
Revises: 0007_submit_job
Create Date: 2026-11-27
"""

from collections.abc import Sequence

from alembic import op

from hiddenmodel.migration_helpers import APP_ROLE

revision: str = "0008_api_key_for_request"
down_revision: str | None = "0007_submit_job"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "hm_api_key_for_request(uuid, varchar)"


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION hm_api_key_for_request(p_org uuid, p_key_hash varchar)
        RETURNS TABLE (api_key jsonb, organization jsonb)
        LANGUAGE plpgsql
        SET search_path = public, pg_temp
        AS $$
        BEGIN
            -- Local to the transaction, like every tenant session's binding; it outlives
            -- this call (the SET clause above restores search_path only).
            PERFORM set_config('app.org_id', p_org::text, true);
            RETURN QUERY
                SELECT to_jsonb(k), to_jsonb(o)
                  FROM api_keys k JOIN organizations o ON o.id = k.organization_id
                 WHERE k.key_hash = p_key_hash;
        END
        $$
        """
    )
    op.execute(f"GRANT EXECUTE ON FUNCTION {SIGNATURE} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
