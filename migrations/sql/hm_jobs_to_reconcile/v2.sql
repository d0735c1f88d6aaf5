CREATE OR REPLACE FUNCTION public.hm_jobs_to_reconcile(p_lease_seconds double precision, p_grace_seconds double precision, p_min_hard_limit_seconds double precision)
 RETURNS TABLE(out_org uuid, out_job uuid, out_status character varying, out_queue character varying, out_dispatch integer, out_attempts integer, out_started timestamp with time zone, out_heartbeat timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- Three small sets, each read from its own partial index, instead of every live job:
    -- what is in flight (dispatched, not finished: ix_jobs_org_inflight), what runs
    -- (ix_jobs_org_running) and what waits with a deadline (ix_jobs_org_deadline). A sweep
    -- costs what needs watching, not the length of the queues.
    SELECT j.organization_id, j.id, j.status, j.queue, j.dispatch_count, j.attempts,
           j.started_at, j.heartbeat_at
    FROM jobs j
    WHERE j.status = 'queued' AND j.dispatched_at IS NOT NULL
      AND j.dispatched_at < now() - make_interval(secs => p_grace_seconds)
    UNION
    SELECT j.organization_id, j.id, j.status, j.queue, j.dispatch_count, j.attempts,
           j.started_at, j.heartbeat_at
    FROM jobs j
    WHERE j.status = 'queued' AND j.cancel_after IS NOT NULL AND j.cancel_after < now()
    UNION
    SELECT j.organization_id, j.id, j.status, j.queue, j.dispatch_count, j.attempts,
           j.started_at, j.heartbeat_at
    FROM jobs j
    WHERE j.status = 'running'
      AND (coalesce(j.heartbeat_at, j.started_at)
               < now() - make_interval(secs => p_lease_seconds)
           OR j.started_at < now() - make_interval(secs => p_min_hard_limit_seconds))
$function$
