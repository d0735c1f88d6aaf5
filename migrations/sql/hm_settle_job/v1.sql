CREATE OR REPLACE FUNCTION public.hm_settle_job(p_job uuid, p_outcome character varying, p_gpu double precision, p_images integer, p_megapixels double precision, p_output_bytes bigint)
 RETURNS boolean
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    DECLARE
        r quota_reservations%ROWTYPE;
        j jobs%ROWTYPE;
        billable boolean := p_outcome IN ('succeeded', 'canceled')
                            AND (p_gpu > 0 OR p_images > 0);
        subject record;
    BEGIN
        SELECT * INTO r FROM quota_reservations
        WHERE job_id = p_job AND status = 'held' FOR UPDATE;
        IF NOT FOUND THEN
            RETURN false;
        END IF;
        SELECT * INTO j FROM jobs WHERE id = p_job;
        -- The order reserve() locks them in: organization, member, API key, lifetime.
        FOR subject IN
            SELECT * FROM (VALUES (1, 'org', r.organization_id),
                                  (2, 'member', r.user_id),
                                  (3, 'api_key', r.api_key_id)) AS s(ord, kind, id)
            WHERE s.id IS NOT NULL ORDER BY s.ord
        LOOP
            UPDATE quota_counters c
            SET gpu_seconds_reserved = greatest(0, c.gpu_seconds_reserved - r.gpu_seconds),
                images_reserved = greatest(0, c.images_reserved - r.images),
                gpu_seconds_used = c.gpu_seconds_used
                    + CASE WHEN billable THEN p_gpu ELSE 0 END,
                images_used = c.images_used + CASE WHEN billable THEN p_images ELSE 0 END
            WHERE c.organization_id = r.organization_id AND c.period = r.period
              AND c.subject_type = subject.kind AND c.subject_id = subject.id;
        END LOOP;
        IF p_output_bytes > 0 THEN
            UPDATE quota_counters c SET bytes_used = c.bytes_used + p_output_bytes
            WHERE c.organization_id = r.organization_id AND c.subject_type = 'org'
              AND c.subject_id = r.organization_id AND c.period = DATE '1970-01-01';
        END IF;
        UPDATE quota_reservations
        SET status = CASE WHEN billable THEN 'settled' ELSE 'released' END,
            settled_at = now()
        WHERE id = r.id;
        IF billable THEN
            INSERT INTO usage_events (id, organization_id, job_id, user_id, api_key_id,
                                      operation, outcome, gpu_seconds, images, megapixels)
            VALUES (gen_random_uuid(), r.organization_id, p_job, r.user_id, r.api_key_id,
                    j.operation, p_outcome, p_gpu, p_images, p_megapixels)
            ON CONFLICT (organization_id, job_id) DO NOTHING;
        END IF;
        RETURN true;
    END
$function$
