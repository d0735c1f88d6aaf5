"""Batches: a shoot's photos as one order; its items; jobs know their batch.

Both tables are org-scoped under forced row-level security like every other tenant table.
``jobs.batch_id`` is set in the transaction that admits the batch; the index on it serves the
batch's counts and the check, when a job ends, whether it was the batch's last.

Revision ID: 0010_batches
Revises: 0009_worker_liveness
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from hiddenmodel.migration_helpers import disable_tenant_rls, enable_tenant_rls

revision: str = "0010_batches"
down_revision: str | None = "0009_worker_liveness"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


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
        "batches",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column(
            "api_key_id", UUID(as_uuid=True), sa.ForeignKey("api_keys.id", ondelete="SET NULL")
        ),
        sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("name", sa.String(200)),
        sa.Column("webhook_tag", sa.String(200)),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("submitted_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        _created(),
        sa.CheckConstraint(
            "status IN ('open', 'submitted', 'completed', 'canceled')", name="batches_status"
        ),
    )
    op.create_index("ix_batches_org_created", "batches", ["organization_id", "created_at"])
    op.create_table(
        "batch_items",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column(
            "batch_id",
            UUID(as_uuid=True),
            sa.ForeignKey("batches.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column("inputs", JSONB, nullable=False),
        # The id the item's job takes when the batch is admitted (tags its objects already).
        sa.Column("job_id", UUID(as_uuid=True), nullable=False),
        sa.Column("gpu_seconds_estimate", sa.Float, nullable=False, server_default="0"),
        sa.Column("images_estimate", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        _created(),
        sa.UniqueConstraint("organization_id", "batch_id", "name", name="uq_batch_items_name"),
        sa.UniqueConstraint(
            "organization_id", "batch_id", "position", name="uq_batch_items_position"
        ),
    )
    op.add_column(
        "jobs",
        sa.Column("batch_id", UUID(as_uuid=True), sa.ForeignKey("batches.id", ondelete="SET NULL")),
    )
    op.create_index(
        "ix_jobs_org_batch_status",
        "jobs",
        ["organization_id", "batch_id", "status"],
        postgresql_where=sa.text("batch_id IS NOT NULL"),
    )
    enable_tenant_rls("batches")
    enable_tenant_rls("batch_items")


def downgrade() -> None:
    op.drop_index("ix_jobs_org_batch_status", table_name="jobs")
    op.drop_column("jobs", "batch_id")
    disable_tenant_rls("batch_items")
    disable_tenant_rls("batches")
    op.drop_table("batch_items")
    op.drop_table("batches")
