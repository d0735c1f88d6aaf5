CREATE OR REPLACE FUNCTION public.hm_user_organizations(p_user_id uuid)
 RETURNS TABLE(organization_id uuid, slug character varying, name character varying, role character varying, joined_at timestamp with time zone)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    -- Only the user the transaction acts for (app.user_id, bound by the app per
    -- transaction): another user's id finds nothing.
    SELECT o.id, o.slug, o.name, m.role, m.created_at
    FROM memberships m JOIN organizations o ON o.id = m.organization_id
    WHERE m.user_id = p_user_id
      AND p_user_id = nullif(current_setting('app.user_id', true), '')::uuid
    ORDER BY o.slug
$function$
