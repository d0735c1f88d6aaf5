"""The dispatcher and the reconciler: from outbox to queue, fairly; and nothing lost.

* Dispatch: claims outbox rows round robin across organizations with an in-flight cap per
  organization (``hm_claim_dispatch``), commits, then sends one Celery message per job. It
  wakes on a Redis list pushed after each submit and finish, and polls as a fallback.
* Reconcile: expires queued jobs past ``cancel_after``; re-dispatches queued jobs whose message
  is in no queue (Redis flushed or restarted, or a crash between commit and send), or sits
  unacked with no worker having noted its receipt; returns running jobs whose worker stopped
  heartbeating to the queue; fails jobs past their hard limit.
* Recover from dead workers (every ``worker_liveness_check_seconds``): a worker process whose
  liveness key expired (:mod:`workers.liveness`) holds nothing any more. The jobs it was
  running go back to the queue and the messages it had received are dispatched again, at
  once, whether or not the broker still counts them as unacked; that frees the
  organization's in-flight slots in the same transaction.

Every change is a compare-and-set inside the job's own tenant context.

Duplicated messages are harmless: only one delivery wins ``queued → running``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

from hiddenmodel.db import global_session, tenant_session
from hiddenmodel.jobs import events, lifecycle, repository
from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.redis import sync_redis
from hiddenmodel.settings import get_settings
from hiddenmodel.webhooks import enqueue as webhook_enqueue
from workers import liveness
from workers.celery_app import QUEUES, app

log = logging.getLogger(__name__)

KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"


def task_id(job_id: uuid.UUID, dispatch_count: int) -> str:
    return f"{job_id}.{dispatch_count}"


def dispatch_once() -> int:
    """Release what the fairness rules allow now; returns how many jobs were sent."""
    settings = get_settings()
    claimed = repository.claim_dispatch_sync(
        settings.dispatch_org_inflight_cap, settings.dispatch_batch_size
    )
    for item in claimed:
        app.send_task(
            "jobs.run",
            args=[str(item.org_id), str(item.job_id)],
            queue=item.queue,
            task_id=task_id(item.job_id, item.dispatch_count),
        )
    return len(claimed)


def _message_ids(raw: bytes | str) -> str | None:
    try:
        payload = json.loads(raw)
    except (ValueError, TypeError):
        return None
    if isinstance(payload, list):  # unacked entries are [message, exchange, routing_key]
        payload = payload[0]
    headers = payload.get("headers") or {} if isinstance(payload, dict) else {}
    value = headers.get("id")
    return str(value) if value else None


def _parse_task_id(value: str) -> tuple[uuid.UUID, int] | None:
    job, _, count = value.rpartition(".")
    try:
        return uuid.UUID(job), int(count)
    except ValueError:
        return None


def broker_holdings() -> tuple[set[str], dict[str, float]]:
    """Job messages in Redis: ids waiting in a queue, and ids delivered but unacked with the
    time of their delivery."""
    client = sync_redis()
    ids: set[str] = set()
    names: list[str] = []
    for queue in QUEUES:
        names.append(queue)
        names += [
            k.decode() if isinstance(k, bytes) else k
            for k in client.scan_iter(match=f"{queue}{KOMBU_PRIORITY_SEP}*")
        ]
    for name in names:
        for raw in client.lrange(name, 0, -1):
            if (found := _message_ids(raw)) is not None:
                ids.add(found)
    scored: list[tuple[bytes | str, float]] = client.zrange(  # type: ignore[assignment]
        KOMBU_UNACKED_INDEX, 0, -1, withscores=True
    )
    delivered = {
        (tag.decode() if isinstance(tag, bytes) else tag): float(score) for tag, score in scored
    }
    unacked: dict[str, float] = {}
    for tag, raw in client.hgetall(KOMBU_UNACKED).items():
        if (found := _message_ids(raw)) is not None:
            name = tag.decode() if isinstance(tag, bytes) else str(tag)
            unacked[found] = delivered.get(name, 0.0)
    return ids, unacked


def _hard_limit(queue: str) -> float:
    settings = get_settings()
    return settings.gpu_hard_limit_seconds if queue == "gpu" else settings.cpu_hard_limit_seconds


def reconcile_once() -> Counter[str]:
    """One pass over live jobs that need attention; returns counts of what it did."""
    settings = get_settings()
    done: Counter[str] = Counter()
    with global_session() as session:
        candidates = repository.reconcile_candidates_sync(
            session,
            settings.job_lease_seconds,
            settings.redispatch_grace_seconds,
            min(settings.cpu_hard_limit_seconds, settings.gpu_hard_limit_seconds),
        )
    holdings: tuple[set[str], dict[str, float], set[str]] | None = None
    now = datetime.now(UTC)
    for c in candidates:
        ended: list[lifecycle.Ended] = []
        with tenant_session(c.org_id) as s:
            if c.status == JobStatus.QUEUED.value:
                if repository.expire_sync(s, c.job_id):
                    done["expired"] += 1
                    ended.append(
                        lifecycle.record_end_sync(s, c.org_id, c.job_id, JobStatus.EXPIRED)
                    )
                else:
                    if holdings is None:
                        waiting, unacked = broker_holdings()
                        noted = {r.task_id for r in liveness.receipts()}
                        holdings = (waiting, unacked, noted)
                    lost = _message_lost(
                        task_id(c.job_id, c.dispatch_count), *holdings, time.time()
                    )
                    if lost and repository.redispatch_sync(s, c.job_id, c.dispatch_count):
                        log.info("job %s: its message is lost; dispatched again", c.job_id)
                        done["redispatched"] += 1
            else:
                outcome = _running_outcome(c, now)
                if outcome == "requeue":
                    if repository.requeue_running_sync(s, c.job_id, c.attempts):
                        done["requeued"] += 1
                elif isinstance(outcome, tuple):
                    code, message = outcome
                    if repository.fail_running_sync(s, c.job_id, c.attempts, code, message):
                        done[code] += 1
                        ended.append(
                            lifecycle.record_end_sync(s, c.org_id, c.job_id, JobStatus.FAILED)
                        )
        lifecycle.announce(ended)
    if done:
        log.info("reconciled %s", dict(done))
        events.wake_dispatcher_sync()
    return done


def _message_lost(
    task: str, waiting: set[str], unacked: dict[str, float], noted: set[str], now: float
) -> bool:
    """A dispatched job's message is lost when Redis no longer holds it, or when it was
    delivered more than a grace ago and no worker noted receiving it (the worker died in
    between). One whose receiving worker died is :func:`recover_from_dead_workers`'s."""
    if task in waiting:
        return False
    delivered = unacked.get(task)
    if delivered is None:
        return True
    if task in noted:
        return False
    return now - delivered > get_settings().redispatch_grace_seconds


def recover_from_dead_workers() -> Counter[str]:
    """Return to the queue what worker processes that stopped announcing themselves held."""
    settings = get_settings()
    client = sync_redis()
    done: Counter[str] = Counter()
    if not liveness.verdicts_allowed(client):
        return done
    with global_session() as session:
        held = repository.running_jobs_sync(session)
    received = liveness.receipts(client)
    workers = {h.worker for h in held if h.worker and liveness.is_worker_id(h.worker)}
    workers |= {r.worker for r in received}
    live = liveness.alive(workers, client)
    for h in held:
        if h.worker is None or not liveness.is_worker_id(h.worker) or h.worker in live:
            continue
        ended: list[lifecycle.Ended] = []
        with tenant_session(h.org_id) as s:
            if h.attempts >= settings.job_max_attempts:
                if repository.fail_running_sync(
                    s,
                    h.job_id,
                    h.attempts,
                    "worker-lost",
                    "The worker running this job stopped, too often; you are not charged.",
                ):
                    ended.append(lifecycle.record_end_sync(s, h.org_id, h.job_id, JobStatus.FAILED))
                    done["worker-lost"] += 1
                    log.warning(
                        "job %s: worker %s is gone; failed after %s attempts",
                        h.job_id,
                        h.worker,
                        h.attempts,
                    )
            elif repository.requeue_running_sync(s, h.job_id, h.attempts):
                done["requeued"] += 1
                log.info(
                    "job %s: worker %s is gone during attempt %s; back to the queue",
                    h.job_id,
                    h.worker,
                    h.attempts,
                )
        lifecycle.announce(ended)
    for r in received:
        if r.worker in live:
            continue
        parsed = _parse_task_id(r.task_id)
        if parsed is not None:
            job_id, dispatch_count = parsed
            with tenant_session(r.org_id) as s:
                if repository.redispatch_sync(s, job_id, dispatch_count):
                    done["resent"] += 1
                    log.info(
                        "job %s: worker %s received it and is gone; dispatched again",
                        job_id,
                        r.worker,
                    )
        liveness.forget_receipt(r.task_id)
    if done:
        log.info("recovered from dead workers %s", dict(done))
        events.wake_dispatcher_sync()
    return done


def _running_outcome(c: repository.Candidate, now: datetime) -> tuple[str, str] | str | None:
    """A running job past its hard limit fails; one whose worker stopped heartbeating goes
    back to the queue, or fails once it has used up its attempts."""
    settings = get_settings()
    started = c.started_at or now
    if started + timedelta(seconds=_hard_limit(c.queue)) < now:
        return "timeout", "The job ran past its time limit; you are not charged."
    beat = c.heartbeat_at or started
    if beat + timedelta(seconds=settings.job_lease_seconds) >= now:
        return None
    if c.attempts >= settings.job_max_attempts:
        return (
            "worker-lost",
            "The worker running this job stopped, too often; you are not charged.",
        )
    return "requeue"


class Every:
    """A periodic chore of the dispatcher loop (the loop is the platform's only clock)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.last = float("-inf")

    def due(self, now: float) -> bool:
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


def run_forever(stop: threading.Event | None = None) -> None:
    """The dispatcher process: dispatch on every wake-up (or poll); reconcile, sweep webhook
    deliveries and schedule billing chores periodically."""
    settings = get_settings()
    stop = stop or threading.Event()
    client = sync_redis()
    reconcile = Every(settings.reconcile_interval_seconds)
    usage_push = Every(settings.stripe_push_interval_seconds)
    billing_reconcile = Every(settings.billing_reconcile_interval_seconds)
    orphan_sweep = Every(settings.orphan_sweep_interval_seconds)
    retention_sweep = Every(settings.retention_sweep_interval_seconds)
    mail_sweep = Every(settings.smtp_sweep_interval_seconds)
    liveness_check = Every(settings.worker_liveness_check_seconds)
    log.info("dispatcher started (cap %s per organization)", settings.dispatch_org_inflight_cap)
    while not stop.is_set():
        try:
            client.blpop([events.DISPATCH_WAKE], timeout=settings.dispatch_poll_seconds)
            # A short batch took all that could go: asking again would find nothing (what
            # commits meanwhile sends a wake of its own).
            while dispatch_once() >= settings.dispatch_batch_size:
                pass
            now = time.monotonic()
            if liveness_check.due(now):
                recover_from_dead_workers()
            if reconcile.due(now):
                reconcile_once()
                webhook_enqueue.sweep_due_deliveries()
            if settings.stripe_api_key is not None and usage_push.due(now):
                # A push that waited longer than the interval is superseded by the next one.
                app.send_task("usage.push_to_stripe", expires=settings.stripe_push_interval_seconds)
            if settings.stripe_meter_id and billing_reconcile.due(now):
                app.send_task("billing.reconcile")
            if settings.mail_sender == "smtp" and mail_sweep.due(now):
                app.send_task("mail.deliver_outbox", expires=settings.smtp_sweep_interval_seconds)
            if orphan_sweep.due(now):
                app.send_task(
                    "maintenance.sweep_orphans", expires=settings.orphan_sweep_interval_seconds
                )
            if retention_sweep.due(now):
                app.send_task(
                    "maintenance.expire_outputs",
                    expires=settings.retention_sweep_interval_seconds,
                )
        except Exception:
            log.exception("dispatcher pass failed; retrying")
            stop.wait(1.0)
