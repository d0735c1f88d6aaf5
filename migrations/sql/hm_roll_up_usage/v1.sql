CREATE OR REPLACE FUNCTION public.hm_roll_up_usage()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    BEGIN
        -- A usage event is written once (at settle time) and only deleted with its job or
        -- organization: add it to, or take it from, its day's row for its organization,
        -- operation, member and API key. Sums are numeric, as the reports sum the events.
        IF TG_OP = 'INSERT' THEN
            INSERT INTO usage_daily AS d (organization_id, day, operation, user_id, api_key_id,
                                          jobs, gpu_seconds, images, megapixels)
            VALUES (NEW.organization_id, (NEW.created_at AT TIME ZONE 'UTC')::date,
                    NEW.operation, NEW.user_id, NEW.api_key_id, 1,
                    NEW.gpu_seconds::numeric, NEW.images, NEW.megapixels::numeric)
            ON CONFLICT (organization_id, day, operation, user_id, api_key_id) DO UPDATE
            SET jobs = d.jobs + 1,
                gpu_seconds = d.gpu_seconds + excluded.gpu_seconds,
                images = d.images + excluded.images,
                megapixels = d.megapixels + excluded.megapixels;
            RETURN NULL;
        END IF;
        UPDATE usage_daily d
        SET jobs = d.jobs - 1,
            gpu_seconds = d.gpu_seconds - OLD.gpu_seconds::numeric,
            images = d.images - OLD.images,
            megapixels = d.megapixels - OLD.megapixels::numeric
        WHERE d.organization_id = OLD.organization_id
          AND d.day = (OLD.created_at AT TIME ZONE 'UTC')::date
          AND d.operation = OLD.operation
          AND d.user_id IS NOT DISTINCT FROM OLD.user_id
          AND d.api_key_id IS NOT DISTINCT FROM OLD.api_key_id;
        DELETE FROM usage_daily d
        WHERE d.organization_id = OLD.organization_id
          AND d.day = (OLD.created_at AT TIME ZONE 'UTC')::date
          AND d.operation = OLD.operation
          AND d.user_id IS NOT DISTINCT FROM OLD.user_id
          AND d.api_key_id IS NOT DISTINCT FROM OLD.api_key_id
          AND d.jobs = 0;
        RETURN NULL;
    END
$function$
