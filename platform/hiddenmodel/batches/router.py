"""HTTP of batches: create, add items (files or a ZIP), submit, read, cancel, archive."""

from __future__ import annotations

import re
import uuid
from typing import IO, Annotated, Any

from fastapi import APIRouter, File, Query, Response, UploadFile, status
from fastapi.responses import JSONResponse, StreamingResponse

from hiddenmodel.batches import archive, intake, repository, service
from hiddenmodel.batches.schemas import (
    BatchCreate,
    BatchItemRead,
    BatchQuoteRead,
    BatchRead,
    ItemsAdded,
)
from hiddenmodel.batches.zipintake import ArchiveRefused, ZipLimits, ZipSource
from hiddenmodel.errors import Problem
from hiddenmodel.jobs.schemas import JobError, Price
from hiddenmodel.jobs.service import error_status
from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from hiddenmodel.settings import get_settings
from tenants.auth import JOBS_READ, JOBS_WRITE, KeyOrgScopeDep

router = APIRouter(prefix="/v1", tags=["batches"])

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


@router.post(
    "/batches",
    operation_id="createBatch",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchRead,
)
async def create_batch(body: BatchCreate, scope: KeyOrgScopeDep, response: Response) -> BatchRead:
    """An open batch: add items to it, then submit it."""
    scope.require(JOBS_WRITE)
    batch = await service.create(scope, body)
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return await service.view(scope, batch)


@router.get("/batches", operation_id="listBatches", response_model=Page[BatchRead])
async def list_batches(
    scope: KeyOrgScopeDep,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[BatchRead]:
    scope.require(JOBS_READ)
    rows, next_cursor = await repository.list_batches(scope.session, cursor=cursor, limit=limit)
    return Page(items=[await service.view(scope, b) for b in rows], next_cursor=next_cursor)


@router.get("/batches/{batch_id}", operation_id="getBatch", response_model=BatchRead)
async def get_batch(batch_id: uuid.UUID, scope: KeyOrgScopeDep) -> BatchRead:
    """Counts by status, progress, GPU seconds so far and an ETA."""
    scope.require(JOBS_READ)
    return await service.view(scope, await service.get(scope, batch_id))


@router.post(
    "/batches/{batch_id}/items",
    operation_id="addBatchItems",
    status_code=status.HTTP_201_CREATED,
    response_model=ItemsAdded,
)
async def add_items(
    batch_id: uuid.UUID,
    scope: KeyOrgScopeDep,
    files: Annotated[
        list[UploadFile] | None, File(description="Photos, masks and interior frames")
    ] = None,
    archive_file: Annotated[
        UploadFile | None, File(alias="archive", description="One ZIP instead of `files`")
    ] = None,
    manifest: Annotated[
        UploadFile | None,
        File(
            description="With `files`: a CSV with columns image, mask, body_mask, interior, "
            "params (a ZIP carries its own manifest.csv)"
        ),
    ] = None,
) -> ItemsAdded:
    """Add items from many files or one ZIP. A hostile or malformed upload is refused whole
    (4xx naming the entry) with nothing stored; a damaged photo is kept as a rejected item."""
    scope.require(JOBS_WRITE)
    settings = get_settings()
    source: intake.Source
    try:
        if archive_file is not None and not files and manifest is None:
            source = ZipSource(
                archive_file.file,
                ZipLimits(
                    max_entries=settings.zip_max_entries,
                    max_total_bytes=settings.zip_max_total_bytes,
                    max_member_bytes=settings.max_upload_bytes,
                    max_ratio=settings.zip_max_ratio,
                ),
            )
        elif files and archive_file is None:
            named: list[tuple[str, IO[bytes]]] = []
            for upload in files:
                if not upload.filename:
                    raise ArchiveRefused(
                        "archive-unsafe-name", "Every file needs a file name.", entry=None
                    )
                named.append((upload.filename, upload.file))
            source = intake.FilesSource(
                named, manifest.file if manifest else None, settings.max_upload_bytes
            )
        else:
            raise Problem(
                "Send either `files` (with an optional `manifest`) or one `archive`.",
                status=422,
                kind="batch-upload-invalid",
                title="Invalid upload",
            )
    except ArchiveRefused as exc:
        raise service.refused(exc) from exc
    added = await service.add_items(scope, batch_id, source)
    batch = await service.get(scope, batch_id)
    return ItemsAdded(
        added=added.added, rejected=added.rejected, batch=await service.view(scope, batch)
    )


@router.get(
    "/batches/{batch_id}/items", operation_id="listBatchItems", response_model=Page[BatchItemRead]
)
async def list_items(
    batch_id: uuid.UUID,
    scope: KeyOrgScopeDep,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[BatchItemRead]:
    """Items in upload order, each with its job's status, progress, error and report."""
    scope.require(JOBS_READ)
    await service.get(scope, batch_id)
    offset = int(cursor or 0)
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
    more = len(rows) > limit
    return Page(items=out, next_cursor=str(offset + limit) if more else None)


@router.post(
    "/batches/{batch_id}/submit",
    operation_id="submitBatch",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=BatchRead,
    responses={200: {"description": "With `dry_run`: the price of the whole batch",
                     "model": BatchQuoteRead}},
)  # fmt: skip
async def submit_batch(
    batch_id: uuid.UUID,
    scope: KeyOrgScopeDep,
    dry_run: Annotated[bool, Query(description="Quote only: admit nothing")] = False,
) -> Any:
    """Admit every item at once under the quota, or none: 429/402 with the whole batch's
    numbers when it does not fit."""
    scope.require(JOBS_WRITE)
    result = await service.submit(scope, batch_id, dry_run=dry_run)
    if isinstance(result, service.Quote):
        quote = BatchQuoteRead(
            operation=result.operation,
            items=result.items,
            estimate={"gpu_seconds": round(result.gpu_seconds, 6), "images": result.images},
            price=Price(amount=str(result.amount), currency=result.currency),
            plan=result.plan,
        )
        return JSONResponse(quote.model_dump(mode="json"))
    body = await service.view(scope, result)
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={"Location": f"/v1/batches/{batch_id}"},
    )


@router.post("/batches/{batch_id}/cancel", operation_id="cancelBatch", response_model=BatchRead)
async def cancel_batch(batch_id: uuid.UUID, scope: KeyOrgScopeDep) -> BatchRead:
    """Cancel what has not started; running items stop at their next step."""
    scope.require(JOBS_WRITE)
    return await service.view(scope, await service.cancel(scope, batch_id))


@router.get(
    "/batches/{batch_id}/archive",
    operation_id="downloadBatchArchive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {"schema": {"type": "string",
                                                                  "format": "binary"}}},
                     "description": "A ZIP of every output, named after its input, and "
                     "items.csv (status, error, quality flags per item)"}},
)  # fmt: skip
async def download_archive(batch_id: uuid.UUID, scope: KeyOrgScopeDep) -> StreamingResponse:
    """Streamed as it is written: the server never holds the archive."""
    scope.require(JOBS_READ)
    batch = await service.get(scope, batch_id)
    rows = await repository.archive_rows(scope.session, batch_id)
    for row in rows:
        for output in row.outputs:
            if not output["key"].startswith(f"orgs/{scope.org_id}/"):
                raise PermissionError("object does not belong to the organization")
    stem = _UNSAFE_FILENAME.sub("-", batch.name or "").strip("-") or f"batch-{batch.id}"
    return StreamingResponse(
        archive.stream(rows),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{stem}.zip"',
            "Cache-Control": "no-store",
        },
    )
