"""Job events over Redis: pub/sub for progress and state, a flag for cancel, a dispatch wake.

Redis here is a fast path only. PostgreSQL stays the source of truth: a lost event delays a
notification, never changes an outcome (readers fall back to the database).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from hiddenmodel.redis import async_redis, sync_redis

DISPATCH_WAKE = "hm:dispatch:wake"
CANCEL_TTL_SECONDS = 24 * 3600


def channel(job_id: uuid.UUID | str) -> str:
    return f"hm:job:{job_id}:events"


def cancel_key(job_id: uuid.UUID | str) -> str:
    return f"hm:job:{job_id}:cancel"


def publish(job_id: uuid.UUID | str, event: dict[str, Any]) -> None:
    sync_redis().publish(channel(job_id), json.dumps(event, default=str))


async def publish_async(job_id: uuid.UUID | str, event: dict[str, Any]) -> None:
    await async_redis().publish(channel(job_id), json.dumps(event, default=str))


def wake_dispatcher_sync() -> None:
    client = sync_redis()
    pipe = client.pipeline(transaction=False)
    pipe.lpush(DISPATCH_WAKE, 1)
    pipe.ltrim(DISPATCH_WAKE, 0, 0)
    pipe.execute()


async def wake_dispatcher() -> None:
    client = async_redis()
    pipe = client.pipeline(transaction=False)
    pipe.lpush(DISPATCH_WAKE, 1)
    pipe.ltrim(DISPATCH_WAKE, 0, 0)
    await pipe.execute()


async def request_cancel(job_id: uuid.UUID) -> None:
    await async_redis().set(cancel_key(job_id), 1, ex=CANCEL_TTL_SECONDS)


def cancel_requested(job_id: uuid.UUID | str) -> bool:
    return bool(sync_redis().exists(cancel_key(job_id)))
