CREATE OR REPLACE FUNCTION public.hm_effective_limits(p_org uuid)
 RETURNS TABLE(plan_id uuid, monthly_gpu_seconds double precision, monthly_images integer, max_running_jobs integer, max_queued_jobs integer, storage_bytes bigint, requests_per_minute integer, org_requests_per_minute integer)
 LANGUAGE sql
 STABLE
AS $function$
    -- The one statement of the rule. An organization's limits are its plan's (the default
    -- plan's while it has none of its own), each replaced by the organization's override when
    -- the key is present, even with null (unlimited). One row for an organization the caller
    -- may see (RLS), none for another; plan_id is null only when the organization has no plan
    -- and no plan is the default. Counts go through numeric, so an override written as 100.0
    -- or 1e6 reads as the whole number it is rather than failing every submit. Plain SQL, STABLE, the caller's rights and no SET clause:
    -- the planner inlines it into the query that calls it.
    SELECT p.id,
           CASE WHEN b.overrides ? 'monthly_gpu_seconds'
                THEN (b.overrides ->> 'monthly_gpu_seconds')::double precision
                ELSE p.monthly_gpu_seconds END,
           CASE WHEN b.overrides ? 'monthly_images'
                THEN (b.overrides ->> 'monthly_images')::numeric::integer
                ELSE p.monthly_images END,
           CASE WHEN b.overrides ? 'max_running_jobs'
                THEN (b.overrides ->> 'max_running_jobs')::numeric::integer
                ELSE p.max_running_jobs END,
           CASE WHEN b.overrides ? 'max_queued_jobs'
                THEN (b.overrides ->> 'max_queued_jobs')::numeric::integer
                ELSE p.max_queued_jobs END,
           CASE WHEN b.overrides ? 'storage_bytes'
                THEN (b.overrides ->> 'storage_bytes')::numeric::bigint
                ELSE p.storage_bytes END,
           CASE WHEN b.overrides ? 'requests_per_minute'
                THEN (b.overrides ->> 'requests_per_minute')::numeric::integer
                ELSE p.requests_per_minute END,
           CASE WHEN b.overrides ? 'org_requests_per_minute'
                THEN (b.overrides ->> 'org_requests_per_minute')::numeric::integer
                ELSE p.org_requests_per_minute END
      FROM public.organizations o
      LEFT JOIN public.org_billing b ON b.organization_id = o.id
      LEFT JOIN public.plans p
        ON p.id = coalesce(b.plan_id,
                           (SELECT d.id FROM public.plans d WHERE d.is_default LIMIT 1))
     WHERE o.id = p_org
$function$
