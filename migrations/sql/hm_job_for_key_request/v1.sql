CREATE OR REPLACE FUNCTION public.hm_job_for_key_request(p_org uuid, p_key_hash character varying, p_job uuid)
 RETURNS TABLE(api_key jsonb, organization jsonb, job jsonb, queue_position bigint)
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    #variable_conflict use_column
    DECLARE
        found jobs;
    BEGIN
        -- The key and its organization, binding the organization to the transaction, in a
        -- statement of its own: row-level security below sees the binding.
        SELECT k.api_key, k.organization INTO api_key, organization
          FROM hm_api_key_for_request(p_org, p_key_hash) k;
        IF api_key IS NULL THEN
            RETURN;  -- no such key: no row, and nothing else read
        END IF;
        -- As the caller, under row-level security: another organization's job is not found.
        SELECT * INTO found FROM jobs j WHERE j.id = p_job;
        IF found.id IS NOT NULL THEN
            job := to_jsonb(found);
            IF found.status = 'queued' THEN
                SELECT q.ahead INTO queue_position
                  FROM hm_queue_positions(p_org, ARRAY[found.id], ARRAY[found.created_at]) q;
            END IF;
        END IF;
        RETURN NEXT;
    END
$function$
