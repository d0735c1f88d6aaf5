CREATE OR REPLACE FUNCTION public.hm_access_token_user(p_token_hash character varying, p_not_before timestamp with time zone)
 RETURNS TABLE(out_user uuid, out_created timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- The verdict on a session token: whose it is and since when, never the stored hash.
    SELECT t.user_id, t.created_at
    FROM access_tokens t
    WHERE t.token_hash = p_token_hash
      AND (p_not_before IS NULL OR t.created_at >= p_not_before)
$function$
