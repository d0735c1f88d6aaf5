CREATE OR REPLACE FUNCTION public.hm_submit_job(p_job uuid, p_org uuid, p_api_key uuid, p_user uuid, p_operation character varying, p_version character varying, p_queue character varying, p_params jsonb, p_inputs jsonb, p_idempotency_key character varying, p_request_hash character varying, p_cancel_after timestamp with time zone, p_gpu double precision, p_images integer, p_input_bytes bigint, p_past_due_grace_seconds double precision)
 RETURNS TABLE(created_at timestamp with time zone, queue_position integer, plan_code character varying, price_per_gpu_second numeric, currency character varying)
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    #variable_conflict use_column
    DECLARE
        b org_billing%ROWTYPE;
        pl plans%ROWTYPE;
        lim record;
        sub_limits jsonb;
        member_limits jsonb := '{}'::jsonb;
        key_limits jsonb := '{}'::jsonb;
        v_period date := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
        v_position integer;
        v_queued integer;
        v_member_queued integer;
        v_key_queued integer;
        v_limit double precision;
        subject record;
        c quota_counters%ROWTYPE;
        done boolean;
    BEGIN
        -- The organization's limits (hm_effective_limits: its plan's, or the default plan's,
        -- and its overrides), then member and key sub-limits.
        SELECT * INTO lim FROM hm_effective_limits(p_org);
        SELECT * INTO pl FROM plans WHERE id = lim.plan_id;
        IF pl.id IS NULL THEN
            RAISE EXCEPTION 'no default plan is configured';
        END IF;
        SELECT * INTO b FROM org_billing WHERE organization_id = p_org;
        IF b.past_due_since IS NOT NULL
           AND extract(epoch FROM now() - b.past_due_since) > p_past_due_grace_seconds THEN
            RAISE EXCEPTION 'payment past due'
                USING ERRCODE = 'HM402',
                      DETAIL = json_build_object('past_due_since', b.past_due_since)::text;
        END IF;
        SELECT coalesce(jsonb_object_agg(l.subject_type, l.limits), '{}')
          INTO sub_limits
          FROM quota_limits l
         WHERE l.organization_id = p_org
           AND ((l.subject_type = 'member' AND l.subject_id = p_user)
                OR (l.subject_type = 'api_key' AND l.subject_id = p_api_key));
        member_limits := coalesce(sub_limits->'member', '{}');
        key_limits := coalesce(sub_limits->'api_key', '{}');

        INSERT INTO jobs (id, organization_id, api_key_id, user_id, operation,
                          operation_version, queue, params, status, progress, inputs,
                          outputs, idempotency_key, request_hash, cancel_after,
                          cancel_requested, attempts, dispatch_count)
        VALUES (p_job, p_org, p_api_key, p_user, p_operation, p_version, p_queue, p_params,
                'queued', 0, p_inputs, '[]', p_idempotency_key, p_request_hash,
                p_cancel_after, false, 0, 0);
        INSERT INTO job_outbox (organization_id, job_id, queue)
        VALUES (p_org, p_job, p_queue);

        -- Queue counts from the counter rows the insert above just moved (hm_count_jobs,
        -- a trigger): read in constant time, whatever the number of queued jobs, and
        -- exact, since this transaction holds those rows until it ends.
        SELECT coalesce(max(c.queued) FILTER (WHERE c.subject_type = 'org'), 0),
               coalesce(max(c.queued) FILTER (WHERE c.subject_type = 'member'), 0),
               coalesce(max(c.queued) FILTER (WHERE c.subject_type = 'api_key'), 0)
          INTO v_queued, v_member_queued, v_key_queued
          FROM job_counts c
         WHERE c.organization_id = p_org
           AND ((c.subject_type = 'org' AND c.subject_id = p_org)
                OR (c.subject_type = 'member' AND c.subject_id = p_user)
                OR (c.subject_type = 'api_key' AND c.subject_id = p_api_key));
        -- The jobs ahead of this one: every other queued job of the organization.
        v_position := greatest(v_queued - 1, 0);
        FOR subject IN
            SELECT * FROM (VALUES
                (1, 'org', v_queued, lim.max_queued_jobs::double precision),
                (2, 'member', v_member_queued,
                 (member_limits->>'max_queued_jobs')::double precision),
                (3, 'api_key', v_key_queued,
                 (key_limits->>'max_queued_jobs')::double precision)
            ) AS s(ord, kind, queued, lim)
            WHERE s.lim IS NOT NULL AND s.queued > s.lim
              AND (s.kind = 'org' OR (s.kind = 'member' AND p_user IS NOT NULL)
                   OR (s.kind = 'api_key' AND p_api_key IS NOT NULL))
            ORDER BY s.ord LIMIT 1
        LOOP
            PERFORM hm_quota_refusal(subject.kind, 'max_queued_jobs', subject.lim,
                                     subject.queued - 1, 0, 1, NULL);
        END LOOP;

        -- Reserve on each counter row, in the order hm_settle_job locks them:
        -- organization, member, API key, then the lifetime row.
        FOR subject IN
            SELECT * FROM (VALUES
                (1, 'org', p_org, lim.monthly_gpu_seconds,
                 lim.monthly_images::double precision),
                (2, 'member', p_user,
                 (member_limits->>'monthly_gpu_seconds')::double precision,
                 (member_limits->>'monthly_images')::double precision),
                (3, 'api_key', p_api_key,
                 (key_limits->>'monthly_gpu_seconds')::double precision,
                 (key_limits->>'monthly_images')::double precision)
            ) AS s(ord, kind, id, gpu_limit, image_limit)
            WHERE s.id IS NOT NULL ORDER BY s.ord
        LOOP
            done := false;
            -- A counter row may be missing (first job of the month) or change between
            -- the UPDATE and the look at why it failed (a job settling): try again.
            FOR attempt IN 1..3 LOOP
                UPDATE quota_counters q
                   SET gpu_seconds_reserved = q.gpu_seconds_reserved + p_gpu,
                       images_reserved = q.images_reserved + p_images
                 WHERE q.organization_id = p_org AND q.subject_type = subject.kind
                   AND q.subject_id = subject.id AND q.period = v_period
                   AND (subject.gpu_limit IS NULL
                        OR q.gpu_seconds_used + q.gpu_seconds_reserved + p_gpu
                           <= subject.gpu_limit)
                   AND (subject.image_limit IS NULL
                        OR q.images_used + q.images_reserved + p_images
                           <= subject.image_limit);
                done := FOUND;
                EXIT WHEN done;
                SELECT * INTO c FROM quota_counters q
                 WHERE q.organization_id = p_org AND q.subject_type = subject.kind
                   AND q.subject_id = subject.id AND q.period = v_period;
                IF NOT FOUND THEN
                    -- The month's first job for this subject: make its row, then retry.
                    INSERT INTO quota_counters (organization_id, subject_type, subject_id,
                                                period)
                    VALUES (p_org, subject.kind, subject.id, v_period)
                    ON CONFLICT DO NOTHING;
                    CONTINUE;
                END IF;
                IF subject.gpu_limit IS NOT NULL
                   AND c.gpu_seconds_used + c.gpu_seconds_reserved + p_gpu
                       > subject.gpu_limit THEN
                    PERFORM hm_quota_refusal(subject.kind, 'monthly_gpu_seconds',
                                             subject.gpu_limit, c.gpu_seconds_used,
                                             c.gpu_seconds_reserved, p_gpu, v_period);
                END IF;
                IF subject.image_limit IS NOT NULL
                   AND c.images_used + c.images_reserved + p_images
                       > subject.image_limit THEN
                    PERFORM hm_quota_refusal(subject.kind, 'monthly_images',
                                             subject.image_limit, c.images_used,
                                             c.images_reserved, p_images, v_period);
                END IF;
            END LOOP;
            IF NOT done THEN
                RAISE EXCEPTION 'quota counter kept changing' USING ERRCODE = '40001';
            END IF;
        END LOOP;

        v_limit := lim.storage_bytes;
        done := false;
        FOR attempt IN 1..3 LOOP
            UPDATE quota_counters q SET bytes_used = q.bytes_used + p_input_bytes
             WHERE q.organization_id = p_org AND q.subject_type = 'org'
               AND q.subject_id = p_org AND q.period = DATE '1970-01-01'
               AND (v_limit IS NULL OR q.bytes_used + p_input_bytes <= v_limit);
            done := FOUND;
            EXIT WHEN done;
            SELECT * INTO c FROM quota_counters q
             WHERE q.organization_id = p_org AND q.subject_type = 'org'
               AND q.subject_id = p_org AND q.period = DATE '1970-01-01';
            IF NOT FOUND THEN
                INSERT INTO quota_counters (organization_id, subject_type, subject_id,
                                            period)
                VALUES (p_org, 'org', p_org, DATE '1970-01-01')
                ON CONFLICT DO NOTHING;
                CONTINUE;
            END IF;
            IF c.bytes_used + p_input_bytes > v_limit THEN
                PERFORM hm_quota_refusal('org', 'storage_bytes', v_limit, c.bytes_used, 0,
                                         p_input_bytes, NULL);
            END IF;
        END LOOP;
        IF NOT done THEN
            RAISE EXCEPTION 'quota counter kept changing' USING ERRCODE = '40001';
        END IF;

        INSERT INTO quota_reservations (id, organization_id, job_id, period, user_id,
                                        api_key_id, gpu_seconds, images, status)
        VALUES (gen_random_uuid(), p_org, p_job, v_period, p_user, p_api_key, p_gpu,
                p_images, 'held');

        RETURN QUERY SELECT now(), v_position, pl.code, pl.price_per_gpu_second,
                            pl.currency;
    END
$function$
