"""Worker liveness: every worker process announces itself in Redis while it lives.

A process is known by ``<node name>#<pid>-<token>``, new at every start, so a worker that
restarts under the same node name is a different worker. A thread sets ``hm:worker:<id>``
with a short TTL every ``worker_heartbeat_seconds``; a process killed with SIGKILL stops
refreshing it and the key is gone within ``worker_liveness_ttl_seconds``.

What a worker process holds is written down where the reconciler can find it:

* a running job names the process that claimed it (``jobs.worker``);
* a delivered message whose job is not claimed yet has a receipt ``hm:receipt:<task id>``
  naming the process that received it and the job's organization, written the moment the
  worker receives the message (before the pool runs it).

The reconciler (:mod:`workers.dispatcher`) returns both to the queue as soon as their worker's
key is gone, whatever the broker's unacked set still holds.

A FLUSHALL or a Redis restart wipes every key at once. The epoch key ``hm:liveness:epoch``
goes with them; until one TTL after it is written again no worker is judged gone, which gives
the live ones the time to announce themselves again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from hiddenmodel.liveness import WORKER_PREFIX
from hiddenmodel.redis import sync_redis
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)

RECEIPT_PREFIX = "hm:receipt:"
EPOCH_KEY = "hm:liveness:epoch"
ID_SEPARATOR = "#"

_node: str | None = None
_identity: str | None = None
_announcer: Announcer | None = None
_lock = threading.Lock()


def _new_identity() -> str:
    node = _node or socket.gethostname()
    return f"{node}{ID_SEPARATOR}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def worker_id() -> str:
    """This process's identity (made on first use; a forked child makes its own)."""
    global _identity
    with _lock:
        if _identity is None:
            _identity = _new_identity()
        return _identity


def is_worker_id(value: str | None) -> bool:
    """Whether ``value`` names an announcing worker process (older rows name a host only)."""
    return bool(value) and ID_SEPARATOR in str(value)


class Announcer(threading.Thread):
    """Refreshes this process's key until stopped; deletes it on a clean stop."""

    def __init__(self, identity: str) -> None:
        super().__init__(daemon=True, name="liveness")
        settings = get_settings()
        self.identity = identity
        self.interval = settings.worker_heartbeat_seconds
        self.ttl_ms = max(1, int(settings.worker_liveness_ttl_seconds * 1000))
        self.stopped = threading.Event()
        self.value = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        )
        self._failing = False

    def beat(self) -> None:
        sync_redis().set(WORKER_PREFIX + self.identity, self.value, px=self.ttl_ms)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.beat()
                if self._failing:
                    log.info("worker %s announces itself again", self.identity)
                self._failing = False
            except redis.RedisError as exc:
                if not self._failing:
                    log.warning("worker %s cannot announce itself: %s", self.identity, exc)
                self._failing = True
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):  # else the key expires by itself
            sync_redis().delete(WORKER_PREFIX + self.identity)


def start(node: str | None = None) -> str:
    """Announce this process now (first beat before returning), then keep announcing it."""
    global _node, _announcer
    if node:
        _node = node
    identity = worker_id()
    with _lock:
        if _announcer is not None:
            return identity
        _announcer = Announcer(identity)
        try:
            _announcer.beat()
        except redis.RedisError as exc:
            log.warning("worker %s cannot announce itself yet: %s", identity, exc)
        _announcer.start()
    log.info("worker process %s announced", identity)
    return identity


def stop() -> None:
    global _announcer
    with _lock:
        announcer, _announcer = _announcer, None
    if announcer is not None:
        announcer.stop()


def _forget_in_child() -> None:
    global _identity, _announcer, _lock
    # A forked child is another process: its own identity and its own announcer.
    _identity, _announcer, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


# --- receipts: a delivered message not yet claimed ---------------------------------------


@dataclass(frozen=True)
class Receipt:
    task_id: str
    worker: str
    org_id: uuid.UUID


def record_receipt(task_id: str, org_id: str, worker: str | None = None) -> None:
    settings = get_settings()
    sync_redis().set(
        RECEIPT_PREFIX + task_id,
        json.dumps({"worker": worker or worker_id(), "org": org_id}),
        ex=settings.celery_visibility_timeout_seconds,
    )


def forget_receipt(task_id: str) -> None:
    sync_redis().delete(RECEIPT_PREFIX + task_id)


def receipts(client: redis.Redis | None = None) -> list[Receipt]:
    client = client or sync_redis()
    keys = list(client.scan_iter(match=RECEIPT_PREFIX + "*", count=1000))
    found: list[Receipt] = []
    if not keys:
        return found
    for key, raw in zip(keys, client.mget(keys), strict=True):
        if raw is None:
            continue
        name = key.decode() if isinstance(key, bytes) else str(key)
        try:
            body: dict[str, Any] = json.loads(raw)
            found.append(
                Receipt(name[len(RECEIPT_PREFIX) :], str(body["worker"]), uuid.UUID(body["org"]))
            )
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed receipt %s", name)
    return found


# --- verdicts (the reconciler) -------------------------------------------------------------


def alive(ids: set[str], client: redis.Redis | None = None) -> set[str]:
    """Which of ``ids`` announced themselves within the TTL."""
    client = client or sync_redis()
    ordered = sorted(ids)
    if not ordered:
        return set()
    pipe = client.pipeline(transaction=False)
    for identity in ordered:
        pipe.exists(WORKER_PREFIX + identity)
    return {i for i, n in zip(ordered, pipe.execute(), strict=True) if n}


def verdicts_allowed(client: redis.Redis | None = None, now: float | None = None) -> bool:
    """False for one TTL after Redis lost its keys: the live workers have not re-announced."""
    client = client or sync_redis()
    now = time.time() if now is None else now
    if client.set(EPOCH_KEY, repr(now), nx=True):
        log.info("liveness epoch begins: no worker is judged gone for one TTL")
        return False
    raw = client.get(EPOCH_KEY)
    try:
        since = float(raw) if raw is not None else now
    except ValueError:
        since = now
    return now - since >= get_settings().worker_liveness_ttl_seconds
