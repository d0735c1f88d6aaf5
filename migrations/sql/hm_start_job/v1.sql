CREATE OR REPLACE FUNCTION public.hm_start_job(p_org uuid, p_job uuid, p_worker character varying)
 RETURNS jsonb
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    DECLARE
        j jobs%ROWTYPE;
    BEGIN
        -- The organization bound to the transaction (in autocommit, this statement's own) in
        -- a statement of its own: row-level security below sees the binding.
        PERFORM set_config('app.org_id', p_org::text, true);
        -- queued -> running, only while nothing holds the job back: its deadline has not
        -- passed and its organization is not suspended. NULL otherwise, and for a job that
        -- is not queued: the caller then looks at why, the usual way.
        UPDATE jobs
           SET status = 'running', attempts = jobs.attempts + 1, started_at = now(),
               heartbeat_at = now(), stage = 'starting', progress = 0.0, worker = p_worker
         WHERE jobs.id = p_job AND jobs.organization_id = p_org AND jobs.status = 'queued'
           AND (jobs.cancel_after IS NULL OR jobs.cancel_after >= now())
           AND NOT EXISTS (SELECT 1 FROM organizations o
                           WHERE o.id = p_org AND o.suspended_at IS NOT NULL)
        RETURNING * INTO j;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        RETURN to_jsonb(j);
    END
$function$
