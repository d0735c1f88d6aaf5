"""One Redis client per process (async for the API, sync for workers)."""

from __future__ import annotations

from functools import lru_cache

import redis
import redis.asyncio as aioredis

from hiddenmodel.settings import get_settings


@lru_cache
def async_redis() -> aioredis.Redis:
    return aioredis.Redis.from_url(
        get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2
    )


@lru_cache
def sync_redis() -> redis.Redis:
    return redis.Redis.from_url(
        get_settings().redis_url, socket_timeout=5, socket_connect_timeout=2
    )


async def close_redis() -> None:
    if async_redis.cache_info().currsize:
        await async_redis().aclose()
        async_redis.cache_clear()
