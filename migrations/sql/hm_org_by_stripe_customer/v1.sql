CREATE OR REPLACE FUNCTION public.hm_org_by_stripe_customer(p_customer character varying)
 RETURNS TABLE(out_org uuid)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT b.organization_id FROM org_billing b
    WHERE b.stripe_customer_id = p_customer
    ORDER BY b.organization_id
    LIMIT 2
$function$
