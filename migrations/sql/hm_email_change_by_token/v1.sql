CREATE OR REPLACE FUNCTION public.hm_email_change_by_token(p_token_hash character varying)
 RETURNS TABLE(id uuid, user_id uuid, new_email character varying, expires_at timestamp with time zone, confirmed_at timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- The pending change a confirmation link names, found by the link's hash, which the
    -- caller may not read: the change without its hash.
    SELECT c.id, c.user_id, c.new_email, c.expires_at, c.confirmed_at
    FROM email_changes c
    WHERE c.token_hash = p_token_hash
$function$
