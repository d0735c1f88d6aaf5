"""Retention: inputs and outputs are deleted after a number of days set by the plan.

* ``plans.retention_days``: the plan's default (null keeps objects forever). The seeded plans
  get 30 days (free) and 365 days (pro).
* ``org_retention``: an organization admin's own, shorter, setting (org-scoped, RLS).
* ``jobs.expired_at``: when the job's objects were deleted. The row stays (billing history,
  usage events are never deleted); its outputs answer 410 from then on.
* ``hm_jobs_past_retention``: finished jobs whose objects are due, across organizations
  (ids only, like ``hm_usage_events_due``); the sweep deletes and marks each inside its own
  organization's tenant session. The clock is a parameter so tests can move it.
  Each organization's effective retention is the shorter of the plan's and its own
  (``LEAST`` ignores a null: forever only when both are); no billing row means the default
  plan. Both functions are loaded from ``migrations/sql``.
* ``hm_retention_by_org``: each organization's effective retention (the shorter of the
  plan's and its own), for the bucket's lifecycle rules.

Revision ID: 0014_retention
Revises: 0012_mail_outbox
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hiddenmodel.migration_helpers import (
    APP_ROLE,
    LOOKUP_ROLE,
    OPS_ROLE,
    create_function,
    disable_tenant_rls,
    enable_tenant_rls,
)

revision: str = "0014_retention"
down_revision: str | None = "0012_mail_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    "hm_jobs_past_retention(timestamp with time zone, integer)",
    "hm_retention_by_org()",
)


def upgrade() -> None:
    op.add_column(
        "plans",
        sa.Column(
            "retention_days",
            sa.Integer,
            sa.CheckConstraint("retention_days > 0", name="ck_plans_retention_days"),
        ),
    )
    op.execute("UPDATE plans SET retention_days = 30 WHERE code = 'free'")
    op.execute("UPDATE plans SET retention_days = 365 WHERE code = 'pro'")

    op.create_table(
        "org_retention",
        sa.Column(
            "organization_id",
            sa.dialects.postgresql.UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("days", sa.Integer, nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint("days > 0", name="ck_org_retention_days"),
    )
    enable_tenant_rls("org_retention")
    op.execute(f"GRANT SELECT ON org_retention TO {LOOKUP_ROLE}")

    op.add_column("jobs", sa.Column("expired_at", sa.DateTime(timezone=True)))
    # The sweep's walk per organization: finished, not yet expired, oldest first.
    op.create_index(
        "ix_jobs_org_retention",
        "jobs",
        ["organization_id", "finished_at"],
        postgresql_where=sa.text("expired_at IS NULL AND finished_at IS NOT NULL"),
    )

    create_function("hm_jobs_past_retention", 1)
    create_function("hm_retention_by_org", 1)
    for fn in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {fn} OWNER TO {LOOKUP_ROLE}")
        op.execute(f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    for fn in FUNCTIONS:
        op.execute(f"DROP FUNCTION IF EXISTS {fn}")
    op.drop_index("ix_jobs_org_retention", table_name="jobs")
    op.drop_column("jobs", "expired_at")
    disable_tenant_rls("org_retention")
    op.drop_table("org_retention")
    op.drop_column("plans", "retention_days")
