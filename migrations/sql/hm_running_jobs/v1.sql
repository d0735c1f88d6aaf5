CREATE OR REPLACE FUNCTION public.hm_running_jobs()
 RETURNS TABLE(out_org uuid, out_job uuid, out_queue character varying, out_attempts integer, out_worker character varying)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT j.organization_id, j.id, j.queue, j.attempts, j.worker
    FROM jobs j
    WHERE j.status = 'running'
$function$
