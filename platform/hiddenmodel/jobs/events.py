"""Job events over Redis: pub/sub for progress and state, a flag for cancel, a dispatch wake.

Redis here is a fast path only. PostgreSQL stays the source of truth: a lost event delays a
notification, never changes an outcome (readers fall back to the database).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
import weakref
from typing import Any

from redis.asyncio.client import Pipeline as AsyncPipeline
from redis.client import Pipeline

from hiddenmodel.redis import async_redis, sync_redis

log = logging.getLogger(__name__)

DISPATCH_WAKE = "hm:dispatch:wake"
CANCEL_TTL_SECONDS = 24 * 3600


def channel(job_id: uuid.UUID | str) -> str:
    return f"hm:job:{job_id}:events"


def cancel_key(job_id: uuid.UUID | str) -> str:
    return f"hm:job:{job_id}:cancel"


def publish(job_id: uuid.UUID | str, event: dict[str, Any]) -> None:
    sync_redis().publish(channel(job_id), json.dumps(event, default=str))


def queue_publish(pipe: Pipeline, job_id: uuid.UUID | str, event: dict[str, Any]) -> None:
    """:func:`publish` as one command of ``pipe``."""
    pipe.publish(channel(job_id), json.dumps(event, default=str))


async def publish_async(job_id: uuid.UUID | str, event: dict[str, Any]) -> None:
    await async_redis().publish(channel(job_id), json.dumps(event, default=str))


def queue_wake(pipe: Pipeline | AsyncPipeline) -> None:
    # One pending wake is enough: the dispatcher drains everything due when it wakes.
    pipe.lpush(DISPATCH_WAKE, 1)
    pipe.ltrim(DISPATCH_WAKE, 0, 0)


def wake_dispatcher_sync() -> None:
    pipe = sync_redis().pipeline(transaction=False)
    queue_wake(pipe)
    pipe.execute()


async def _push_wake() -> None:
    pipe = async_redis().pipeline(transaction=False)
    queue_wake(pipe)
    await pipe.execute()


class _Waker:
    """At most one wake in flight per event loop, sent from a background task. Callers that
    arrive while one is in flight are covered by a single wake sent after it: that one
    leaves after their commits, so the dispatcher still sees their jobs, and a burst of
    submits costs a few round trips, not one each, and no request waits on Redis for it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.again = False

    def wake(self) -> None:
        if self.task is not None:
            self.again = True
            return
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self.again = False
                await _push_wake()
                if not self.again:
                    return
        except Exception:
            # The dispatcher also polls: a lost wake delays a job by at most one poll.
            log.warning("could not wake the dispatcher", exc_info=True)
        finally:
            self.task = None


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker] = weakref.WeakKeyDictionary()


async def wake_dispatcher() -> None:
    """Tell the dispatcher that jobs were committed (call after the commit)."""
    loop = asyncio.get_running_loop()
    waker = _wakers.get(loop)
    if waker is None:
        waker = _wakers[loop] = _Waker()
    waker.wake()


async def request_cancel(job_id: uuid.UUID) -> None:
    await async_redis().set(cancel_key(job_id), 1, ex=CANCEL_TTL_SECONDS)


def cancel_requested(job_id: uuid.UUID | str) -> bool:
    return bool(sync_redis().exists(cancel_key(job_id)))
