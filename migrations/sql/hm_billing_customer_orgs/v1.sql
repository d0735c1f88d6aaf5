CREATE OR REPLACE FUNCTION public.hm_billing_customer_orgs()
 RETURNS TABLE(out_org uuid)
 LANGUAGE sql
 STABLE SECURITY DEFINER
 SET search_path TO 'public', 'pg_temp'
AS $function$
    SELECT b.organization_id FROM org_billing b
    WHERE b.stripe_customer_id IS NOT NULL
    ORDER BY b.organization_id
$function$
