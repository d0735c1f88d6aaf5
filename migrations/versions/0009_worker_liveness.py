"""Worker liveness: the jobs each worker process holds; re-sent jobs keep their place.

* ``hm_running_jobs`` lists running jobs with the worker process that holds each (ids only),
  so the reconciler can return the jobs of a worker that stopped announcing itself at once,
  instead of waiting for their leases to run out.
* ``hm_claim_dispatch`` releases an organization's jobs in the order they were admitted
  (``jobs.created_at``), not in the order their outbox rows were written: a job put back in
  the outbox after its worker died, or after the broker lost its message, goes out ahead of
  the jobs admitted after it instead of behind every one of them.

Revision ID: 0009_worker_liveness
Revises: 0008_api_key_for_request
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

from hiddenmodel.migration_helpers import APP_ROLE, LOOKUP_ROLE, OPS_ROLE

revision: str = "0009_worker_liveness"
down_revision: str | None = "0008_api_key_for_request"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUNNING_JOBS = "hm_running_jobs()"

# hm_claim_dispatch as 0004 wrote it, with the order of an organization's outbox rows and of
# the picked rows as parameters: the upgrade orders by admission, the downgrade restores 0004.
CLAIM_DISPATCH = """
CREATE OR REPLACE FUNCTION hm_claim_dispatch(p_cap integer, p_limit integer)
RETURNS TABLE (out_org uuid, out_job uuid, out_queue varchar, out_dispatch integer)
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('hm_claim_dispatch'));
    RETURN QUERY
    WITH ranked AS (
        SELECT o.id, o.organization_id, o.job_id, o.queue, {admitted} AS admitted,
               row_number() OVER (PARTITION BY o.organization_id ORDER BY {rank_order}) AS rn
        FROM job_outbox o {join}
    ), orgs AS (
        SELECT DISTINCT r.organization_id FROM ranked r
    ), caps AS (
        SELECT g.organization_id,
               least(p_cap, CASE
                   WHEN b.overrides ? 'max_running_jobs'
                       THEN coalesce((b.overrides ->> 'max_running_jobs')::integer, p_cap)
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
        ORDER BY {pick_order}
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
    # Round robin across organizations as before; within a rank, and within an
    # organization, the job admitted first goes first.
    op.execute(
        CLAIM_DISPATCH.format(
            admitted="j.created_at",
            rank_order="j.created_at, o.id",
            join="JOIN jobs j ON j.id = o.job_id",
            pick_order="r.rn, r.admitted, r.id",
        )
    )
    op.execute(
        """
        CREATE FUNCTION hm_running_jobs()
        RETURNS TABLE (out_org uuid, out_job uuid, out_queue varchar, out_attempts integer,
                       out_worker varchar)
        LANGUAGE sql STABLE SECURITY DEFINER
        SET search_path = public, pg_temp
        AS $$
            SELECT j.organization_id, j.id, j.queue, j.attempts, j.worker
            FROM jobs j
            WHERE j.status = 'running'
        $$
        """
    )
    op.execute(f"ALTER FUNCTION {RUNNING_JOBS} OWNER TO {LOOKUP_ROLE}")
    op.execute(f"REVOKE ALL ON FUNCTION {RUNNING_JOBS} FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION {RUNNING_JOBS} TO {APP_ROLE}, {OPS_ROLE}")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION IF EXISTS {RUNNING_JOBS}")
    op.execute(
        CLAIM_DISPATCH.format(
            admitted="NULL::timestamptz",
            rank_order="o.id",
            join="",
            pick_order="r.rn, r.id",
        )
    )
