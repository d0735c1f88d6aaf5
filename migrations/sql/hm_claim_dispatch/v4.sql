CREATE OR REPLACE FUNCTION public.hm_claim_dispatch(p_cap integer, p_limit integer)
 RETURNS TABLE(out_org uuid, out_job uuid, out_queue character varying, out_dispatch integer)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('hm_claim_dispatch'));
        RETURN QUERY
        WITH orgs AS (
            -- Organizations with queued jobs, from their counter rows: one row each, however
            -- long their queues. A suspended organization's jobs stay in the outbox until it
            -- is unsuspended.
            SELECT c.organization_id FROM job_counts c
            JOIN organizations s ON s.id = c.organization_id
            WHERE c.subject_type = 'org' AND c.subject_id = c.organization_id
              AND c.queued > 0 AND s.suspended_at IS NULL
        ), caps AS (
            -- Each one's max_running_jobs (hm_effective_limits, inlined here); none: p_cap.
            SELECT g.organization_id,
                   least(p_cap, coalesce(l.max_running_jobs, p_cap)) AS cap
            FROM orgs g
            LEFT JOIN LATERAL hm_effective_limits(g.organization_id) l ON true
        ), rooms AS (
            -- In flight: dispatched and not finished (ix_jobs_org_inflight holds only those).
            SELECT c.organization_id,
                   c.cap - (SELECT count(*) FROM jobs j
                            WHERE j.organization_id = c.organization_id
                              AND j.status IN ('queued', 'running')
                              AND j.dispatched_at IS NOT NULL) AS room
            FROM caps c
        ), ranked AS (
            -- Each organization's first jobs by admission (an outbox row carries its job's
            -- admission time), no more than it has room for: read from the front of
            -- ix_job_outbox_org_created, never the whole queue.
            SELECT w.id, w.job_id, w.queue, w.created_at AS admitted,
                   row_number() OVER (PARTITION BY r.organization_id
                                      ORDER BY w.created_at, w.id) AS rn
            FROM rooms r
            CROSS JOIN LATERAL (
                SELECT o.id, o.job_id, o.queue, o.created_at FROM job_outbox o
                WHERE o.organization_id = r.organization_id
                ORDER BY o.created_at, o.id
                LIMIT greatest(r.room, 0)
            ) w
            WHERE r.room > 0
        ), picked AS (
            SELECT r.id, r.job_id, r.queue
            FROM ranked r
            ORDER BY r.rn, r.admitted, r.id
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
$function$
