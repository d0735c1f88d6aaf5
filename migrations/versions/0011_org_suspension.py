"""Organizations can be suspended by a platform operator.

``organizations.suspended_at`` marks a suspended organization: its API keys and members are
refused (checked where a request enters the organization), and the dispatcher leaves its queued
jobs in the outbox, so they wait, unbilled, until the organization is unsuspended.
``hm_claim_dispatch`` version 2 (``migrations/sql``) is version 1, the order by admission of
0009, with the suspended organizations left out.

Revision ID: 0011_org_suspension
Revises: 0010_batches
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from hiddenmodel.migration_helpers import create_function

revision: str = "0011_org_suspension"
down_revision: str | None = "0010_batches"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "organizations", sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True)
    )
    create_function("hm_claim_dispatch", 2)


def downgrade() -> None:
    create_function("hm_claim_dispatch", 1)
    op.drop_column("organizations", "suspended_at")
