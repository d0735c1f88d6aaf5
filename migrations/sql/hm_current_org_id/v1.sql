CREATE OR REPLACE FUNCTION public.hm_current_org_id()
 RETURNS uuid
 LANGUAGE sql
 STABLE PARALLEL SAFE
AS $function$ SELECT nullif(current_setting('app.org_id', true), '')::uuid $function$

