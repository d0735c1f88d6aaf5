CREATE OR REPLACE FUNCTION public.hm_api_key_for_request(p_org uuid, p_key_hash character varying)
 RETURNS TABLE(api_key jsonb, organization jsonb)
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    BEGIN
        -- Local to the transaction, like every tenant session's binding; it outlives
        -- this call (the SET clause above restores search_path only).
        PERFORM set_config('app.org_id', p_org::text, true);
        -- The caller may not read key_hash: the key comes back without it, and only from
        -- the organization just bound (the owner bypasses row-level security).
        RETURN QUERY
            SELECT to_jsonb(k) - 'key_hash', to_jsonb(o)
              FROM api_keys k JOIN organizations o ON o.id = k.organization_id
             WHERE k.organization_id = p_org AND k.key_hash = p_key_hash;
    END
$function$
