CREATE OR REPLACE FUNCTION public.hm_retention_by_org()
 RETURNS TABLE(out_org uuid, out_days integer)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
                SELECT e.org_id, e.days FROM (
        SELECT o.id AS org_id, LEAST(p.retention_days, r.days) AS days
        FROM organizations o
        LEFT JOIN org_billing b ON b.organization_id = o.id
        LEFT JOIN plans dp ON dp.is_default
        JOIN plans p ON p.id = COALESCE(b.plan_id, dp.id)
        LEFT JOIN org_retention r ON r.organization_id = o.id
    ) e
                WHERE e.days IS NOT NULL
                ORDER BY e.org_id
$function$
