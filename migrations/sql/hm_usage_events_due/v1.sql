CREATE OR REPLACE FUNCTION public.hm_usage_events_due(p_limit integer)
 RETURNS TABLE(out_org uuid, out_event uuid)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT u.organization_id, u.id
    FROM usage_events u
    WHERE u.stripe_status = 'pending' AND u.stripe_next_attempt_at <= now()
    ORDER BY u.stripe_next_attempt_at
    LIMIT p_limit
$function$
