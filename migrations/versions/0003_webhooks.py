"""Webhook endpoints, deliveries and their attempts; the sweeper's narrow definer function.

Revision ID: 0003_webhooks
Revises: 0002_jobs
Create Date: 2026-11-28
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

revision: str = "0003_webhooks"
down_revision: str | None = "0002_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("webhook_endpoints", "webhook_deliveries", "webhook_delivery_attempts")
DUE_FUNCTION = "hm_webhook_deliveries_due(double precision, integer)"


def _org() -> sa.Column[object]:
    return sa.Column(
        "organization_id",
        UUID(as_uuid=True),
        sa.ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
    )


def _created() -> sa.Column[object]:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("description", sa.String(500), nullable=False, server_default=""),
        sa.Column(
            "event_types", ARRAY(sa.String(64)), nullable=False, server_default=sa.text("'{}'")
        ),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("secret_ciphertext", sa.LargeBinary, nullable=False),
        sa.Column("previous_secret_ciphertext", sa.LargeBinary),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True)),
        _created(),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("organization_id", "id", name="uq_webhook_endpoints_org_id"),
    )
    op.create_index(
        "ix_webhook_endpoints_org_created",
        "webhook_endpoints",
        ["organization_id", "created_at", "id"],
    )

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True)),
        sa.Column(
            "enqueued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True)),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("redelivery_of", UUID(as_uuid=True)),
        _created(),
        sa.ForeignKeyConstraint(
            ["organization_id", "endpoint_id"],
            ["webhook_endpoints.organization_id", "webhook_endpoints.id"],
            ondelete="CASCADE",
            name="fk_webhook_deliveries_endpoint",
        ),
        sa.UniqueConstraint("organization_id", "id", name="uq_webhook_deliveries_org_id"),
        sa.CheckConstraint(
            "status IN ('pending', 'delivering', 'succeeded', 'failed')",
            name="ck_webhook_deliveries_status",
        ),
        sa.CheckConstraint(
            "status NOT IN ('pending', 'delivering') OR next_attempt_at IS NOT NULL",
            name="ck_webhook_deliveries_live_scheduled",
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_org_endpoint_created",
        "webhook_deliveries",
        ["organization_id", "endpoint_id", "created_at", "id"],
    )
    # Live deliveries only: what the sweeper scans across tenants (definer function below).
    op.create_index(
        "ix_webhook_deliveries_live",
        "webhook_deliveries",
        ["organization_id", "next_attempt_at"],
        postgresql_where=sa.text("status IN ('pending', 'delivering')"),
    )

    op.create_table(
        "webhook_delivery_attempts",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column("delivery_id", UUID(as_uuid=True), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("status_code", sa.Integer),
        sa.Column("error", sa.Text),
        sa.Column("response_body", sa.Text),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        _created(),
        sa.ForeignKeyConstraint(
            ["organization_id", "delivery_id"],
            ["webhook_deliveries.organization_id", "webhook_deliveries.id"],
            ondelete="CASCADE",
            name="fk_webhook_delivery_attempts_delivery",
        ),
        sa.UniqueConstraint(
            "organization_id", "delivery_id", "attempt", name="uq_webhook_delivery_attempts"
        ),
    )

    for table in TABLES:
        enable_tenant_rls(table)

    # Deliveries whose message may have been lost (Redis flushed, a worker killed mid-attempt):
    # due for longer than the grace period and not handed to the broker within it. Marks them
    # re-enqueued and returns ids only; the worker's compare-and-set claim makes duplicates
    # harmless. The definer sees a few columns and may write one.
    op.execute(
        f"GRANT SELECT (id, organization_id, status, next_attempt_at, enqueued_at) ON webhook_deliveries TO {LOOKUP_ROLE}"
    )
    op.execute(f"GRANT UPDATE (enqueued_at) ON webhook_deliveries TO {LOOKUP_ROLE}")
    op.execute(
        """
        CREATE FUNCTION hm_webhook_deliveries_due(p_grace_seconds double precision, p_limit integer)
        RETURNS TABLE (out_org uuid, out_delivery uuid)
        LANGUAGE sql VOLATILE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            WITH due AS (
                SELECT d.id
                FROM webhook_deliveries d
                WHERE d.status IN ('pending', 'delivering')
                  AND d.next_attempt_at < now() - make_interval(secs => p_grace_seconds)
                  AND d.enqueued_at < now() - make_interval(secs => p_grace_seconds)
                ORDER BY d.next_attempt_at
                LIMIT p_limit
                FOR UPDATE SKIP LOCKED
            )
            UPDATE webhook_deliveries d
            SET enqueued_at = now()
            FROM due
            WHERE d.id = due.id
            RETURNING d.organization_id, d.id
        $$
        """
    )
    op.execute(f"ALTER FUNCTION {DUE_FUNCTION} OWNER TO {LOOKUP_ROLE}")
    op.execute(f"REVOKE ALL ON FUNCTION {DUE_FUNCTION} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {DUE_FUNCTION} TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {DUE_FUNCTION}")
    op.execute(f"REVOKE ALL ON webhook_deliveries FROM {LOOKUP_ROLE}")
    for table in reversed(TABLES):
        disable_tenant_rls(table)
        op.drop_table(table)
