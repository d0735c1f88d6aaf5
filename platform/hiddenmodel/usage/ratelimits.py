"""Which request rates apply to an API key: its own sub-limit or the plan's, and the org's."""

from __future__ import annotations

import time
import uuid

from hiddenmodel import ratelimit
from hiddenmodel.usage import service
from tenants.auth import KeySession
from tenants.models import ApiKey

CACHE_SECONDS = 30.0
_cache: dict[tuple[uuid.UUID, uuid.UUID], tuple[float, int | None, int | None]] = {}


async def _limits(key: ApiKey, key_session: KeySession) -> tuple[int | None, int | None]:
    cache_key = (key.organization_id, key.id)
    cached = _cache.get(cache_key)
    now = time.monotonic()
    if cached is not None and cached[0] > now:
        return cached[1], cached[2]
    session = key_session()
    org = await service.org_plan(session, key.organization_id)
    own = await service.sub_limits(session, "api_key", key.id)
    key_rpm = own.get("requests_per_minute") or org.limits.get("requests_per_minute")
    org_rpm = org.limits.get("org_requests_per_minute")
    result = (
        int(key_rpm) if key_rpm is not None else None,
        int(org_rpm) if org_rpm is not None else None,
    )
    _cache[cache_key] = (now + CACHE_SECONDS, *result)
    return result


def forget_all() -> None:
    """Drop every cached limit (a plan changed)."""
    _cache.clear()


def forget(org_id: uuid.UUID) -> None:
    """Drop cached limits of an organization (its plan or overrides changed)."""
    for cached in [k for k in _cache if k[0] == org_id]:
        _cache.pop(cached, None)


async def enforce_for_key(key: ApiKey, key_session: KeySession) -> None:
    """Count the request against the key's and the organization's per-minute limits.

    ``key_session`` gives the request's session, bound to the key's organization; it is
    asked for only when the limits are not cached."""
    key_rpm, org_rpm = await _limits(key, key_session)
    await ratelimit.enforce(
        [("api_key", f"key:{key.id}", key_rpm), ("org", f"org:{key.organization_id}", org_rpm)]
    )
