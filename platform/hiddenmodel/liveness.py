"""Worker processes' liveness keys in Redis, as the API and the portal read them.

Every worker process keeps ``hm:worker:<id>`` alive with a short TTL while it lives (the
writing side, with receipts and the reconciler's verdicts, is ``workers/liveness.py``). The
operators' views list the processes from these keys: a worker that runs no job is still
there, and one killed with SIGKILL disappears within a TTL.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio as aioredis

from hiddenmodel.redis import async_redis

WORKER_PREFIX = "hm:worker:"
# A bound on what one view reads: far more processes than any deployment runs.
MAX_LISTED = 1000


@dataclass(frozen=True)
class LiveWorker:
    """One announced worker process."""

    id: str
    host: str | None
    pid: int | None
    started: datetime | None
    # Seconds until the key expires unless the process announces itself again.
    expires_in: float | None


def _parse(identity: str, raw: bytes | str | None, ttl_ms: int | None) -> LiveWorker:
    info: dict[str, object] = {}
    if raw is not None:
        try:
            loaded = json.loads(raw)
        except ValueError:
            loaded = None
        if isinstance(loaded, dict):
            info = loaded
    started = info.get("started")
    pid = info.get("pid")
    host = info.get("host")
    return LiveWorker(
        id=identity,
        host=host if isinstance(host, str) else None,
        pid=pid if isinstance(pid, int) else None,
        started=(
            datetime.fromtimestamp(started, UTC) if isinstance(started, int | float) else None
        ),
        expires_in=ttl_ms / 1000 if ttl_ms is not None and ttl_ms >= 0 else None,
    )


async def live_workers(client: aioredis.Redis | None = None) -> list[LiveWorker]:
    """The worker processes announced now, oldest first (at most ``MAX_LISTED``)."""
    client = client or async_redis()
    keys: list[bytes] = []
    async for key in client.scan_iter(match=WORKER_PREFIX + "*", count=500):
        keys.append(key)
        if len(keys) >= MAX_LISTED:
            break
    if not keys:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        answers = await pipe.execute()
    workers = []
    for i, key in enumerate(keys):
        raw, ttl = answers[2 * i], answers[2 * i + 1]
        if raw is None:  # expired between the scan and the read
            continue
        name = key.decode() if isinstance(key, bytes) else str(key)
        workers.append(_parse(name.removeprefix(WORKER_PREFIX), raw, ttl))
    far_future = datetime.max.replace(tzinfo=UTC)
    return sorted(workers, key=lambda w: (w.started or far_future, w.id))
