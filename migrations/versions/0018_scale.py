"""Costs that do not grow with the data: job counters and daily usage roll-ups.

* ``job_counts``: queued and running jobs per organization, member and API key (one row
  each, ``subject_type`` ``org``/``member``/``api_key``). Kept by ``hm_count_jobs``, a row
  trigger on ``jobs`` that runs in the very transaction that inserts a job or changes its
  status (submit, claim, settle, cancel, expiry, recovery), so no code path can forget it.
  ``hm_submit_job`` v2 reads its queue limits from these rows instead of counting the
  organization's queued jobs on every submit.
* ``usage_daily``: usage per organization, UTC day, operation, member and API key (numeric
  sums, as the reports sum the events). Kept by ``hm_roll_up_usage``, a row trigger on
  ``usage_events`` (written at settle time); the usage reports and statements read it, so a
  month's report reads at most a few thousand rows whatever the number of jobs.
* Both trigger functions are definers owned by the lookup role (it bypasses RLS): a job's
  ``user_id`` set to null by a user's deletion is a foreign-key action, not a tenant
  session, and must still be counted. Each touches only the rows of the job's or event's
  own organization.
* ``hm_claim_dispatch`` v3: the organizations with queued jobs come from their counter rows,
  each one's first outbox rows by admission from ``ix_job_outbox_org_created`` (an outbox row
  now carries its job's admission time, also when recovery puts the job back), and what it has
  in flight from ``ix_jobs_org_inflight`` (dispatched, unfinished jobs only): a wake no longer
  ranks every queued job. Same order, same caps, same fairness as v2.
* Both tables are filled from what exists (the owner reads past RLS for the length of this
  migration's transaction).

Revision ID: 0018_scale
Revises: 0017_account_security
Create Date: 2026-12-04
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

revision: str = "0018_scale"
down_revision: str | None = "0017_account_security"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = "('queued', 'running')"
RECOUNTED = ("jobs", "usage_events", "job_counts", "usage_daily", "job_outbox")


def _org() -> sa.Column[object]:
    return sa.Column(
        "organization_id",
        UUID(as_uuid=True),
        sa.ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
    )


def upgrade() -> None:
    op.create_table(
        "job_counts",
        _org(),
        sa.Column("subject_type", sa.String(16), nullable=False),
        sa.Column("subject_id", UUID(as_uuid=True), nullable=False),
        sa.Column("queued", sa.Integer, nullable=False, server_default="0"),
        sa.Column("running", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("organization_id", "subject_type", "subject_id"),
        sa.CheckConstraint(
            "subject_type IN ('org', 'member', 'api_key')", name="ck_job_counts_subject_type"
        ),
    )
    enable_tenant_rls("job_counts")

    op.create_table(
        "usage_daily",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        _org(),
        sa.Column("day", sa.Date, nullable=False),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("user_id", UUID(as_uuid=True)),
        sa.Column("api_key_id", UUID(as_uuid=True)),
        sa.Column("jobs", sa.BigInteger, nullable=False),
        sa.Column("gpu_seconds", sa.Numeric, nullable=False),
        sa.Column("images", sa.BigInteger, nullable=False),
        sa.Column("megapixels", sa.Numeric, nullable=False),
    )
    # One row per group; a job without a member or a key is its own group (NULLS NOT
    # DISTINCT), and a period's rows are one range of this index.
    op.execute(
        "CREATE UNIQUE INDEX uq_usage_daily_group ON usage_daily "
        "(organization_id, day, operation, user_id, api_key_id) NULLS NOT DISTINCT"
    )
    enable_tenant_rls("usage_daily")

    op.execute(f"GRANT SELECT, INSERT, UPDATE ON job_counts TO {LOOKUP_ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON usage_daily TO {LOOKUP_ROLE}")
    op.execute(f"GRANT USAGE ON SEQUENCE usage_daily_id_seq TO {LOOKUP_ROLE}")

    create_function("hm_count_jobs", 1)
    create_function("hm_roll_up_usage", 1)
    for fn in ("hm_count_jobs()", "hm_roll_up_usage()"):
        op.execute(f"ALTER FUNCTION {fn} OWNER TO {LOOKUP_ROLE}")

    # What exists now, counted once, before the triggers keep it (the migration holds the
    # tables' locks, so nothing moves in between).
    for table in RECOUNTED:
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
    op.execute("LOCK TABLE jobs, usage_events IN SHARE MODE")
    for kind, column in (
        ("org", "organization_id"),
        ("member", "user_id"),
        ("api_key", "api_key_id"),
    ):
        op.execute(
            f"""
            INSERT INTO job_counts (organization_id, subject_type, subject_id, queued, running)
            SELECT organization_id, '{kind}', {column},
                   count(*) FILTER (WHERE status = 'queued'),
                   count(*) FILTER (WHERE status = 'running')
            FROM jobs WHERE status IN {LIVE} AND {column} IS NOT NULL
            GROUP BY organization_id, {column}
            """  # noqa: S608 - names from the loop above, no input
        )
    op.execute(
        """
        INSERT INTO usage_daily (organization_id, day, operation, user_id, api_key_id, jobs,
                                 gpu_seconds, images, megapixels)
        SELECT organization_id, (created_at AT TIME ZONE 'UTC')::date, operation, user_id,
               api_key_id, count(*), sum(gpu_seconds::numeric), sum(images),
               sum(megapixels::numeric)
        FROM usage_events
        GROUP BY 1, 2, 3, 4, 5
        """
    )
    # Outbox rows carry their job's admission time (a re-queued job's row too, from now on).
    op.execute(
        "UPDATE job_outbox o SET created_at = j.created_at FROM jobs j "
        "WHERE j.id = o.job_id AND o.created_at <> j.created_at"
    )
    for table in RECOUNTED:
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")

    op.execute(
        "CREATE TRIGGER trg_jobs_count_insert AFTER INSERT ON jobs FOR EACH ROW "
        f"WHEN (NEW.status IN {LIVE}) EXECUTE FUNCTION hm_count_jobs()"
    )
    op.execute(
        "CREATE TRIGGER trg_jobs_count_update "
        "AFTER UPDATE OF status, user_id, api_key_id ON jobs FOR EACH ROW "
        f"WHEN ((OLD.status IN {LIVE} OR NEW.status IN {LIVE}) "
        "AND (OLD.status IS DISTINCT FROM NEW.status "
        "OR OLD.user_id IS DISTINCT FROM NEW.user_id "
        "OR OLD.api_key_id IS DISTINCT FROM NEW.api_key_id)) "
        "EXECUTE FUNCTION hm_count_jobs()"
    )
    op.execute(
        "CREATE TRIGGER trg_jobs_count_delete AFTER DELETE ON jobs FOR EACH ROW "
        f"WHEN (OLD.status IN {LIVE}) EXECUTE FUNCTION hm_count_jobs()"
    )
    op.execute(
        "CREATE TRIGGER trg_usage_events_roll_up AFTER INSERT OR DELETE ON usage_events "
        "FOR EACH ROW EXECUTE FUNCTION hm_roll_up_usage()"
    )

    create_function("hm_submit_job", 2)

    # The dispatcher reads each organization's first outbox rows by admission, and counts
    # only what is in flight: a wake costs the same with 100 or 100,000 jobs queued.
    op.create_index(
        "ix_job_outbox_org_created", "job_outbox", ["organization_id", "created_at", "id"]
    )
    op.create_index(
        "ix_jobs_org_inflight",
        "jobs",
        ["organization_id"],
        postgresql_where=sa.text("status IN ('queued', 'running') AND dispatched_at IS NOT NULL"),
    )
    create_function("hm_claim_dispatch", 3)


def downgrade() -> None:
    create_function("hm_claim_dispatch", 2)
    op.drop_index("ix_jobs_org_inflight", table_name="jobs")
    op.drop_index("ix_job_outbox_org_created", table_name="job_outbox")
    create_function("hm_submit_job", 1)
    for trigger, table in (
        ("trg_jobs_count_insert", "jobs"),
        ("trg_jobs_count_update", "jobs"),
        ("trg_jobs_count_delete", "jobs"),
        ("trg_usage_events_roll_up", "usage_events"),
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS hm_count_jobs()")
    op.execute("DROP FUNCTION IF EXISTS hm_roll_up_usage()")
    disable_tenant_rls("usage_daily")
    op.drop_table("usage_daily")
    disable_tenant_rls("job_counts")
    op.drop_table("job_counts")
