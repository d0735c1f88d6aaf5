"""Jobs and their dispatch outbox; the narrow definer functions the dispatcher uses.

Revision ID: 0002_jobs
Revises: 0001_core
Create Date: 2026-11-27
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

revision: str = "0002_jobs"
down_revision: str | None = "0001_core"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "('queued', 'running', 'succeeded', 'failed', 'canceled', 'expired')"


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "organization_id",
            UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "api_key_id", UUID(as_uuid=True), sa.ForeignKey("api_keys.id", ondelete="SET NULL")
        ),
        sa.Column("user_id", UUID(as_uuid=True), sa.ForeignKey("users.id", ondelete="SET NULL")),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("operation_version", sa.String(32), nullable=False),
        sa.Column("queue", sa.String(16), nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(64)),
        sa.Column("progress", sa.Float, nullable=False, server_default="0"),
        sa.Column("inputs", JSONB, nullable=False),
        sa.Column("outputs", JSONB, nullable=False, server_default=sa.text("'[]'::jsonb")),
        sa.Column("report", JSONB),
        sa.Column("error_code", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("idempotency_key", sa.String(255)),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("cancel_after", sa.DateTime(timezone=True)),
        sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dispatch_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("dispatched_at", sa.DateTime(timezone=True)),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True)),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("compute_seconds", sa.Float),
        sa.Column("gpu_seconds", sa.Float),
        sa.Column("worker", sa.String(200)),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(f"status IN {STATUSES}", name="ck_jobs_status"),
    )
    op.create_index("ix_jobs_org_created", "jobs", ["organization_id", "created_at", "id"])
    op.create_index(
        "ix_jobs_org_status_created", "jobs", ["organization_id", "status", "created_at"]
    )
    op.create_index(
        "uq_jobs_org_idempotency_key",
        "jobs",
        ["organization_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
    )
    # Serves the reconciler's scans of live jobs across tenants (definer functions below).
    op.create_index(
        "ix_jobs_live",
        "jobs",
        ["organization_id", "status"],
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    )

    op.create_table(
        "job_outbox",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "organization_id",
            UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("queue", sa.String(16), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("ix_job_outbox_org_id", "job_outbox", ["organization_id", "id"])

    enable_tenant_rls("jobs")
    enable_tenant_rls("job_outbox")
    op.execute(f"GRANT SELECT, UPDATE ON jobs TO {LOOKUP_ROLE}")
    op.execute(f"GRANT SELECT, DELETE ON job_outbox TO {LOOKUP_ROLE}")

    # Release queued work fairly: round robin across organizations, at most p_cap jobs of one
    # organization in flight. One dispatcher at a time (advisory lock); returns ids only.
    op.execute(
        """
        CREATE FUNCTION hm_claim_dispatch(p_cap integer, p_limit integer)
        RETURNS TABLE (out_org uuid, out_job uuid, out_queue varchar, out_dispatch integer)
        LANGUAGE plpgsql SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext('hm_claim_dispatch'));
            RETURN QUERY
            WITH ranked AS (
                SELECT o.id, o.organization_id, o.job_id, o.queue,
                       row_number() OVER (PARTITION BY o.organization_id ORDER BY o.id) AS rn
                FROM job_outbox o
            ), inflight AS (
                SELECT j.organization_id, count(*) AS n
                FROM jobs j
                WHERE j.status IN ('queued', 'running') AND j.dispatched_at IS NOT NULL
                  AND j.organization_id IN (SELECT DISTINCT r.organization_id FROM ranked r)
                GROUP BY j.organization_id
            ), picked AS (
                SELECT r.id, r.job_id, r.queue
                FROM ranked r LEFT JOIN inflight i ON i.organization_id = r.organization_id
                WHERE r.rn <= p_cap - coalesce(i.n, 0)
                ORDER BY r.rn, r.id
                LIMIT p_limit
            ), gone AS (
                DELETE FROM job_outbox o USING picked p WHERE o.id = p.id
                RETURNING o.job_id, o.queue
            )
            UPDATE jobs j
            SET dispatched_at = now(), dispatch_count = j.dispatch_count + 1
            FROM gone g
            WHERE j.id = g.job_id AND j.status = 'queued'
            RETURNING j.organization_id, j.id, g.queue, j.dispatch_count;
        END
        $$
        """
    )
    # Live jobs the reconciler must look at (ids and timestamps only); it decides and acts on
    # each inside the job's own tenant context.
    op.execute(
        """
        CREATE FUNCTION hm_jobs_to_reconcile(p_lease_seconds double precision,
                                             p_grace_seconds double precision,
                                             p_min_hard_limit_seconds double precision)
        RETURNS TABLE (out_org uuid, out_job uuid, out_status varchar, out_queue varchar,
                       out_dispatch integer, out_attempts integer,
                       out_started timestamptz, out_heartbeat timestamptz)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT j.organization_id, j.id, j.status, j.queue, j.dispatch_count, j.attempts,
                   j.started_at, j.heartbeat_at
            FROM jobs j
            WHERE j.status IN ('queued', 'running')
              AND (
                (j.status = 'queued' AND j.cancel_after IS NOT NULL AND j.cancel_after < now())
                OR (j.status = 'queued' AND j.dispatched_at IS NOT NULL
                    AND j.dispatched_at < now() - make_interval(secs => p_grace_seconds))
                OR (j.status = 'running' AND (
                    coalesce(j.heartbeat_at, j.started_at)
                        < now() - make_interval(secs => p_lease_seconds)
                    OR j.started_at < now() - make_interval(secs => p_min_hard_limit_seconds)))
              )
        $$
        """
    )
    for fn in (
        "hm_claim_dispatch(integer, integer)",
        "hm_jobs_to_reconcile(double precision, double precision, double precision)",
    ):
        op.execute(f"ALTER FUNCTION {fn} OWNER TO {LOOKUP_ROLE}")
        op.execute(f"REVOKE ALL ON FUNCTION {fn} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {fn} TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS hm_jobs_to_reconcile(double precision, double precision, double precision)"
    )
    op.execute("DROP FUNCTION IF EXISTS hm_claim_dispatch(integer, integer)")
    disable_tenant_rls("job_outbox")
    disable_tenant_rls("jobs")
    op.drop_table("job_outbox")
    op.drop_table("jobs")
