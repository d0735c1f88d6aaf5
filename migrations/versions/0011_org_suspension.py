"""Organizations can be suspended by a platform operator.

``organizations.suspended_at`` marks a suspended organization: its API keys and members are
refused (checked where a request enters the organization), and the dispatcher leaves its queued
jobs in the outbox, so they wait, unbilled, until the organization is unsuspended.
``hm_claim_dispatch`` is the one of 0004 with the suspended organizations left out.

Revision ID: 0011_org_suspension
Revises: 0008_api_key_for_request
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_org_suspension"
down_revision: str | None = "0008_api_key_for_request"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM_WITH_SUSPENSION = """
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
                -- A suspended organization's jobs stay in the outbox until it is unsuspended.
                SELECT DISTINCT r.organization_id FROM ranked r
                JOIN organizations s ON s.id = r.organization_id
                WHERE s.suspended_at IS NULL
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

CLAIM_WITHOUT_SUSPENSION = """
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


def upgrade() -> None:
    op.add_column(
        "organizations", sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(CLAIM_WITH_SUSPENSION)


def downgrade() -> None:
    op.execute(CLAIM_WITHOUT_SUSPENSION)
    op.drop_column("organizations", "suspended_at")
