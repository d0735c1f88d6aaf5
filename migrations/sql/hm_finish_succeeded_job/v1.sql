CREATE OR REPLACE FUNCTION public.hm_finish_succeeded_job(p_org uuid, p_job uuid, p_attempt integer, p_outputs jsonb, p_report jsonb, p_progress double precision, p_compute_seconds double precision, p_gpu_seconds double precision, p_billed_gpu_seconds double precision, p_images integer, p_megapixels double precision, p_output_bytes bigint)
 RETURNS character varying
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    BEGIN
        -- The organization bound to the transaction (in autocommit, this statement's own) in
        -- a statement of its own: row-level security below sees the binding.
        PERFORM set_config('app.org_id', p_org::text, true);
        -- An end that webhooks are subscribed to is left to the caller's usual way, which
        -- records the deliveries in the same transaction: nothing is done here.
        IF EXISTS (SELECT 1 FROM webhook_endpoints e
                   WHERE e.organization_id = p_org AND e.enabled
                     AND (cardinality(e.event_types) = 0
                          OR e.event_types @> ARRAY['job.succeeded']::varchar[])) THEN
            RETURN 'webhooks';
        END IF;
        -- running -> succeeded, only for the attempt that owns the job (exactly one end).
        UPDATE jobs
           SET status = 'succeeded', finished_at = now(), stage = NULL, outputs = p_outputs,
               report = p_report, progress = p_progress, compute_seconds = p_compute_seconds,
               gpu_seconds = p_gpu_seconds
         WHERE jobs.id = p_job AND jobs.organization_id = p_org AND jobs.status = 'running'
           AND jobs.attempts = p_attempt;
        IF NOT FOUND THEN
            RETURN 'lost';
        END IF;
        -- Its reservation settled and its usage written, in the same transaction.
        PERFORM hm_settle_job(p_job, 'succeeded', p_billed_gpu_seconds, p_images, p_megapixels,
                              p_output_bytes);
        RETURN 'succeeded';
    END
$function$
