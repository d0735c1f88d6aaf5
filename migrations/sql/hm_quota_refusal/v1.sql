CREATE OR REPLACE FUNCTION public.hm_quota_refusal(p_subject character varying, p_limit character varying, p_value double precision, p_used double precision, p_reserved double precision, p_requested double precision, p_period date)
 RETURNS void
 LANGUAGE plpgsql
 SET search_path TO 'public', 'pg_temp'
AS $function$
    BEGIN
        RAISE EXCEPTION 'quota exceeded: % %', p_subject, p_limit
            USING ERRCODE = 'HM429',
                  DETAIL = json_build_object(
                      'subject', p_subject, 'limit', p_limit, 'limit_value', p_value,
                      'used', p_used, 'reserved', p_reserved, 'requested', p_requested,
                      'period', p_period)::text;
    END
$function$
