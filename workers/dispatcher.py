"""The dispatcher and the reconciler: from outbox to queue, fairly; and nothing lost.

* Dispatch: claims outbox rows round robin across organizations with an in-flight cap per
  organization (``hm_claim_dispatch``), commits, then sends one Celery message per job. It
  wakes on a Redis list pushed after each submit and finish, and polls as a fallback.
* Reconcile: expires queued jobs past ``cancel_after``; re-dispatches queued jobs whose message
  is in no queue (Redis flushed or restarted, or a crash between commit and send); returns
  running jobs whose worker stopped heartbeating to the queue; fails jobs past their hard
  limit. Every change is a compare-and-set inside the job's own tenant context.

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
from hiddenmodel.webhooks import delivery as webhook_delivery
from workers.celery_app import QUEUES, app

log = logging.getLogger(__name__)

KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_UNACKED = "unacked"


def task_id(job_id: uuid.UUID, dispatch_count: int) -> str:
    return f"{job_id}.{dispatch_count}"


def dispatch_once() -> int:
    """Release what the fairness rules allow now; returns how many jobs were sent."""
    settings = get_settings()
    with global_session() as session:
        claimed = repository.claim_dispatch_sync(
            session, settings.dispatch_org_inflight_cap, settings.dispatch_batch_size
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


def task_ids_in_broker() -> set[str]:
    """Ids of every job message Redis still holds: waiting in a queue or delivered unacked."""
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
    for raw in client.hvals(KOMBU_UNACKED):
        if (found := _message_ids(raw)) is not None:
            ids.add(found)
    return ids


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
    in_broker: set[str] | None = None
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
                    if in_broker is None:
                        in_broker = task_ids_in_broker()
                    lost = task_id(c.job_id, c.dispatch_count) not in in_broker
                    if lost and repository.redispatch_sync(s, c.job_id, c.dispatch_count):
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
    log.info("dispatcher started (cap %s per organization)", settings.dispatch_org_inflight_cap)
    while not stop.is_set():
        try:
            client.blpop([events.DISPATCH_WAKE], timeout=settings.dispatch_poll_seconds)
            # A short batch took all that could go: asking again would find nothing (what
            # commits meanwhile sends a wake of its own).
            while dispatch_once() >= settings.dispatch_batch_size:
                pass
            now = time.monotonic()
            if reconcile.due(now):
                reconcile_once()
                webhook_delivery.sweep_due_deliveries()
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
