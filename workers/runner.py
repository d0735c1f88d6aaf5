"""Running one job: claim it, read inputs, execute, write outputs, finish — exactly once.

The job's row is the lock: ``queued → running`` is a compare-and-set that one delivery wins,
and every later write names the attempt that owns the job, so a worker that lost its lease
can no longer change anything.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from PIL import Image
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from hiddenmodel import logs, metrics, storage
from hiddenmodel.db import tenant_session
from hiddenmodel.images import (
    ImageRejected,
    PlainPng,
    configured_limits,
    content_type,
    decode_image,
    decode_image_or_plain_png,
    encode_image,
)
from hiddenmodel.jobs import events, lifecycle, repository
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.redis import sync_redis
from hiddenmodel.settings import get_settings
from hiddenmodel.tenancy import org_context
from workers.executors import (
    EXECUTORS,
    TAKES_PLAIN_PNG,
    Execution,
    ExecutionResult,
    GpuMeter,
    OperationFailed,
)
from workers.pipelines.contracts import JobCancelled

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.1
RUNNING = JobStatus.RUNNING.value
# How often a running job asks Redis whether it was canceled: at its first step, at the
# first step after each interval (a resize reports four steps in about 50 ms), and always
# before its outputs are stored: a cancel that comes before then stops the job unbilled.
CANCEL_CHECK_INTERVAL_S = 0.1
FINISH_TRIES = 3
# deadlock_detected, serialization_failure
RETRYABLE_SQLSTATES = {"40P01", "40001"}


class TransientError(Exception):
    """Worth another attempt (storage or database briefly unavailable).

    ``attempt`` is the attempt that owned the job when it happened; None before the claim.
    """

    attempt: int | None = None


@dataclass
class Ownership:
    """Shared between the job thread and its heartbeat: does this attempt still own it?"""

    lost: bool = False


class ProgressReporter:
    """Throttled progress to pub/sub and the database; the cancel check rides along."""

    def __init__(
        self, org_id: uuid.UUID, job_id: uuid.UUID, attempt: int, ownership: Ownership
    ) -> None:
        self.org_id, self.job_id, self.attempt, self.ownership = org_id, job_id, attempt, ownership
        self._last_publish = 0.0
        self._last_cancel_check = float("-inf")
        # The claim has just written the job's heartbeat: the first progress row can wait.
        self._last_db = time.monotonic()
        self._db_interval = get_settings().progress_db_interval_seconds

    def begin(self, stage: str) -> None:
        """The job's first step: its running state, the cancel check and the step's progress
        event in one round trip; :class:`JobCancelled` as for any step, and
        :class:`TransientError` when Redis cannot be reached (nothing has been done yet)."""
        if self.ownership.lost:
            raise JobCancelled()
        self._last_cancel_check = self._last_publish = time.monotonic()
        pipe = sync_redis().pipeline(transaction=False)
        events.queue_publish(pipe, self.job_id, {"type": "status", "status": RUNNING})
        pipe.exists(events.cancel_key(self.job_id))
        events.queue_publish(
            pipe, self.job_id, {"type": "progress", "stage": stage, "progress": 0.0}
        )
        try:
            canceled = pipe.execute()[1]
        except redis.RedisError as exc:
            raise TransientError(f"announcing the run: {exc}") from exc
        if canceled:
            raise JobCancelled()

    def __call__(self, stage: str, fraction: float, *, check_cancel: bool = False) -> None:
        """Report a step; :class:`JobCancelled` when the job must stop here (asked of Redis
        at most every :data:`CANCEL_CHECK_INTERVAL_S`, or now with ``check_cancel``)."""
        now = time.monotonic()
        if self.ownership.lost:
            raise JobCancelled()
        if check_cancel or now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL_S:
            self._last_cancel_check = now
            if events.cancel_requested(self.job_id):
                raise JobCancelled()
        fraction = max(0.0, min(1.0, fraction))
        if now - self._last_publish >= PUBLISH_INTERVAL_S:
            self._last_publish = now
            events.publish(
                self.job_id, {"type": "progress", "stage": stage, "progress": round(fraction, 4)}
            )
        if now - self._last_db >= self._db_interval:
            self._last_db = now
            try:
                with tenant_session(self.org_id) as session:
                    if not repository.heartbeat_sync(
                        session, self.job_id, self.attempt, stage=stage, progress=fraction
                    ):
                        self.ownership.lost = True
            except DBAPIError as exc:
                # Progress can wait for the database; the heartbeat thread keeps trying.
                log.warning("job %s: progress not recorded: %s", self.job_id, exc.orig or exc)


class Heartbeat(threading.Thread):
    """Keeps the lease fresh while a long step runs without reporting progress."""

    def __init__(
        self, org_id: uuid.UUID, job_id: uuid.UUID, attempt: int, ownership: Ownership
    ) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.org_id, self.job_id, self.attempt, self.ownership = org_id, job_id, attempt, ownership
        self.stop = threading.Event()
        self.interval = max(0.2, get_settings().job_lease_seconds / 4)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                with org_context(self.org_id), tenant_session(self.org_id) as session:
                    if not repository.heartbeat_sync(session, self.job_id, self.attempt):
                        self.ownership.lost = True
                        return
            except Exception:
                log.warning("heartbeat failed for job %s", self.job_id, exc_info=True)


def _load_inputs(job: Job) -> tuple[dict[str, Image.Image], dict[str, PlainPng]]:
    """The job's inputs, decoded; for an operation of TAKES_PLAIN_PNG, a plain PNG is
    checked as fully but left undecoded (the second mapping)."""
    images: dict[str, Image.Image] = {}
    plain: dict[str, PlainPng] = {}
    takes_plain = job.operation in TAKES_PLAIN_PNG
    for name, meta in job.inputs.items():
        try:
            data = storage.get_object(meta["key"])
        except Exception as exc:
            if storage.is_missing(exc):
                # Stored before the job was committed, so it was deleted since (a development
                # S3 that keeps nothing across a restart, a bucket emptied by hand): no other
                # attempt would find it.
                raise OperationFailed(
                    "input-missing",
                    f"The job's input '{name}' is no longer stored; submit the job again.",
                ) from exc
            raise TransientError(f"reading input {name}: {exc}") from exc
        decode = decode_image_or_plain_png if takes_plain else decode_image
        loaded = decode(data, configured_limits(), validated_sha256=meta.get("sha256"))
        if isinstance(loaded, PlainPng):
            plain[name] = loaded
        else:
            images[name] = loaded
    return images, plain


def _store_outputs(job: Job, result: ExecutionResult) -> list[dict[str, Any]]:
    stored = []
    for output in result.outputs:
        data = encode_image(
            output.image, output.format, output.quality, png_compression=output.png_compression
        )
        key = storage.object_key(job.organization_id, job.id, output.name, output.format)
        kind = "output" if output.name == "output" else output.name
        try:
            storage.put_object(
                key,
                data,
                content_type(output.format),
                org_id=job.organization_id,
                job_id=job.id,
                kind=kind,
            )
        except Exception as exc:
            raise TransientError(f"writing output {output.name}: {exc}") from exc
        stored.append(
            {
                "name": output.name,
                "key": key,
                "format": output.format,
                "content_type": content_type(output.format),
                "width": output.image.width,
                "height": output.image.height,
                "bytes": len(data),
            }
        )
    return stored


def _claim(org_id: uuid.UUID, job_id: uuid.UUID, worker: str) -> Job | None:
    """Win the job (queued → running), or expire it if its deadline passed first."""
    # The usual case in one statement that is its own transaction; only a job that is not
    # simply queued and clear to run takes the second look, in a session, that says why.
    job = repository.start_if_clear_sync(org_id, job_id, worker)
    if job is not None:
        log.info("job %s: started, attempt %s, on %s", job_id, job.attempts, worker)
        return job
    ended: list[lifecycle.Ended] = []
    with tenant_session(org_id) as session:
        check = repository.start_check_sync(session, job_id)
        if check is None or check.status != JobStatus.QUEUED.value:
            log.info(
                "job %s: not started here, it is %s", job_id, check.status if check else "gone"
            )
            return None
        if check.suspended:
            # Suspended after the dispatch: back to the outbox, where the dispatcher leaves a
            # suspended organization's jobs until it is restored. Nothing ran, nothing billed.
            held = repository.redispatch_sync(session, job_id, None)
            log.info(
                "job %s: its organization is suspended, %s",
                job_id,
                "back in the outbox" if held else "left as it is",
            )
            return None
        if check.past_deadline and repository.expire_sync(session, job_id):
            ended.append(lifecycle.record_end_sync(session, org_id, job_id, JobStatus.EXPIRED))
        else:
            job = repository.start_sync(session, job_id, worker)
    lifecycle.announce(ended)
    if ended:
        log.info("job %s: expired before it could start", job_id)
    elif job is None:
        log.info("job %s: not started here, another delivery won it", job_id)
    else:
        log.info("job %s: started, attempt %s, on %s", job_id, job.attempts, worker)
    return job


# What a success sets besides its state: the values the one-statement end takes.
_SUCCESS_VALUES = frozenset({"outputs", "report", "progress", "compute_seconds", "gpu_seconds"})


def _finish(
    job: Job, status: JobStatus, metered: lifecycle.Metered | None = None, **values: Any
) -> bool:
    """Finish as the owning attempt, with its usage and webhooks, in one transaction.

    A deadlock or serialization failure rolls the whole transaction back, so it is simply
    tried again; anything else the database says makes the attempt transient (the job is
    returned to the queue, never failed for our database's sake).
    """
    ended: list[lifecycle.Ended] = []
    for attempt in range(1, FINISH_TRIES + 1):
        try:
            ended = _end(job, status, metered, values)
            break
        except DBAPIError as exc:
            retryable = getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
            if retryable and attempt < FINISH_TRIES:
                time.sleep(0.05 * attempt)
                continue
            raise TransientError(f"finishing job {job.id}: {exc}") from exc
    lifecycle.announce(ended)
    if not ended:
        log.warning("job %s attempt %s lost ownership before finishing", job.id, job.attempts)
    else:
        _measure(job, status, metered)
    return bool(ended)


def _end(
    job: Job, status: JobStatus, metered: lifecycle.Metered | None, values: dict[str, Any]
) -> list[lifecycle.Ended]:
    """One try at the end's transaction: the ended job, or none when this attempt lost it.
    A success goes in one statement unless webhooks are subscribed to it."""
    if status is JobStatus.SUCCEEDED and metered is not None and values.keys() == _SUCCESS_VALUES:
        ended = lifecycle.succeed_in_one_statement_sync(
            job.organization_id, job.id, job.attempts, metered, batch_id=job.batch_id, **values
        )
        if ended is not None:
            return ended
    with tenant_session(job.organization_id) as session:
        if repository.finish_sync(session, job.id, job.attempts, status, **values):
            return [
                lifecycle.record_end_sync(
                    session,
                    job.organization_id,
                    job.id,
                    status,
                    metered,
                    batch_id=job.batch_id,
                )
            ]
    return []


def _measure(job: Job, status: JobStatus, metered: lifecycle.Metered | None) -> None:
    """The finished job in the platform's metrics (hiddenmodel.metrics)."""
    now = datetime.now(UTC)
    started = job.started_at or now
    metrics.record_job_end(
        job.operation,
        job.queue,
        status.value,
        wait_s=(started - job.created_at).total_seconds(),
        run_s=(now - started).total_seconds(),
        gpu_s=metered.gpu_seconds if metered else 0.0,
    )


def run_job(org_id: uuid.UUID, job_id: uuid.UUID, worker: str) -> str:
    """Run a job if this delivery wins it. Returns what happened, for logs and tests."""
    with org_context(org_id), logs.job_context(job_id):
        try:
            job = _claim(org_id, job_id, worker)
        except (OperationalError, InterfaceError) as exc:
            raise TransientError(f"claiming the job: {exc.orig or exc}") from exc
        if job is None:
            return "skipped"
        ownership = Ownership()
        heartbeat = Heartbeat(org_id, job_id, job.attempts, ownership)
        heartbeat.start()
        started = time.perf_counter()
        try:
            return _execute(job, ownership, started)
        except TransientError as exc:
            exc.attempt = job.attempts
            raise
        finally:
            heartbeat.stop.set()
            heartbeat.join(timeout=5)


def _execute(job: Job, ownership: Ownership, started: float) -> str:
    progress = ProgressReporter(job.organization_id, job.id, job.attempts, ownership)
    executor = EXECUTORS.get(job.operation)
    meter = GpuMeter()
    try:
        progress.begin("reading")  # publishes the running state
        if executor is None:
            raise OperationFailed(
                "operation-unavailable", f"This worker cannot run '{job.operation}'."
            )
        images, plain_pngs = _load_inputs(job)
        result = executor(
            Execution(
                params=job.params,
                images=images,
                progress=progress,
                meter=meter,
                plain_pngs=plain_pngs,
            )
        )
        progress("storing", 0.95, check_cancel=True)
        outputs = _store_outputs(job, result)
        gpu_seconds = round(result.gpu_seconds or meter.seconds, 4)
        main = outputs[0]
        done = _finish(
            job,
            JobStatus.SUCCEEDED,
            lifecycle.Metered(
                gpu_seconds=gpu_seconds,
                images=1,
                megapixels=round(main["width"] * main["height"] / 1e6, 4),
                output_bytes=sum(o["bytes"] for o in outputs),
            ),
            outputs=outputs,
            report=result.report,
            progress=1.0,
            compute_seconds=round(time.perf_counter() - started, 4),
            gpu_seconds=gpu_seconds,
        )
        if done:
            log.info(
                "job %s: succeeded, attempt %s, %.2f s",
                job.id,
                job.attempts,
                time.perf_counter() - started,
            )
            return "succeeded"
        return _lost(job)
    except JobCancelled:
        if ownership.lost:
            return _lost(job)
        used = round(meter.seconds, 4)
        _finish(
            job,
            JobStatus.CANCELED,
            lifecycle.Metered(gpu_seconds=used),
            error_code="canceled",
            error_message="Canceled while running.",
            compute_seconds=round(time.perf_counter() - started, 4),
            gpu_seconds=used,
        )
        log.info("job %s: canceled while running, attempt %s", job.id, job.attempts)
        return "canceled"
    except (OperationFailed, ImageRejected) as exc:
        code = exc.code if isinstance(exc, OperationFailed) else exc.kind
        message = exc.message if isinstance(exc, OperationFailed) else exc.detail
        if not _finish(job, JobStatus.FAILED, error_code=code, error_message=message):
            return _lost(job)
        log.info("job %s: failed (%s), attempt %s: %s", job.id, code, job.attempts, message)
        return "failed"
    except TransientError:
        raise
    except (OperationalError, InterfaceError) as exc:
        # The database went away mid-job: not the job's fault, so another attempt.
        raise TransientError(f"database unavailable: {exc.orig or exc}") from exc
    except Exception:
        log.exception("job %s: failed (internal-error), attempt %s", job.id, job.attempts)
        _finish(
            job,
            JobStatus.FAILED,
            error_code="internal-error",
            error_message="The operation failed on our side; you are not charged.",
        )
        return "failed"


def _lost(job: Job) -> str:
    log.warning(
        "job %s: attempt %s no longer owns the job (its worker was presumed gone); "
        "its result is dropped",
        job.id,
        job.attempts,
    )
    return "lost"


def requeue_after_transient(org_id: uuid.UUID, job_id: uuid.UUID, attempt: int | None) -> str:
    """After a transient error of ``attempt`` (None: before the claim), decide the job's fate.

    Returns ``"requeued"`` (running → queued: the caller delivers the same message again
    later), ``"queued"`` (never claimed: deliver it again as it is), ``"failed"`` (its attempts
    are used up), ``"lost"`` (another attempt owns it now) or the status it already has.
    Database errors propagate: then nothing can be decided and the caller delivers again.
    """
    ended: list[lifecycle.Ended] = []
    with org_context(org_id), tenant_session(org_id) as session:
        job = repository.get_job_sync(session, job_id)
        if job is None:
            return "gone"
        if job.status == JobStatus.QUEUED.value:
            # Never claimed: ours to deliver again; claimed and since requeued: not ours.
            return "queued" if attempt is None else "lost"
        if job.status != JobStatus.RUNNING.value:
            return job.status
        if attempt is not None and job.attempts != attempt:
            return "lost"
        if job.attempts < get_settings().job_max_attempts:
            requeued = repository.requeue_running_sync(
                session, job_id, job.attempts, redeliver=True
            )
            return "requeued" if requeued else "lost"
        if repository.fail_running_sync(
            session,
            job_id,
            job.attempts,
            "transient-errors",
            "Storage or database errors persisted across attempts.",
        ):
            ended.append(lifecycle.record_end_sync(session, org_id, job_id, JobStatus.FAILED))
    lifecycle.announce(ended)
    return "failed" if ended else "lost"
