"""Core: users, organizations, memberships, invitations, API keys, audit, mail; RLS and grants.

Revision ID: 0001_core
Revises:
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

from hiddenmodel.migration_helpers import (
    APP_ROLE,
    LOOKUP_ROLE,
    OPS_ROLE,
    disable_tenant_rls,
    enable_tenant_rls,
)

revision: str = "0001_core"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORG_TABLES = ("memberships", "invitations", "api_keys", "audit_events")


def _id() -> sa.Column[object]:
    return sa.Column("id", UUID(as_uuid=True), primary_key=True)


def _created() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def _org() -> sa.Column[object]:
    return sa.Column(
        "organization_id",
        UUID(as_uuid=True),
        sa.ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    op.execute(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}, {OPS_ROLE}, {LOOKUP_ROLE}")
    op.execute(f"GRANT CREATE ON SCHEMA public TO {LOOKUP_ROLE}")
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {APP_ROLE}, {OPS_ROLE}"
    )
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public "
        f"GRANT USAGE, SELECT ON SEQUENCES TO {APP_ROLE}, {OPS_ROLE}"
    )
    # The organization bound to the current transaction, or NULL: policies compare against it,
    # so a connection without the setting sees nothing and can write nothing.
    op.execute(
        """
        CREATE FUNCTION hm_current_org_id() RETURNS uuid
        LANGUAGE sql STABLE PARALLEL SAFE
        AS $$ SELECT nullif(current_setting('app.org_id', true), '')::uuid $$
        """
    )

    op.create_table(
        "users",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("hashed_password", sa.String(1024), nullable=False),
        sa.Column("is_active", sa.Boolean, nullable=False),
        sa.Column("is_superuser", sa.Boolean, nullable=False),
        sa.Column("is_verified", sa.Boolean, nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        _created(),
    )
    op.create_index("ix_users_email", "users", ["email"], unique=True)

    op.create_table(
        "access_tokens",
        sa.Column("token_hash", sa.String(64), primary_key=True),
        sa.Column(
            "user_id",
            UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        _created(),
    )
    op.create_index("ix_access_tokens_user", "access_tokens", ["user_id"])

    op.create_table(
        "organizations",
        _id(),
        sa.Column("slug", sa.String(63), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        _created(),
    )

    op.create_table(
        "memberships",
        _id(),
        _org(),
        sa.Column(
            "user_id",
            UUID(as_uuid=True),
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("role", sa.String(20), nullable=False),
        _created(),
        sa.UniqueConstraint("organization_id", "user_id", name="uq_memberships_org_user"),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member', 'billing')", name="ck_memberships_role"
        ),
    )
    op.create_index(
        "ix_memberships_org_created", "memberships", ["organization_id", "created_at", "id"]
    )
    # Serves hm_user_organizations(), the one cross-tenant lookup (a user's own orgs).
    op.create_index("ix_memberships_user", "memberships", ["user_id"])

    op.create_table(
        "invitations",
        _id(),
        _org(),
        sa.Column("email", sa.String(320), nullable=False),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column(
            "invited_by_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="SET NULL")
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("accepted_at", sa.DateTime(timezone=True)),
        sa.Column(
            "accepted_by_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="SET NULL")
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        _created(),
        sa.UniqueConstraint("organization_id", "token_hash", name="uq_invitations_org_token"),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member', 'billing')", name="ck_invitations_role"
        ),
    )
    op.create_index(
        "ix_invitations_org_created", "invitations", ["organization_id", "created_at", "id"]
    )

    op.create_table(
        "api_keys",
        _id(),
        _org(),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(32), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", ARRAY(sa.String(32)), nullable=False),
        sa.Column(
            "created_by_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="SET NULL")
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("last_used_at", sa.DateTime(timezone=True)),
        sa.Column("revoked_at", sa.DateTime(timezone=True)),
        _created(),
        sa.UniqueConstraint("organization_id", "key_hash", name="uq_api_keys_org_hash"),
    )
    op.create_index("ix_api_keys_org_created", "api_keys", ["organization_id", "created_at", "id"])

    op.create_table(
        "audit_events",
        _id(),
        _org(),
        sa.Column("actor_user_id", UUID(as_uuid=True)),
        sa.Column("actor_api_key_id", UUID(as_uuid=True)),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(64)),
        sa.Column("data", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        _created(),
    )
    op.create_index(
        "ix_audit_events_org_created", "audit_events", ["organization_id", "created_at", "id"]
    )

    op.create_table(
        "operator_audit_events",
        _id(),
        sa.Column("actor", sa.String(320), nullable=False),
        sa.Column("purpose", sa.String(200), nullable=False),
        sa.Column("detail", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        _created(),
    )
    op.create_index("ix_operator_audit_events_created", "operator_audit_events", ["created_at"])

    op.create_table(
        "email_messages",
        _id(),
        sa.Column("to_address", sa.String(320), nullable=False),
        sa.Column("subject", sa.String(300), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        _created(),
    )
    op.create_index("ix_email_messages_to_address", "email_messages", ["to_address"])

    # The tenant row itself is visible only inside its own context.
    enable_tenant_rls("organizations", column="id")
    for table in ORG_TABLES:
        enable_tenant_rls(table)
    # The app role may append to the operator audit log but never rewrite it.
    op.execute(f"REVOKE UPDATE, DELETE ON operator_audit_events FROM {APP_ROLE}")

    # A user's own organizations: the only read across tenants the app role may make, through a
    # definer function that returns rows for exactly one user id.
    op.execute(f"GRANT SELECT ON organizations, memberships TO {LOOKUP_ROLE}")
    op.execute(
        """
        CREATE FUNCTION hm_user_organizations(p_user_id uuid)
        RETURNS TABLE (organization_id uuid, slug varchar, name varchar, role varchar,
                       joined_at timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT o.id, o.slug, o.name, m.role, m.created_at
            FROM memberships m JOIN organizations o ON o.id = m.organization_id
            WHERE m.user_id = p_user_id
            ORDER BY o.slug
        $$
        """
    )
    op.execute(f"ALTER FUNCTION hm_user_organizations(uuid) OWNER TO {LOOKUP_ROLE}")
    op.execute("REVOKE ALL ON FUNCTION hm_user_organizations(uuid) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION hm_user_organizations(uuid) TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS hm_user_organizations(uuid)")
    for table in (*ORG_TABLES, "organizations"):
        disable_tenant_rls(table)
    for table in (
        "email_messages",
        "operator_audit_events",
        "audit_events",
        "api_keys",
        "invitations",
        "memberships",
        "organizations",
        "access_tokens",
        "users",
    ):
        op.drop_table(table)
    op.execute("DROP FUNCTION IF EXISTS hm_current_org_id()")
