"""HTTP of batches: create, add items (files or a ZIP), submit, read, cancel, archive."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Response, UploadFile, status
from fastapi.responses import JSONResponse, StreamingResponse

from hiddenmodel.batches import repository, service
from hiddenmodel.batches.schemas import (
    BatchCreate,
    BatchItemRead,
    BatchQuoteRead,
    BatchRead,
    ItemsAdded,
)
from hiddenmodel.batches.zipintake import ArchiveRefused
from hiddenmodel.jobs.schemas import Price
from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from tenants.auth import KeyJobsRead, KeyJobsWrite

router = APIRouter(prefix="/v1", tags=["batches"])

_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


@router.post(
    "/batches",
    operation_id="createBatch",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchRead,
)
async def create_batch(body: BatchCreate, scope: KeyJobsWrite, response: Response) -> BatchRead:
    """An open batch: add items to it, then submit it."""
    batch = await service.create(scope, body)
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    return await service.view(scope, batch)


@router.get("/batches", operation_id="listBatches", response_model=Page[BatchRead])
async def list_batches(
    scope: KeyJobsRead,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[BatchRead]:
    rows, next_cursor = await repository.list_batches(scope.session, cursor=cursor, limit=limit)
    return Page(items=[await service.view(scope, b) for b in rows], next_cursor=next_cursor)


@router.get("/batches/{batch_id}", operation_id="getBatch", response_model=BatchRead)
async def get_batch(batch_id: uuid.UUID, scope: KeyJobsRead) -> BatchRead:
    """Counts by status, progress, GPU seconds so far and an ETA."""
    return await service.view(scope, await service.get(scope, batch_id))


@router.post(
    "/batches/{batch_id}/items",
    operation_id="addBatchItems",
    status_code=status.HTTP_201_CREATED,
    response_model=ItemsAdded,
)
async def add_items(
    batch_id: uuid.UUID,
    scope: KeyJobsWrite,
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
    try:
        source = service.upload_source(
            [(upload.filename or "", upload.file) for upload in files or []],
            archive_file.file if archive_file is not None else None,
            manifest.file if manifest is not None else None,
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
    scope: KeyJobsRead,
    cursor: Annotated[str | None, Query(pattern=r"^\d{1,9}$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[BatchItemRead]:
    """Items in upload order, each with its job's status, progress, error and report."""
    offset = int(cursor or 0)
    out, more = await service.item_views(scope, batch_id, offset=offset, limit=limit)
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
    scope: KeyJobsWrite,
    dry_run: Annotated[bool, Query(description="Quote only: admit nothing")] = False,
) -> Any:
    """Admit every item at once under the quota, or none: 429/402 with the whole batch's
    numbers when it does not fit."""
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
async def cancel_batch(batch_id: uuid.UUID, scope: KeyJobsWrite) -> BatchRead:
    """Cancel what has not started; running items stop at their next step."""
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
async def download_archive(batch_id: uuid.UUID, scope: KeyJobsRead) -> StreamingResponse:
    """Streamed as it is written: the server never holds the archive."""
    filename, body = await service.archive_download(scope, batch_id)
    return StreamingResponse(
        body,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )
