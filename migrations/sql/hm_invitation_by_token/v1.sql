CREATE OR REPLACE FUNCTION public.hm_invitation_by_token(p_token_hash character varying)
 RETURNS TABLE(out_invitation uuid)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- The invitation an accepted token names, in the organization the transaction is bound
    -- to only; its hash stays unreadable to the caller.
    SELECT i.id
    FROM invitations i
    WHERE i.organization_id = hm_current_org_id() AND i.token_hash = p_token_hash
$function$
