"""Billing with Stripe: webhook events (global), daily reconciliations (org-scoped), and the
narrow definer functions that let the pusher, the webhook and the reconciliation cross tenants.

Revision ID: 0005_billing
Revises: 0004_usage
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from hiddenmodel.migration_helpers import (
    APP_ROLE,
    LOOKUP_ROLE,
    OPS_ROLE,
    disable_tenant_rls,
    enable_tenant_rls,
)

revision: str = "0005_billing"
down_revision: str | None = "0004_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DUE_FUNCTION = "hm_usage_events_due(integer)"
CUSTOMER_FUNCTION = "hm_org_by_stripe_customer(varchar)"
BILLED_ORGS_FUNCTION = "hm_billing_customer_orgs()"
FUNCTIONS = (DUE_FUNCTION, CUSTOMER_FUNCTION, BILLED_ORGS_FUNCTION)


def upgrade() -> None:
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(100), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("livemode", sa.Boolean, nullable=False),
        sa.Column("customer_id", sa.String(255)),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column(
            "received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("handled_at", sa.DateTime(timezone=True)),
        sa.Column("outcome", sa.String(32)),
    )
    op.create_index(
        "ix_stripe_events_customer_created", "stripe_events", ["customer_id", "created"]
    )
    # A record of what Stripe told us: the app stores and marks events, never deletes them.
    op.execute(f"REVOKE DELETE ON stripe_events FROM {APP_ROLE}")

    op.create_table(
        "billing_reconciliations",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "organization_id",
            UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("stripe_customer_id", sa.String(255), nullable=False),
        sa.Column("our_value", sa.BigInteger, nullable=False),
        sa.Column("our_events", sa.Integer, nullable=False),
        sa.Column("stripe_value", sa.Float),
        sa.Column("difference", sa.Float),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("organization_id", "day", name="uq_billing_reconciliations_org_day"),
        sa.CheckConstraint(
            "status IN ('match', 'mismatch', 'error')", name="ck_billing_reconciliations_status"
        ),
    )
    enable_tenant_rls("billing_reconciliations")

    # Usage events due for Stripe, across tenants: ids only. The pusher claims and sends each
    # inside its own organization's tenant session (compare-and-set there).
    op.execute(
        f"GRANT SELECT (id, organization_id, stripe_status, stripe_next_attempt_at) "
        f"ON usage_events TO {LOOKUP_ROLE}"
    )
    op.execute(
        """
        CREATE FUNCTION hm_usage_events_due(p_limit integer)
        RETURNS TABLE (out_org uuid, out_event uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT u.organization_id, u.id
            FROM usage_events u
            WHERE u.stripe_status = 'pending' AND u.stripe_next_attempt_at <= now()
            ORDER BY u.stripe_next_attempt_at
            LIMIT p_limit
        $$
        """
    )
    # The organization (at most two rows, so a duplicate mapping is noticed) whose billing
    # row holds a Stripe customer id: Stripe's webhooks name customers, not organizations.
    op.execute(
        """
        CREATE FUNCTION hm_org_by_stripe_customer(p_customer varchar)
        RETURNS TABLE (out_org uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT b.organization_id FROM org_billing b
            WHERE b.stripe_customer_id = p_customer
            ORDER BY b.organization_id
            LIMIT 2
        $$
        """
    )
    # Organizations that have a Stripe customer: the daily reconciliation visits each.
    op.execute(
        """
        CREATE FUNCTION hm_billing_customer_orgs()
        RETURNS TABLE (out_org uuid)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT b.organization_id FROM org_billing b
            WHERE b.stripe_customer_id IS NOT NULL
            ORDER BY b.organization_id
        $$
        """
    )
    for fn in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {fn} OWNER TO {LOOKUP_ROLE}")
        op.execute(f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    for fn in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {fn}")
    op.execute(f"REVOKE ALL ON usage_events FROM {LOOKUP_ROLE}")
    disable_tenant_rls("billing_reconciliations")
    op.drop_table("billing_reconciliations")
    op.drop_table("stripe_events")
