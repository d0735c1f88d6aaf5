CREATE OR REPLACE FUNCTION public.hm_access_tokens_end_others(p_user_id uuid, p_keep_hash character varying)
 RETURNS integer
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- Sign out every session of the user the transaction acts for (app.user_id) but the one
    -- whose hash is kept (the caller's own): another user's id ends nothing.
    WITH gone AS (
        DELETE FROM access_tokens t
        WHERE t.user_id = p_user_id
          AND p_user_id = nullif(current_setting('app.user_id', true), '')::uuid
          AND (p_keep_hash IS NULL OR t.token_hash <> p_keep_hash)
        RETURNING 1
    )
    SELECT count(*)::integer FROM gone
$function$
