CREATE OR REPLACE FUNCTION public.hm_jobs_past_retention(p_now timestamp with time zone, p_limit integer)
 RETURNS TABLE(out_org uuid, out_job uuid, out_days integer)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
                SELECT e.org_id, j.id, e.days
                FROM (
        SELECT o.id AS org_id, LEAST(p.retention_days, r.days) AS days
        FROM organizations o
        LEFT JOIN org_billing b ON b.organization_id = o.id
        LEFT JOIN plans dp ON dp.is_default
        JOIN plans p ON p.id = COALESCE(b.plan_id, dp.id)
        LEFT JOIN org_retention r ON r.organization_id = o.id
    ) e
                CROSS JOIN LATERAL (
                    SELECT j.id FROM jobs j
                    WHERE j.organization_id = e.org_id
                      AND j.expired_at IS NULL AND j.finished_at IS NOT NULL
                      AND j.finished_at < p_now - make_interval(days => e.days)
                    ORDER BY j.finished_at
                    LIMIT p_limit
                ) j
                WHERE e.days IS NOT NULL
                LIMIT p_limit
$function$
