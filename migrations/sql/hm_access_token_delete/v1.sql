CREATE OR REPLACE FUNCTION public.hm_access_token_delete(p_token_hash character varying)
 RETURNS boolean
 LANGUAGE sql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- Sign-out by the token's hash, which the caller may not read.
    WITH gone AS (DELETE FROM access_tokens t WHERE t.token_hash = p_token_hash RETURNING 1)
    SELECT count(*) > 0 FROM gone
$function$
