CREATE OR REPLACE FUNCTION public.hm_webhook_deliveries_due(p_grace_seconds double precision, p_limit integer)
 RETURNS TABLE(out_org uuid, out_delivery uuid)
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    WITH due AS (
        SELECT d.id
        FROM webhook_deliveries d
        WHERE d.status IN ('pending', 'delivering')
          AND d.next_attempt_at < now() - make_interval(secs => p_grace_seconds)
          AND d.enqueued_at < now() - make_interval(secs => p_grace_seconds)
        ORDER BY d.next_attempt_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE webhook_deliveries d
    SET enqueued_at = now()
    FROM due
    WHERE d.id = due.id
    RETURNING d.organization_id, d.id
$function$
