"""Rules of the jobs API: submit (validate, store, enqueue), read, cancel. No HTTP here."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from hiddenmodel import storage
from hiddenmodel.db import after_commit, commit, rollback
from hiddenmodel.errors import Conflict, NotFound, Problem
from hiddenmodel.images import (
    ImageInfo,
    ImageRejected,
    configured_limits,
    content_type,
    inspect_image,
    sniff_format,
)
from hiddenmodel.jobs import events, lifecycle, repository
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.jobs.operations import CostEstimate, Operation, get_operation
from hiddenmodel.jobs.schemas import InputRead, JobError, JobRead, OutputRead, Timings
from hiddenmodel.settings import get_settings
from hiddenmodel.usage import service as usage_service
from tenants.auth import OrgScope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One named input file as received."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Submission:
    operation: str
    params: dict[str, Any]
    uploads: list[Upload]
    idempotency_key: str | None
    cancel_after_seconds: int | None
    dry_run: bool = False


@dataclass(frozen=True)
class Submitted:
    job: Job
    replayed: bool
    # Counted inside the submit transaction, so answering needs no second one.
    queue_position: int | None = None


@dataclass(frozen=True)
class Quote:
    """What a job would cost, computed by a dry run that stores and creates nothing."""

    operation: str
    operation_version: str
    gpu_seconds: float
    images: int
    amount: Decimal
    currency: str
    plan: str


# Job error codes that are not a refusal of the input, and the status each stands for.
_ERROR_STATUS = {
    "internal-error": 500,
    "operation-unavailable": 503,
    "input-missing": 410,
    "canceled": 409,
    "expired": 408,
}


def error_status(code: str) -> int:
    """The HTTP status equivalent of a job's error code: every refusal of the input is 422."""
    return _ERROR_STATUS.get(code, 422)


def _rejected(name: str, exc: ImageRejected) -> Problem:
    return Problem(
        f"{name}: {exc.detail}",
        status=exc.status,
        kind=exc.kind,
        title="Image rejected",
        input=name,
    )


def _request_hash(
    sub: Submission, op: Operation, params: dict[str, Any], digests: dict[str, bytes]
) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([op.name, params, sub.cancel_after_seconds], sort_keys=True).encode())
    for name in sorted(digests):
        digest.update(name.encode() + b"\0" + digests[name])
    return digest.hexdigest()


def _validate_uploads(op: Operation, uploads: list[Upload]) -> dict[str, ImageInfo]:
    allowed = {"image", *op.extra_inputs}
    infos: dict[str, ImageInfo] = {}
    limits = configured_limits()
    for upload in uploads:
        if upload.name not in allowed:
            raise Problem(
                f"Operation '{op.name}' takes no '{upload.name}' input.",
                status=422,
                kind="unexpected-input",
                title="Unexpected input",
            )
        try:
            infos[upload.name] = inspect_image(upload.data, limits)
        except ImageRejected as exc:
            raise _rejected(upload.name, exc) from exc
    if "image" not in infos:
        raise Problem("The 'image' file is required.", status=422, kind="missing-image")
    image = infos["image"]
    too_small = op.check_input_size(image.width, image.height)
    if too_small:
        raise Problem(
            too_small,
            status=422,
            kind="image-too-small",
            title="Image too small",
            input="image",
            min_input_side=op.min_input_side,
        )
    for name in ("mask", "body_mask"):
        mask = infos.get(name)
        if mask is not None and (mask.width, mask.height) != (image.width, image.height):
            raise Problem(
                f"The {name} is {mask.width}x{mask.height}; "
                f"the image is {image.width}x{image.height}.",
                status=422,
                kind="mask-size-mismatch",
                title="Mask size mismatch",
                input=name,
            )
    return infos


async def _replay(scope: OrgScope, key: str, request_hash: str) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if still remembered."""
    existing = await repository.get_by_idempotency_key(scope.session, key)
    if existing is None:
        return None
    ttl = timedelta(hours=get_settings().idempotency_ttl_hours)
    if existing.created_at < datetime.now(UTC) - ttl:
        await repository.clear_idempotency_key(scope.session, existing.id)
        return None
    if existing.request_hash != request_hash:
        raise Conflict(
            "This Idempotency-Key was used with a different request.",
            kind="idempotency-key-reused",
        )
    return existing


@dataclass(frozen=True)
class _Prepared:
    """A validated submission, ready to store: the job to insert and what it will cost."""

    job: Job
    estimate: CostEstimate
    input_bytes: int
    keys: list[str]


def _prepare(
    scope: OrgScope,
    sub: Submission,
    op: Operation,
    params_model: Any,
    params: dict[str, Any],
    *,
    job_id: uuid.UUID | None = None,
    digests: dict[str, bytes] | None = None,
) -> _Prepared:
    """Validate the uploads and build the job (CPU work: runs in a worker thread)."""
    infos = _validate_uploads(op, sub.uploads)
    estimate = op.estimate(params_model, infos["image"].width, infos["image"].height)
    if digests is None:
        digests = _digests(sub.uploads)
    job_id = job_id or uuid.uuid4()
    org_id = scope.org_id
    inputs: dict[str, Any] = {}
    keys: list[str] = []
    for upload in sub.uploads:
        info = infos[upload.name]
        key = storage.object_key(org_id, job_id, upload.name, info.format)
        inputs[upload.name] = {
            "key": key,
            "format": info.format,
            "width": info.width,
            "height": info.height,
            "bytes": len(upload.data),
            "content_type": content_type(info.format),
            # What was validated here: a worker reading these exact bytes back need not
            # walk them again (see images.decode_image).
            "sha256": digests[upload.name].hex(),
        }
        keys.append(key)
    job = Job(
        id=job_id,
        organization_id=org_id,
        api_key_id=scope.principal.api_key_id,
        user_id=scope.principal.member_id,
        operation=op.name,
        operation_version=op.version,
        queue=op.queue,
        params=params,
        status=JobStatus.QUEUED.value,
        progress=0.0,
        inputs=inputs,
        outputs=[],
        attempts=0,
        idempotency_key=None if sub.dry_run else sub.idempotency_key,
        request_hash=_request_hash(sub, op, params, digests),
        cancel_after=(
            datetime.now(UTC) + timedelta(seconds=sub.cancel_after_seconds)
            if sub.cancel_after_seconds
            else None
        ),
    )
    return _Prepared(job, estimate, sum(len(u.data) for u in sub.uploads), keys)


def _digests(uploads: list[Upload]) -> dict[str, bytes]:
    return {u.name: hashlib.sha256(u.data).digest() for u in uploads}


# Puts of inputs that run while the same inputs are validated (_prepare_and_store).
_input_puts = ThreadPoolExecutor(max_workers=8, thread_name_prefix="input-put")


def _prepare_and_store(
    scope: OrgScope, sub: Submission, op: Operation, params_model: Any, params: dict[str, Any]
) -> _Prepared:
    """:func:`_prepare` and :func:`_store` at once: an input whose content names an image
    format goes to S3 while it is validated (the PNG walk inflates every row; the put mostly
    waits on S3), instead of after. Once both have ended, a refused input's object, or every
    object if a put failed, is deleted, so a refusal still leaves nothing behind."""
    job_id = uuid.uuid4()
    digests = _digests(sub.uploads)
    puts: dict[str, Future[None]] = {}
    for upload in sub.uploads:
        fmt = sniff_format(upload.data)
        if fmt is None:
            continue  # not an image at all: the validation refuses it, no put needed
        key = storage.object_key(scope.org_id, job_id, upload.name, fmt)
        puts[key] = _input_puts.submit(
            storage.put_object,
            key,
            upload.data,
            content_type(fmt),
            org_id=scope.org_id,
            job_id=job_id,
            kind=upload.name,
            sha256=digests[upload.name],
        )
    try:
        ready = _prepare(scope, sub, op, params_model, params, job_id=job_id, digests=digests)
        if set(ready.keys) != set(puts):  # the validation's formats are the sniffed ones
            raise RuntimeError(f"inputs stored as {sorted(puts)}, validated as {ready.keys}")
        for put in puts.values():
            put.result()
    except BaseException:
        wait(puts.values())
        try:
            storage.delete_objects(list(puts))
        except Exception:
            # The refusal still answers as such; the orphan sweep takes what stayed.
            log.warning("job %s: its inputs were not deleted", job_id, exc_info=True)
        raise
    return ready


def _store(prepared: _Prepared, uploads: list[Upload]) -> None:
    """Put every input in S3 (blocking: runs in a worker thread); on failure delete what
    was put, so nothing is left behind."""
    job = prepared.job
    try:
        for upload in uploads:
            meta = job.inputs[upload.name]
            storage.put_object(
                meta["key"],
                upload.data,
                meta["content_type"],
                org_id=job.organization_id,
                job_id=job.id,
                kind=upload.name,
                sha256=bytes.fromhex(meta["sha256"]),
            )
    except BaseException:
        storage.delete_objects(prepared.keys)
        raise


async def submit(scope: OrgScope, sub: Submission) -> Submitted | Quote:
    """Validate, store inputs in S3, then admit the job in one statement and commit.

    The caller owns the session; this commits it itself because the job must be durable
    before anything waits on it. Anything rejected leaves no object and no row.
    """
    op = get_operation(sub.operation)
    params_model = op.validate_params(sub.params)
    params = params_model.model_dump(mode="json")
    if sub.dry_run:
        prepared = await run_in_threadpool(_prepare, scope, sub, op, params_model, params)
        return await _quote(scope, op, prepared)
    # Inputs first, then the job: a job never points at an object that is not there, and a
    # refused or failed admission deletes what was stored.
    if sub.idempotency_key:
        prepared = await run_in_threadpool(_prepare, scope, sub, op, params_model, params)
        replay = await _replay(scope, sub.idempotency_key, prepared.job.request_hash)
        if replay is not None:
            return Submitted(replay, replayed=True)
        await run_in_threadpool(_store, prepared, sub.uploads)
    else:
        prepared = await run_in_threadpool(_prepare_and_store, scope, sub, op, params_model, params)
    job = prepared.job
    try:
        admitted = await usage_service.admit(
            scope.session,
            job,
            gpu_seconds=prepared.estimate.gpu_seconds,
            images=prepared.estimate.images,
            input_bytes=prepared.input_bytes,
        )
        job.created_at = admitted.created_at
        after_commit(scope.session, events.wake_dispatcher)
        await commit(scope.session)
    except IntegrityError:
        await rollback(scope.session)
        await run_in_threadpool(storage.delete_objects, prepared.keys)
        # A concurrent request with the same Idempotency-Key won the insert.
        if sub.idempotency_key:
            replay = await _replay(scope, sub.idempotency_key, job.request_hash)
            if replay is not None:
                return Submitted(replay, replayed=True)
        raise
    except BaseException:
        # The database may be what failed: the rollback can fail too, and the inputs must
        # go all the same.
        try:
            await rollback(scope.session)
        finally:
            await run_in_threadpool(storage.delete_objects, prepared.keys)
        raise
    return Submitted(job, replayed=False, queue_position=admitted.queue_position)


async def _quote(scope: OrgScope, op: Operation, prepared: _Prepared) -> Quote:
    """Price the job: the real admission, in a savepoint that is always rolled back, so a
    quote says exactly what a submit would (including a refusal) and leaves nothing."""
    estimate = prepared.estimate
    savepoint = await scope.session.begin_nested()
    try:
        admitted = await usage_service.admit(
            scope.session,
            prepared.job,
            gpu_seconds=estimate.gpu_seconds,
            images=estimate.images,
            input_bytes=prepared.input_bytes,
        )
    finally:
        await savepoint.rollback()
    return Quote(
        operation=op.name,
        operation_version=op.version,
        gpu_seconds=estimate.gpu_seconds,
        images=estimate.images,
        amount=(Decimal(str(estimate.gpu_seconds)) * admitted.price_per_gpu_second).quantize(
            Decimal("0.000001")
        ),
        currency=admitted.currency,
        plan=admitted.plan_code,
    )


async def get(scope: OrgScope, job_id: uuid.UUID) -> Job:
    job = await repository.get_job(scope.session, job_id)
    if job is None:
        raise NotFound("No such job.", kind="job-not-found")
    return job


async def cancel(scope: OrgScope, job_id: uuid.UUID) -> Job:
    """Queued: canceled at once. Running: stops at the next step. Finished: 409."""
    job = await get(scope, job_id)
    now = datetime.now(UTC)
    if job.status == JobStatus.QUEUED.value and await repository.cancel_queued(
        scope.session, job_id, now
    ):
        await lifecycle.record_end(scope.session, job_id, JobStatus.CANCELED)
    elif job.status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        # It started meanwhile, or is running: ask the worker to stop.
        if await repository.request_cancel_running(scope.session, job_id):

            async def _flag() -> None:
                await events.request_cancel(job_id)

            after_commit(scope.session, _flag)
    else:
        raise Conflict(
            f"The job has already {job.status}.", kind="job-not-cancelable", status_now=job.status
        )
    await scope.session.flush()
    return await get(scope, job_id)


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 4) if a and b else None


async def view(scope: OrgScope, job: Job, queue_position: int | None = None) -> JobRead:
    """The job resource, with presigned output URLs (issued after this RLS-scoped read); a
    queued job's position is read unless given."""
    if job.status == JobStatus.QUEUED.value and queue_position is None:
        queue_position = (await repository.queue_positions(scope.session, [job])).get(job.id, 0)
    return render(job, queue_position)


def render(job: Job, queue_position: int | None) -> JobRead:
    """The job resource from a job read in its organization, with presigned output URLs; the
    queue position counts only while the job is queued."""
    position = (queue_position or 0) if job.status == JobStatus.QUEUED.value else None
    ttl = get_settings().presigned_url_ttl_seconds
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    outputs = [
        OutputRead(
            name=o["name"],
            format=o["format"],
            content_type=o["content_type"],
            width=o["width"],
            height=o["height"],
            bytes=o["bytes"],
            url=None
            if job.expired_at
            else storage.presigned_get_url(
                o["key"], job.organization_id, filename=f"{job.id}-{o['name']}.{o['format']}"
            ),
            url_expires_at=None if job.expired_at else expires,
        )
        for o in job.outputs
    ]
    return JobRead(
        id=job.id,
        operation=job.operation,
        operation_version=job.operation_version,
        status=JobStatus(job.status),
        stage=job.stage,
        progress=job.progress,
        queue_position=position,
        params=job.params,
        inputs={
            name: InputRead(
                format=i["format"], width=i["width"], height=i["height"], bytes=i["bytes"]
            )
            for name, i in job.inputs.items()
        },
        outputs=outputs,
        report=job.report,
        error=JobError(
            code=job.error_code,
            message=job.error_message or "",
            status=error_status(job.error_code),
        )
        if job.error_code
        else None,
        gpu_seconds=job.gpu_seconds,
        attempts=job.attempts,
        cancel_after=job.cancel_after,
        timings=Timings(
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            queued_seconds=_seconds(job.created_at, job.started_at),
            run_seconds=_seconds(job.started_at, job.finished_at),
            compute_seconds=job.compute_seconds,
        ),
        batch_id=job.batch_id,
        created_at=job.created_at,
        expired_at=job.expired_at,
    )
