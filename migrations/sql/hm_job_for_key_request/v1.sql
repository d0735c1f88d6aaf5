CREATE OR REPLACE FUNCTION public.hm_job_for_key_request(p_org uuid, p_key_hash character varying, p_job uuid)
 RETURNS TABLE(api_key jsonb, organization jsonb, job jsonb, queue_position bigint)
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    DECLARE
        j jobs%ROWTYPE;
    BEGIN
        -- The key and its organization, binding the organization to the transaction, in a
        -- statement of its own: row-level security below sees the binding.
        SELECT k.api_key, k.organization INTO api_key, organization
          FROM hm_api_key_for_request(p_org, p_key_hash) k;
        IF api_key IS NULL THEN
            RETURN;  -- no such key: no row, and nothing else read
        END IF;
        -- The job only for a live key that may read jobs, of an organization not suspended
        -- (the caller checks the same again, and answers any other case the usual way).
        IF api_key->>'revoked_at' IS NULL
           AND (api_key->>'expires_at' IS NULL OR (api_key->>'expires_at')::timestamptz > now())
           AND organization->>'suspended_at' IS NULL
           AND api_key->'scopes' ?| ARRAY['jobs:read', 'admin'] THEN
            -- As the caller, under row-level security: another organization's job is not
            -- found (and the key's own organization is named as well).
            SELECT * INTO j FROM jobs WHERE jobs.id = p_job AND jobs.organization_id = p_org;
            IF FOUND THEN
                job := to_jsonb(j);
                IF j.status = 'queued' THEN
                    SELECT q.ahead INTO queue_position
                      FROM hm_queue_positions(p_org, ARRAY[j.id], ARRAY[j.created_at]) q;
                END IF;
            END IF;
        END IF;
        RETURN NEXT;
    END
$function$
