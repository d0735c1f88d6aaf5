"""Rules of batches: create, add items, submit all at once under the quota, read, cancel.

No HTTP here. Like a job submit, adding items and submitting commit themselves: objects
stored in S3 and rows must agree before the answer, and a failure deletes what was stored.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import IO

from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from hiddenmodel import storage
from hiddenmodel.batches import archive, completion, intake, repository
from hiddenmodel.batches.models import Batch, BatchItem, BatchStatus
from hiddenmodel.batches.schemas import BatchCounts, BatchCreate, BatchItemRead, BatchRead, Eta
from hiddenmodel.batches.zipintake import ArchiveRefused, ZipLimits, ZipSource
from hiddenmodel.db import after_commit, commit, rollback
from hiddenmodel.errors import Conflict, NotFound, Problem
from hiddenmodel.jobs import events, lifecycle
from hiddenmodel.jobs import repository as jobs_repository
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.jobs.operations import get_operation
from hiddenmodel.jobs.schemas import JobError
from hiddenmodel.jobs.service import error_status
from hiddenmodel.settings import get_settings
from hiddenmodel.usage import service as usage_service
from tenants.auth import OrgScope


def refused(exc: ArchiveRefused) -> Problem:
    return Problem(
        exc.detail,
        status=exc.status,
        kind=exc.kind,
        title="Upload refused",
        entry=exc.entry,
    )


def upload_source(
    files: list[tuple[str, IO[bytes]]], archive_file: IO[bytes] | None, manifest: IO[bytes] | None
) -> intake.Source:
    """What one upload holds: many files (with an optional manifest) or one ZIP, never both.
    Raises :class:`ArchiveRefused` or a 422 :class:`Problem` before anything is read."""
    settings = get_settings()
    if archive_file is not None and not files and manifest is None:
        return ZipSource(
            archive_file,
            ZipLimits(
                max_entries=settings.zip_max_entries,
                max_total_bytes=settings.zip_max_total_bytes,
                max_member_bytes=settings.max_upload_bytes,
                max_ratio=settings.zip_max_ratio,
            ),
        )
    if files and archive_file is None:
        for name, _ in files:
            if not name:
                raise ArchiveRefused(
                    "archive-unsafe-name", "Every file needs a file name.", entry=None
                )
        return intake.FilesSource(files, manifest, settings.max_upload_bytes)
    raise Problem(
        "Send either `files` (with an optional `manifest`) or one `archive`.",
        status=422,
        kind="batch-upload-invalid",
        title="Invalid upload",
    )


async def create(scope: OrgScope, data: BatchCreate) -> Batch:
    op = get_operation(data.operation)
    params = op.validate_params(data.params).model_dump(mode="json", exclude_unset=True)
    batch = Batch(
        id=uuid.uuid4(),
        organization_id=scope.org_id,
        api_key_id=scope.principal.api_key_id,
        user_id=scope.principal.member_id,
        name=data.name,
        webhook_tag=data.webhook_tag,
        operation=op.name,
        params=params,
        status=BatchStatus.OPEN.value,
        item_count=0,
        cancel_requested=False,
    )
    scope.session.add(batch)
    await scope.session.flush()
    await scope.session.refresh(batch)
    return batch


async def get(scope: OrgScope, batch_id: uuid.UUID, *, lock: bool = False) -> Batch:
    batch = await repository.get_batch(scope.session, batch_id, lock=lock)
    if batch is None:
        raise NotFound("No such batch.", kind="batch-not-found")
    return batch


def _require_open(batch: Batch) -> None:
    if batch.status != BatchStatus.OPEN.value:
        raise Conflict(
            f"The batch is {batch.status}; items are added and it is submitted only while "
            "it is open.",
            kind="batch-not-open",
            status_now=batch.status,
        )


@dataclass(frozen=True)
class Added:
    added: int
    rejected: int


async def add_items(scope: OrgScope, batch_id: uuid.UUID, source: intake.Source) -> Added:
    """Plan, check, store and record the items of one upload, or refuse it whole with
    nothing stored."""
    batch = await get(scope, batch_id)
    _require_open(batch)
    op = get_operation(batch.operation)
    existing = await repository.item_names(scope.session, batch_id)
    base_params = dict(batch.params)
    # The upload is read and stored outside any transaction: what the request wrote so far
    # (the key's last use) is committed and no row stays locked meanwhile.
    await commit(scope.session)
    try:
        planned = await run_in_threadpool(intake.plan, source, op)
    except ArchiveRefused as exc:
        raise refused(exc) from exc
    if not planned:
        raise Problem(
            "The upload holds no photos.", status=422, kind="batch-upload-empty", title="Empty"
        )
    limit = get_settings().batch_max_items
    if len(existing) + len(planned) > limit:
        raise Problem(
            f"A batch holds at most {limit} items; it has {len(existing)} and the upload "
            f"adds {len(planned)}.",
            status=413,
            kind="batch-too-many-items",
            title="Too many items",
            limit=limit,
        )
    for item in planned:
        if item.name in existing:
            raise Problem(
                f"{item.name}: the batch already has an item of that name.",
                status=409,
                kind="batch-item-exists",
                title="Item exists",
                entry=item.name,
            )
    models = intake.validate_params(op, base_params, planned)
    try:
        taken = await run_in_threadpool(
            intake.take, source, op, planned, models, org_id=scope.org_id, batch_id=batch_id
        )
    except ArchiveRefused as exc:
        raise refused(exc) from exc
    try:
        batch = await get(scope, batch_id, lock=True)
        _require_open(batch)
        position = await repository.next_position(scope.session, batch_id)
        for offset, new in enumerate(taken.items):
            scope.session.add(
                BatchItem(
                    id=new.id,
                    organization_id=scope.org_id,
                    batch_id=batch_id,
                    position=position + offset,
                    name=new.name,
                    params=new.params,
                    inputs=new.inputs,
                    job_id=new.job_id,
                    gpu_seconds_estimate=new.gpu_seconds,
                    images_estimate=new.images,
                    error_code=new.error_code,
                    error_message=new.error_message,
                )
            )
        batch.item_count = position + len(taken.items)
        await commit(scope.session)
    except IntegrityError as exc:
        await rollback(scope.session)
        await run_in_threadpool(storage.delete_objects, taken.keys)
        raise Conflict(
            "Another upload added items of the same names meanwhile.", kind="batch-item-exists"
        ) from exc
    except BaseException:
        await rollback(scope.session)
        await run_in_threadpool(storage.delete_objects, taken.keys)
        raise
    rejected = sum(1 for i in taken.items if i.error_code is not None)
    return Added(added=len(taken.items), rejected=rejected)


async def create_with_items(scope: OrgScope, data: BatchCreate, source: intake.Source) -> Batch:
    """A batch and its first upload together, or neither: when the upload is refused the
    batch is deleted again, so a form posted with a bad file leaves nothing behind."""
    batch = await create(scope, data)
    try:
        await add_items(scope, batch.id, source)
    except BaseException:
        await rollback(scope.session)
        await repository.delete_batch(scope.session, batch.id)
        await commit(scope.session)
        raise
    return await get(scope, batch.id)


@dataclass(frozen=True)
class Quote:
    operation: str
    items: int
    gpu_seconds: float
    images: int
    amount: Decimal
    currency: str
    plan: str


def _request_hash(item: BatchItem) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(["batch", str(item.batch_id), item.params], sort_keys=True).encode())
    for name in sorted(item.inputs):
        digest.update(name.encode() + b"\0" + item.inputs[name]["sha256"].encode())
    return digest.hexdigest()


def _demands(scope: OrgScope, batch: Batch, items: list[BatchItem]) -> list[usage_service.Demand]:
    op = get_operation(batch.operation)
    demands = []
    for item in items:
        job = Job(
            id=item.job_id,
            organization_id=scope.org_id,
            api_key_id=scope.principal.api_key_id,
            user_id=scope.principal.member_id,
            operation=op.name,
            operation_version=op.version,
            queue=op.queue,
            params=item.params,
            inputs=item.inputs,
            idempotency_key=None,
            request_hash=_request_hash(item),
            cancel_after=None,
        )
        demands.append(
            usage_service.Demand(
                job=job,
                gpu_seconds=item.gpu_seconds_estimate,
                images=item.images_estimate,
                input_bytes=sum(int(i["bytes"]) for i in item.inputs.values()),
            )
        )
    return demands


async def submit(scope: OrgScope, batch_id: uuid.UUID, *, dry_run: bool = False) -> Batch | Quote:
    """Admit every ready item as a job, in one transaction, or none: a batch that does not
    fit is refused whole (429 or 402 with the batch's numbers). A dry run prices it through
    the same admission, rolled back."""
    batch = await get(scope, batch_id, lock=not dry_run)
    _require_open(batch)
    items = [i for i in await repository.items(scope.session, batch_id) if i.error_code is None]
    if not items:
        raise Problem(
            "The batch has no item to submit (none added, or every one rejected).",
            status=422,
            kind="batch-empty",
            title="Empty batch",
        )
    demands = _demands(scope, batch, items)
    if dry_run:
        savepoint = await scope.session.begin_nested()
        try:
            admitted = await usage_service.admit_all(scope.session, demands)
        finally:
            await savepoint.rollback()
        gpu = sum(d.gpu_seconds for d in demands)
        first = admitted[0]
        return Quote(
            operation=batch.operation,
            items=len(demands),
            gpu_seconds=gpu,
            images=sum(d.images for d in demands),
            amount=(Decimal(str(gpu)) * first.price_per_gpu_second).quantize(Decimal("0.000001")),
            currency=first.currency,
            plan=first.plan_code,
        )
    try:
        await usage_service.admit_all(scope.session, demands)
        await repository.mark_submitted(scope.session, batch_id, [d.job.id for d in demands])
        after_commit(scope.session, events.wake_dispatcher)
        await commit(scope.session)
    except BaseException:
        await rollback(scope.session)
        raise
    return await get(scope, batch_id)


async def cancel(scope: OrgScope, batch_id: uuid.UUID) -> Batch:
    """Open: canceled at once, its stored photos deleted. Submitted: queued items are
    canceled at once, running ones stop at their next step; the batch ends with its last."""
    batch = await get(scope, batch_id, lock=True)
    if BatchStatus(batch.status).ended:
        raise Conflict(
            f"The batch has already {batch.status}.",
            kind="batch-not-cancelable",
            status_now=batch.status,
        )
    if batch.status == BatchStatus.OPEN.value:
        keys = [
            meta["key"]
            for item in await repository.items(scope.session, batch_id)
            for meta in item.inputs.values()
        ]
        batch.status = BatchStatus.CANCELED.value
        batch.cancel_requested = True
        batch.finished_at = datetime.now(UTC)

        async def _delete() -> None:
            await run_in_threadpool(storage.delete_objects, keys)

        after_commit(scope.session, _delete)
        await commit(scope.session)
        return await get(scope, batch_id)
    batch.cancel_requested = True
    # Running jobs first: a worker finishing one holds its row and then wants the quota
    # counters, which the cancels below take; in this order it never waits on us for them.
    running = await repository.request_cancel_running(scope.session, batch_id)
    now = datetime.now(UTC)
    for job_id in await repository.queued_job_ids(scope.session, batch_id):
        if await jobs_repository.cancel_queued(scope.session, job_id, now):
            await lifecycle.record_end(scope.session, job_id, JobStatus.CANCELED, end_batch=False)

    async def _flag_and_finish() -> None:
        for job_id in running:
            await events.request_cancel(job_id)
        await completion.finish_if_done(scope.org_id, batch_id)

    after_commit(scope.session, _flag_and_finish)
    await commit(scope.session)
    return await get(scope, batch_id)


async def item_views(
    scope: OrgScope, batch_id: uuid.UUID, *, offset: int, limit: int
) -> tuple[list[BatchItemRead], bool]:
    """Items in upload order, each with its job's status, progress, error and report; and
    whether more follow."""
    await get(scope, batch_id)
    rows = await repository.items_page(scope.session, batch_id, offset=offset, limit=limit + 1)
    out = []
    for item, job in rows[:limit]:
        error: JobError | None = None
        if item.error_code:
            state = "rejected"
            error = JobError(code=item.error_code, message=item.error_message or "", status=422)
        elif job is None:
            state = "pending"
        else:
            state = job.status
            if job.error_code:
                error = JobError(
                    code=job.error_code,
                    message=job.error_message or "",
                    status=error_status(job.error_code),
                )
        out.append(
            BatchItemRead(
                id=item.id,
                position=item.position,
                name=item.name,
                params=item.params,
                job_id=job.id if job else None,
                status=state,
                progress=job.progress if job else 0.0,
                error=error,
                report=job.report if job else None,
            )
        )
    return out, len(rows) > limit


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


async def archive_download(scope: OrgScope, batch_id: uuid.UUID) -> tuple[str, Iterator[bytes]]:
    """The archive's file name and its bytes as they are written (the server never holds
    the archive); every output is checked to be the organization's before anything is sent."""
    batch = await get(scope, batch_id)
    rows = await repository.archive_rows(scope.session, batch_id)
    for row in rows:
        for output in row.outputs:
            if not output["key"].startswith(f"orgs/{scope.org_id}/"):
                raise PermissionError("object does not belong to the organization")
    stem = _UNSAFE_FILENAME.sub("-", batch.name or "").strip("-") or f"batch-{batch.id}"
    return f"{stem}.zip", archive.stream(rows)


async def view(scope: OrgScope, batch: Batch) -> BatchRead:
    """The batch with its counts, progress, metered seconds so far and an ETA."""
    if batch.status == BatchStatus.SUBMITTED.value:
        # Normally done by the last job's end; repeated here in case that check was lost.
        counts = await repository.job_counts(scope.session, batch.id)
        if not counts.active:
            await completion.finish_if_done(scope.org_id, batch.id)
            batch = await get(scope, batch.id)
    counts = await repository.job_counts(scope.session, batch.id)
    items, rejected = await repository.item_counts(scope.session, batch.id)
    by_status = counts.by_status
    submitted = counts.total
    ended = submitted - counts.active
    progress = (ended + counts.running_progress) / submitted if submitted else 0.0
    return BatchRead(
        id=batch.id,
        name=batch.name,
        webhook_tag=batch.webhook_tag,
        operation=batch.operation,
        params=batch.params,
        status=BatchStatus(batch.status),
        cancel_requested=batch.cancel_requested,
        counts=BatchCounts(
            items=items,
            rejected=rejected,
            pending=items - rejected - submitted,
            **{s.value: by_status.get(s.value, 0) for s in JobStatus},
        ),
        progress=round(min(1.0, progress), 4),
        gpu_seconds=round(counts.gpu_seconds, 4),
        compute_seconds=round(counts.compute_seconds, 4),
        eta=await _eta(scope, batch, counts),
        created_at=batch.created_at,
        submitted_at=batch.submitted_at,
        finished_at=batch.finished_at,
    )


async def _eta(scope: OrgScope, batch: Batch, counts: repository.Counts) -> Eta | None:
    """Time left: from this batch's own pace once items have ended, else from the mean
    seconds of the organization's recent jobs of the operation, as many at once as run now."""
    if batch.status != BatchStatus.SUBMITTED.value or not counts.active:
        return None
    running = counts.by_status.get(JobStatus.RUNNING.value, 0)
    remaining = counts.active - counts.running_progress
    now = datetime.now(UTC)
    ended = counts.total - counts.active
    started = counts.first_started_at
    if ended and started is not None and counts.last_finished_at is not None:
        elapsed = (counts.last_finished_at - started).total_seconds()
        if elapsed > 0:
            seconds = remaining * elapsed / ended
            return Eta(
                seconds=round(seconds, 1),
                at=now + timedelta(seconds=seconds),
                basis="batch_throughput",
            )
    per_job = await repository.recent_seconds_per_job(scope.session, batch.operation)
    if per_job is None:
        return None
    seconds = remaining * per_job / max(1, running)
    return Eta(seconds=round(seconds, 1), at=now + timedelta(seconds=seconds), basis="recent_jobs")
