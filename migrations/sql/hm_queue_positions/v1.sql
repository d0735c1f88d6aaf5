CREATE OR REPLACE FUNCTION public.hm_queue_positions(p_org uuid, p_ids uuid[], p_created timestamp with time zone[])
 RETURNS TABLE(job_id uuid, ahead bigint)
 LANGUAGE sql
 STABLE
AS $function$
    -- How many of the organization's queued jobs were admitted before each job of a page
    -- (ids with their created_at): one statement, so one snapshot, for the whole page. Each
    -- distinct minute of the page sums its earlier minutes once (job_queue_minutes, kept by
    -- hm_count_jobs; materialized so it is not repeated per row) and ranks its queued jobs
    -- up to the page's newest in it once, from ix_jobs_org_status_created (rank - 1 is how
    -- many were admitted strictly before, so jobs admitted at one instant share a position).
    -- A page's job that left the queue since the page was read is counted on its own.
    -- As the caller: row-level security applies, so only the bound organization counts.
    WITH page AS (
        SELECT p.id, p.created_at,
               date_bin('1 minute', p.created_at, TIMESTAMPTZ '2000-01-01 00:00:00+00')
                   AS minute
        FROM unnest(p_ids, p_created) AS p(id, created_at)
    ), minutes AS MATERIALIZED (
        SELECT m.minute, m.newest,
               (SELECT coalesce(sum(q.queued), 0) FROM job_queue_minutes q
                WHERE q.organization_id = p_org AND q.minute < m.minute) AS before
        FROM (SELECT minute, max(created_at) AS newest FROM page GROUP BY minute) m
    ), ranked AS MATERIALIZED (
        SELECT DISTINCT r.created_at, r.ahead
        FROM minutes m, LATERAL (
            SELECT j.created_at, rank() OVER (ORDER BY j.created_at) - 1 AS ahead
            FROM jobs j
            WHERE j.organization_id = p_org AND j.status = 'queued'
              AND j.created_at >= m.minute AND j.created_at <= m.newest
        ) r
    )
    SELECT page.id,
           minutes.before + coalesce(
               ranked.ahead,
               (SELECT count(*) FROM jobs j
                WHERE j.organization_id = p_org AND j.status = 'queued'
                  AND j.created_at >= page.minute AND j.created_at < page.created_at))
    FROM page JOIN minutes USING (minute) LEFT JOIN ranked USING (created_at)
$function$
