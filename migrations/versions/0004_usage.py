"""Plans, per-org billing state, quota counters and reservations, usage events.

Revision ID: 0004_usage
Revises: 0003_webhooks
Create Date: 2026-11-27
"""

import uuid
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

revision: str = "0004_usage"
down_revision: str | None = "0003_webhooks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORG_TABLES = ("org_billing", "quota_limits", "quota_counters", "quota_reservations", "usage_events")


def _org() -> sa.Column[object]:
    return sa.Column(
        "organization_id",
        UUID(as_uuid=True),
        sa.ForeignKey("organizations.id", ondelete="CASCADE"),
        nullable=False,
    )


def _now(name: str = "created_at") -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())


def upgrade() -> None:
    plans = op.create_table(
        "plans",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("code", sa.String(64), nullable=False, unique=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("stripe_price_id", sa.String(255)),
        sa.Column("price_per_gpu_second", sa.Numeric(12, 6), nullable=False, server_default="0"),
        sa.Column("currency", sa.String(3), nullable=False, server_default="usd"),
        sa.Column("included_gpu_seconds", sa.Float, nullable=False, server_default="0"),
        sa.Column("included_images", sa.Integer, nullable=False, server_default="0"),
        # Limits: NULL means unlimited.
        sa.Column("monthly_gpu_seconds", sa.Float),
        sa.Column("monthly_images", sa.Integer),
        sa.Column("max_running_jobs", sa.Integer),
        sa.Column("max_queued_jobs", sa.Integer),
        sa.Column("storage_bytes", sa.BigInteger),
        sa.Column("requests_per_minute", sa.Integer),
        sa.Column("org_requests_per_minute", sa.Integer),
        sa.Column("is_default", sa.Boolean, nullable=False, server_default=sa.false()),
        _now(),
    )
    op.create_index(
        "uq_plans_single_default",
        "plans",
        ["is_default"],
        unique=True,
        postgresql_where=sa.text("is_default"),
    )
    op.bulk_insert(
        plans,
        [
            {
                "id": uuid.UUID("00000000-0000-4000-8000-000000000001"),
                "code": "free",
                "name": "Free",
                "price_per_gpu_second": 0,
                "included_gpu_seconds": 300,
                "included_images": 200,
                "monthly_gpu_seconds": 300,
                "monthly_images": 200,
                "max_running_jobs": 2,
                "max_queued_jobs": 100,
                "storage_bytes": 2 * 1024**3,
                "requests_per_minute": 120,
                "org_requests_per_minute": 300,
                "is_default": True,
            },
            {
                "id": uuid.UUID("00000000-0000-4000-8000-000000000002"),
                "code": "pro",
                "name": "Pro",
                "price_per_gpu_second": 0.004,
                "included_gpu_seconds": 3600,
                "included_images": 5000,
                "monthly_gpu_seconds": 100000,
                "monthly_images": 200000,
                "max_running_jobs": 16,
                "max_queued_jobs": 10000,
                "storage_bytes": 500 * 1024**3,
                "requests_per_minute": 1200,
                "org_requests_per_minute": 6000,
                "is_default": False,
            },
        ],
    )
    # Plans are operator-managed: the app reads them, only the ops role writes.
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON plans FROM {APP_ROLE}")

    op.create_table(
        "org_billing",
        sa.Column(
            "organization_id",
            UUID(as_uuid=True),
            sa.ForeignKey("organizations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("plan_id", UUID(as_uuid=True), sa.ForeignKey("plans.id"), nullable=False),
        sa.Column("overrides", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("stripe_customer_id", sa.String(255)),
        sa.Column("stripe_subscription_id", sa.String(255)),
        sa.Column("subscription_status", sa.String(32)),
        sa.Column("past_due_since", sa.DateTime(timezone=True)),
        _now(),
        _now("updated_at"),
    )
    op.create_index(
        "ix_org_billing_org_customer", "org_billing", ["organization_id", "stripe_customer_id"]
    )

    op.create_table(
        "quota_limits",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column("subject_type", sa.String(16), nullable=False),
        sa.Column("subject_id", UUID(as_uuid=True), nullable=False),
        sa.Column("limits", JSONB, nullable=False),
        _now(),
        _now("updated_at"),
        sa.UniqueConstraint(
            "organization_id", "subject_type", "subject_id", name="uq_quota_limits_subject"
        ),
        sa.CheckConstraint("subject_type IN ('member', 'api_key')", name="ck_quota_limits_subject"),
    )

    op.create_table(
        "quota_counters",
        _org(),
        sa.Column("subject_type", sa.String(16), nullable=False),
        sa.Column("subject_id", UUID(as_uuid=True), nullable=False),
        # The first day of the month; 1970-01-01 holds lifetime counters (storage).
        sa.Column("period", sa.Date, nullable=False),
        sa.Column("gpu_seconds_used", sa.Float, nullable=False, server_default="0"),
        sa.Column("gpu_seconds_reserved", sa.Float, nullable=False, server_default="0"),
        sa.Column("images_used", sa.Integer, nullable=False, server_default="0"),
        sa.Column("images_reserved", sa.Integer, nullable=False, server_default="0"),
        sa.Column("bytes_used", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("organization_id", "subject_type", "subject_id", "period"),
        sa.CheckConstraint(
            "subject_type IN ('org', 'member', 'api_key')", name="ck_quota_counters_subject"
        ),
    )

    op.create_table(
        "quota_reservations",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("period", sa.Date, nullable=False),
        sa.Column("user_id", UUID(as_uuid=True)),
        sa.Column("api_key_id", UUID(as_uuid=True)),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="held"),
        _now(),
        sa.Column("settled_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("organization_id", "job_id", name="uq_quota_reservations_job"),
        sa.CheckConstraint(
            "status IN ('held', 'settled', 'released')", name="ck_quota_reservations_status"
        ),
    )

    op.create_table(
        "usage_events",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        _org(),
        sa.Column(
            "job_id",
            UUID(as_uuid=True),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("user_id", UUID(as_uuid=True)),
        sa.Column("api_key_id", UUID(as_uuid=True)),
        sa.Column("operation", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("gpu_seconds", sa.Float, nullable=False),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("megapixels", sa.Float, nullable=False),
        _now(),
        sa.Column("stripe_status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("stripe_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column(
            "stripe_next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("stripe_last_error", sa.Text),
        sa.Column("stripe_sent_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("organization_id", "job_id", name="uq_usage_events_job"),
    )
    op.create_index(
        "ix_usage_events_org_created", "usage_events", ["organization_id", "created_at", "id"]
    )
    op.create_index(
        "ix_usage_events_org_stripe_pending",
        "usage_events",
        ["organization_id", "stripe_next_attempt_at"],
        postgresql_where=sa.text("stripe_status = 'pending'"),
    )

    for table in ORG_TABLES:
        enable_tenant_rls(table)
    op.execute(f"GRANT SELECT ON plans TO {LOOKUP_ROLE}")

    # Settle a job's reservation in the transaction that finishes it: release the estimate,
    # count what was measured, and write the usage event (once per job). Runs as the caller,
    # under RLS, so it can only touch the bound organization's rows.
    op.execute(
        """
        CREATE FUNCTION hm_settle_job(p_job uuid, p_outcome varchar, p_gpu double precision,
                                      p_images integer, p_megapixels double precision,
                                      p_output_bytes bigint)
        RETURNS boolean
        LANGUAGE plpgsql
        SET search_path = public, pg_temp
        AS $$
        DECLARE
            r quota_reservations%ROWTYPE;
            j jobs%ROWTYPE;
            billable boolean := p_outcome IN ('succeeded', 'canceled')
                                AND (p_gpu > 0 OR p_images > 0);
        BEGIN
            SELECT * INTO r FROM quota_reservations
            WHERE job_id = p_job AND status = 'held' FOR UPDATE;
            IF NOT FOUND THEN
                RETURN false;
            END IF;
            SELECT * INTO j FROM jobs WHERE id = p_job;
            UPDATE quota_counters c
            SET gpu_seconds_reserved = greatest(0, c.gpu_seconds_reserved - r.gpu_seconds),
                images_reserved = greatest(0, c.images_reserved - r.images),
                gpu_seconds_used = c.gpu_seconds_used + CASE WHEN billable THEN p_gpu ELSE 0 END,
                images_used = c.images_used + CASE WHEN billable THEN p_images ELSE 0 END
            WHERE c.organization_id = r.organization_id AND c.period = r.period
              AND ((c.subject_type = 'org' AND c.subject_id = r.organization_id)
                   OR (c.subject_type = 'member' AND c.subject_id = r.user_id)
                   OR (c.subject_type = 'api_key' AND c.subject_id = r.api_key_id));
            IF p_output_bytes > 0 THEN
                UPDATE quota_counters c SET bytes_used = c.bytes_used + p_output_bytes
                WHERE c.organization_id = r.organization_id AND c.subject_type = 'org'
                  AND c.subject_id = r.organization_id AND c.period = DATE '1970-01-01';
            END IF;
            UPDATE quota_reservations
            SET status = CASE WHEN billable THEN 'settled' ELSE 'released' END,
                settled_at = now()
            WHERE id = r.id;
            IF billable THEN
                INSERT INTO usage_events (id, organization_id, job_id, user_id, api_key_id,
                                          operation, outcome, gpu_seconds, images, megapixels)
                VALUES (gen_random_uuid(), r.organization_id, p_job, r.user_id, r.api_key_id,
                        j.operation, p_outcome, p_gpu, p_images, p_megapixels)
                ON CONFLICT (organization_id, job_id) DO NOTHING;
            END IF;
            RETURN true;
        END
        $$
        """
    )
    op.execute(
        f"GRANT EXECUTE ON FUNCTION hm_settle_job(uuid, varchar, double precision, integer, double precision, bigint) TO {APP_ROLE}, {OPS_ROLE}"
    )

    # The dispatcher's per-organization cap also honours the plan's concurrent-job limit.
    op.execute(
        """
        CREATE OR REPLACE FUNCTION hm_claim_dispatch(p_cap integer, p_limit integer)
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
            ), orgs AS (
                SELECT DISTINCT r.organization_id FROM ranked r
            ), caps AS (
                -- An override (null: unlimited) beats the org's plan; no billing row
                -- means the default plan. Never above the dispatcher's own cap.
                SELECT g.organization_id,
                       least(p_cap, CASE
                           WHEN b.overrides ? 'max_running_jobs'
                               THEN coalesce((b.overrides ->> 'max_running_jobs')::integer,
                                             p_cap)
                           WHEN b.organization_id IS NOT NULL
                               THEN coalesce(p.max_running_jobs, p_cap)
                           ELSE coalesce(dp.max_running_jobs, p_cap)
                       END) AS cap
                FROM orgs g
                LEFT JOIN org_billing b ON b.organization_id = g.organization_id
                LEFT JOIN plans p ON p.id = b.plan_id
                LEFT JOIN plans dp ON dp.is_default
            ), inflight AS (
                SELECT j.organization_id, count(*) AS n
                FROM jobs j
                WHERE j.status IN ('queued', 'running') AND j.dispatched_at IS NOT NULL
                  AND j.organization_id IN (SELECT g.organization_id FROM orgs g)
                GROUP BY j.organization_id
            ), picked AS (
                SELECT r.id, r.job_id, r.queue
                FROM ranked r
                JOIN caps c ON c.organization_id = r.organization_id
                LEFT JOIN inflight i ON i.organization_id = r.organization_id
                WHERE r.rn <= c.cap - coalesce(i.n, 0)
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
    op.execute(f"GRANT SELECT ON org_billing TO {LOOKUP_ROLE}")


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION IF EXISTS hm_settle_job(uuid, varchar, double precision, integer, double precision, bigint)"
    )
    for table in ORG_TABLES:
        disable_tenant_rls(table)
    for table in (
        "usage_events",
        "quota_reservations",
        "quota_counters",
        "quota_limits",
        "org_billing",
        "plans",
    ):
        op.drop_table(table)
