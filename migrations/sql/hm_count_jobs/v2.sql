CREATE OR REPLACE FUNCTION public.hm_count_jobs()
 RETURNS trigger
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    DECLARE
        o_org uuid;
        o_user uuid;
        o_key uuid;
        o_queued integer := 0;
        o_running integer := 0;
        n_org uuid;
        n_user uuid;
        n_key uuid;
        n_queued integer := 0;
        n_running integer := 0;
        o_minute timestamp with time zone;
        n_minute timestamp with time zone;
        left_queued integer;
        subject record;
    BEGIN
        -- What the old row counted is taken away and what the new row counts is added, on
        -- the rows of its organization, member and API key, locked in that order (the order
        -- hm_submit_job reads them in). Only queued and running jobs count: the triggers'
        -- WHEN keeps heartbeats and progress updates away from here.
        IF TG_OP <> 'INSERT' THEN
            o_org := OLD.organization_id;
            o_user := OLD.user_id;
            o_key := OLD.api_key_id;
            o_queued := (OLD.status = 'queued')::integer;
            o_running := (OLD.status = 'running')::integer;
            o_minute := date_bin('1 minute', OLD.created_at, '2000-01-01 00:00:00+00');
        END IF;
        IF TG_OP <> 'DELETE' THEN
            n_org := NEW.organization_id;
            n_user := NEW.user_id;
            n_key := NEW.api_key_id;
            n_queued := (NEW.status = 'queued')::integer;
            n_running := (NEW.status = 'running')::integer;
            n_minute := date_bin('1 minute', NEW.created_at, '2000-01-01 00:00:00+00');
        END IF;
        FOR subject IN
            SELECT v.kind, v.id, min(v.ord) AS ord, v.org,
                   sum(v.queued)::integer AS queued, sum(v.running)::integer AS running
            FROM (VALUES (1, 'org', o_org, o_org, -o_queued, -o_running),
                         (2, 'member', o_user, o_org, -o_queued, -o_running),
                         (3, 'api_key', o_key, o_org, -o_queued, -o_running),
                         (1, 'org', n_org, n_org, n_queued, n_running),
                         (2, 'member', n_user, n_org, n_queued, n_running),
                         (3, 'api_key', n_key, n_org, n_queued, n_running)
                 ) AS v(ord, kind, id, org, queued, running)
            WHERE v.id IS NOT NULL
            GROUP BY v.kind, v.id, v.org
            HAVING sum(v.queued) <> 0 OR sum(v.running) <> 0
            ORDER BY min(v.ord), v.org, v.id
        LOOP
            IF subject.queued >= 0 AND subject.running >= 0 THEN
                INSERT INTO job_counts AS c (organization_id, subject_type, subject_id, queued,
                                             running)
                VALUES (subject.org, subject.kind, subject.id, subject.queued, subject.running)
                ON CONFLICT (organization_id, subject_type, subject_id) DO UPDATE
                SET queued = c.queued + excluded.queued,
                    running = c.running + excluded.running;
            ELSE
                -- A job leaving a count: its row exists (unless its organization is being
                -- deleted, when there is nothing left to count).
                UPDATE job_counts c
                SET queued = c.queued + subject.queued, running = c.running + subject.running
                WHERE c.organization_id = subject.org AND c.subject_type = subject.kind
                  AND c.subject_id = subject.id;
            END IF;
        END LOOP;
        -- The organization's queued jobs per minute of admission (a job's queue position
        -- sums the minutes before its own), after the counter rows, so the organization's
        -- row orders these locks too. A minute that comes to zero is deleted: the table
        -- holds the minutes the queue spans, no more.
        FOR subject IN
            SELECT v.org, v.minute, sum(v.queued)::integer AS queued
            FROM (VALUES (o_org, o_minute, -o_queued), (n_org, n_minute, n_queued))
                 AS v(org, minute, queued)
            WHERE v.org IS NOT NULL
            GROUP BY v.org, v.minute
            HAVING sum(v.queued) <> 0
            ORDER BY v.org, v.minute
        LOOP
            IF subject.queued > 0 THEN
                INSERT INTO job_queue_minutes AS q (organization_id, minute, queued)
                VALUES (subject.org, subject.minute, subject.queued)
                ON CONFLICT (organization_id, minute) DO UPDATE
                SET queued = q.queued + excluded.queued;
            ELSE
                -- The row stays locked from the update to the delete of its last job. (No
                -- row: the organization is being deleted, nothing is left to count.)
                UPDATE job_queue_minutes q SET queued = q.queued + subject.queued
                WHERE q.organization_id = subject.org AND q.minute = subject.minute
                RETURNING q.queued INTO left_queued;
                IF left_queued = 0 THEN
                    DELETE FROM job_queue_minutes q
                    WHERE q.organization_id = subject.org AND q.minute = subject.minute;
                END IF;
            END IF;
        END LOOP;
        RETURN NULL;
    END
$function$
