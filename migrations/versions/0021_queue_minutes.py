"""A queued job's position in constant work: the organization's queued jobs per minute.

A queued job's ``queue_position`` is how many of its organization's queued jobs were admitted
before it. It was the organization's queued counter less a count of the queued jobs admitted
since the job, an index scan that grew with the job's depth in the queue (40,000 entries for
the front of the biggest organization's queue at 10 M jobs).

* ``job_queue_minutes``: an organization's queued jobs per minute of admission (``minute``,
  the start of the UTC minute of the job's ``created_at``), only minutes that hold some. Kept
  by ``hm_count_jobs`` v2 beside the counters, in the transaction that admits, claims,
  cancels, expires, re-queues or deletes the job, each minute's row locked after the
  organization's counter row (so no new lock order), and deleted when it comes to zero.
* A job's position is then the sum of the rows of the minutes before its own plus a count of
  the queued jobs admitted in its own minute before it: exact, and its cost follows how many
  minutes the queue spans and how many jobs came in one minute, not how many are queued.
* The table is filled from the queued jobs that exist (the owner reads past RLS for the length
  of this migration's transaction, which holds the jobs table's lock).

Revision ID: 0021_queue_minutes
Revises: 0020_effective_limits
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from hiddenmodel.migration_helpers import (
    LOOKUP_ROLE,
    create_function,
    disable_tenant_rls,
    enable_tenant_rls,
)

revision: str = "0021_queue_minutes"
down_revision: str | None = "0020_effective_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The start of a job's UTC minute, whatever the session's time zone (the same expression as
# hm_count_jobs v2 and hiddenmodel.jobs.repository.queue_positions).
MINUTE = "date_bin('1 minute', created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')"


def upgrade() -> None:
    op.create_table(
        "job_queue_minutes",
        sa.Column(
            "organization_id",
            UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("minute", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("organization_id", "minute"),
        sa.CheckConstraint("queued >= 0", name="ck_job_queue_minutes_queued"),
    )
    enable_tenant_rls("job_queue_minutes")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON job_queue_minutes TO {LOOKUP_ROLE}")

    op.execute("ALTER TABLE jobs NO FORCE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE job_queue_minutes NO FORCE ROW LEVEL SECURITY")
    op.execute("LOCK TABLE jobs IN SHARE MODE")
    op.execute(
        f"""
        INSERT INTO job_queue_minutes (organization_id, minute, queued)
        SELECT organization_id, {MINUTE}, count(*) FROM jobs WHERE status = 'queued'
        GROUP BY 1, 2
        """  # noqa: S608 - a constant expression, no input
    )
    op.execute("ALTER TABLE job_queue_minutes FORCE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE jobs FORCE ROW LEVEL SECURITY")
    # CREATE OR REPLACE keeps the function's owner (the lookup role) and its triggers.
    create_function("hm_count_jobs", 2)


def downgrade() -> None:
    create_function("hm_count_jobs", 1)
    disable_tenant_rls("job_queue_minutes")
    op.drop_table("job_queue_minutes")
