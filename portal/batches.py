"""An organization's batches: upload many photos (or a ZIP) with an operation and its params,
follow each item's progress, see every result beside its input, download them all.

The views call the batch services the API routers call (:mod:`hiddenmodel.batches.service`):
the same limits, quotas and validation. The form works as a plain multipart post; with
``batches.js`` it gains drag and drop, a mask and interior frame chosen per photo, and live
progress from the jobs' event streams and the batch's summary.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from pathlib import PurePosixPath
from typing import IO, Any

from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile

from hiddenmodel import storage
from hiddenmodel.batches import intake
from hiddenmodel.batches import repository as batches_repository
from hiddenmodel.batches import service as batches_service
from hiddenmodel.batches.models import BatchStatus
from hiddenmodel.batches.schemas import BatchCreate, BatchRead
from hiddenmodel.batches.zipintake import ArchiveRefused
from hiddenmodel.errors import Problem
from hiddenmodel.jobs import service as jobs_service
from hiddenmodel.jobs.models import JobStatus
from hiddenmodel.jobs.operations import Operation, all_operations, get_operation
from portal import paramsform
from portal.security import checked_form, first_submission
from portal.web import (
    OPERATE,
    PAGE_SIZE,
    form_field,
    org_page,
    org_url,
    problem_message,
    render,
    router,
    see_other,
    validation_message,
)
from tenants.auth import OrgScope

# The extra inputs the form offers per photo, by the form field that carries them.
EXTRA_FIELDS = {"masks": "mask", "interiors": "interior"}
_ROW = re.compile(r"^row (\d+)$")
# Item states that change no more: a photo refused at intake, or a job that has ended.
ENDED = frozenset({"rejected", *(s.value for s in JobStatus if s.terminal)})


class FormError(Exception):
    """A refusal to show next to one field of the upload form."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


async def _reload_org(scope: OrgScope) -> None:
    """The batch services commit or roll back themselves; a rollback expires the
    organization the page is rendered with, which is read again before rendering."""
    await scope.session.refresh(scope.org)


# --- the list and the upload form --------------------------------------------------------


def _operations(form: FormData | None) -> list[dict[str, Any]]:
    return [
        {
            "name": op.name,
            "summary": op.summary,
            "inputs": ["image", *op.extra_inputs],
            "fields": paramsform.fields(op),
            "values": paramsform.values(op, form),
        }
        for op in all_operations()
    ]


async def _list_context(
    scope: OrgScope, cursor: str | None, form: FormData | None = None
) -> dict[str, Any]:
    rows, next_cursor = await batches_repository.list_batches(
        scope.session, cursor=cursor, limit=PAGE_SIZE
    )
    chosen = form_field(form, "operation") if form is not None else ""
    operations = _operations(form)
    names = [op["name"] for op in operations]
    return {
        "batches": [await batches_service.view(scope, b) for b in rows],
        "next_cursor": next_cursor,
        "operations": operations,
        "chosen": chosen if chosen in names else names[0],
        "form_name": form_field(form, "name") if form is not None else "",
        "statuses": [s.value for s in JobStatus],
    }


@router.get("/orgs/{org_id}/batches", response_class=HTMLResponse)
async def batches_page(request: Request, org_id: uuid.UUID, cursor: str | None = None) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        return render(request, "batches.html", await _list_context(scope, cursor), scope=scope)


def _uploads(form: FormData, field: str) -> list[UploadFile]:
    # A file input left empty still posts one part, with no file name.
    return [f for f in form.getlist(field) if isinstance(f, UploadFile) and f.filename]


def _manifest(photos: list[UploadFile], extras: dict[str, list[UploadFile]]) -> bytes | None:
    """A manifest pairing each mask and interior frame with the photo of the same name
    (``sku1.png`` goes with ``sku1.jpg``); None when there is nothing to pair."""
    if not any(extras.values()):
        return None
    by_stem: dict[str, str] = {}
    for upload in photos:
        stem = PurePosixPath(upload.filename or "").stem.casefold()
        by_stem[stem] = "" if stem in by_stem else upload.filename or ""
    paired: dict[str, dict[str, str]] = {p.filename or "": {} for p in photos}
    for field, uploads in extras.items():
        role = EXTRA_FIELDS[field]
        for upload in uploads:
            name = upload.filename or ""
            photo = by_stem.get(PurePosixPath(name).stem.casefold())
            if not photo:
                raise FormError(
                    field,
                    f"{name}: no photo of the same name (without its extension) to go with, "
                    "or more than one.",
                )
            if role in paired[photo]:
                raise FormError(field, f"{name}: {photo} already has a {role}.")
            paired[photo][role] = f"{field}/{name}"
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", *EXTRA_FIELDS.values()])
    for photo, files in paired.items():
        writer.writerow([photo, *(files.get(role, "") for role in EXTRA_FIELDS.values())])
    return out.getvalue().encode()


def _source(form: FormData) -> intake.Source:
    """The upload as the batch services read it: the photos (and the masks and interior
    frames paired with them), or one ZIP with its own manifest."""
    photos = _uploads(form, "photos")
    extras = {field: _uploads(form, field) for field in EXTRA_FIELDS}
    if not photos:
        raise FormError("photos", "Choose one or more photos, or one ZIP.")
    if len(photos) == 1 and (photos[0].filename or "").lower().endswith(".zip"):
        for field, uploads in extras.items():
            if uploads:
                raise FormError(
                    field, "A ZIP names its masks and interior frames in its manifest.csv."
                )
        return batches_service.upload_source([], photos[0].file, None)
    manifest = _manifest(photos, extras)
    files: list[tuple[str, IO[bytes]]] = [(p.filename or "", p.file) for p in photos]
    for field, uploads in extras.items():
        files += [(f"{field}/{u.filename}", u.file) for u in uploads]
    return batches_service.upload_source(
        files, None, io.BytesIO(manifest) if manifest is not None else None
    )


def _upload_error(exc: Problem, photos: list[str]) -> FormError:
    """The intake's refusal, next to the input holding the file it names."""
    entry = str(exc.extra.get("entry") or "")
    message = problem_message(exc)
    for field in EXTRA_FIELDS:
        if entry.startswith(f"{field}/"):
            return FormError(field, message.replace(f"{field}/", ""), exc.status)
    row = _ROW.match(entry)
    if row and 0 <= int(row.group(1)) - 2 < len(photos):
        # A row of the manifest the form wrote: name its photo instead.
        photo = photos[int(row.group(1)) - 2]
        detail = message.split(": ", 1)[-1]
        field = next((f for f, role in EXTRA_FIELDS.items() if f"'{role}'" in detail), "photos")
        return FormError(field, f"{photo}: {detail}", exc.status)
    return FormError("photos", message, exc.status)


def _params_error(exc: Problem, op: Operation) -> FormError:
    errors = exc.extra.get("errors") or []
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", [])]
    message = f"{loc[0]}: {first['msg']}" if loc else str(first.get("msg") or exc.detail)
    field = f"params.{op.name}.{loc[0]}" if loc else f"params.{op.name}"
    return FormError(field, message.removeprefix("Value error, "))


@router.post("/orgs/{org_id}/batches", response_class=HTMLResponse)
async def create_batch(request: Request, org_id: uuid.UUID) -> Response:
    """Create the batch with its photos and submit it: one form, as the API's three calls."""
    async with org_page(request, org_id, OPERATE) as scope:
        form = await checked_form(request)
        if not await first_submission(form):
            return see_other(org_url(org_id, "batches"))
        photos = [p.filename or "" for p in _uploads(form, "photos")]
        try:
            try:
                op = get_operation(form_field(form, "operation"))
            except Problem as exc:
                raise FormError("operation", problem_message(exc)) from exc
            try:
                data = BatchCreate(
                    operation=op.name,
                    params=paramsform.read(op, form),
                    name=form_field(form, "name") or None,
                )
            except ValidationError as exc:
                raise FormError("name", validation_message(exc)) from exc
            try:
                source = _source(form)
            except ArchiveRefused as exc:
                raise _upload_error(batches_service.refused(exc), photos) from exc
            try:
                batch = await batches_service.create_with_items(scope, data, source)
            except Problem as exc:
                if exc.kind == "invalid-params" and not exc.extra.get("entry"):
                    raise _params_error(exc, op) from exc
                raise _upload_error(exc, photos) from exc
        except FormError as exc:
            await _reload_org(scope)
            context = await _list_context(scope, None, form)
            context.update(error=exc.message, error_field=exc.field)
            return render(request, "batches.html", context, status_code=exc.status, scope=scope)
        batch_id = batch.id  # the row is expired by a refused submit's rollback
        try:
            await batches_service.submit(scope, batch_id)
        except Problem as exc:
            # Stored but not admitted (the quota): the batch waits, open, to be sent again.
            return await _batch_response(
                request, scope, batch_id, 0, error=problem_message(exc), status=exc.status
            )
        return see_other(org_url(org_id, "batches", str(batch_id)))


# --- one batch ---------------------------------------------------------------------------


def _report_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report:
        return None
    review = report.get("needs_review")
    return {
        "needs_review": None if review is None else bool(review),
        "reasons": [str(r) for r in report.get("reasons") or []],
        "details": {k: v for k, v in report.items() if k not in ("needs_review", "reasons")},
    }


async def _batch_context(scope: OrgScope, batch_id: uuid.UUID, offset: int) -> dict[str, Any]:
    batch = await batches_service.view(scope, await batches_service.get(scope, batch_id))
    views, more = await batches_service.item_views(scope, batch_id, offset=offset, limit=PAGE_SIZE)
    rows = await batches_repository.items_page(
        scope.session, batch_id, offset=offset, limit=PAGE_SIZE
    )
    items = []
    for view, (item, job) in zip(views, rows, strict=True):
        image = item.inputs.get("image")
        outputs = []
        if job is not None and job.status == JobStatus.SUCCEEDED.value:
            outputs = (await jobs_service.view(scope, job)).outputs
        items.append(
            {
                "view": view,
                "ended": view.status in ENDED,
                "input_url": storage.presigned_get_url(image["key"], scope.org_id)
                if image
                else None,
                "input": image,
                "outputs": outputs,
                "report": _report_summary(view.report),
            }
        )
    return {
        "batch": batch,
        "items": items,
        "ended": batch.status.ended,
        "open": batch.status == BatchStatus.OPEN,
        "offset": offset,
        "more": offset + PAGE_SIZE if more else None,
        "previous": max(0, offset - PAGE_SIZE) if offset else None,
        "counts": _counts(batch),
    }


def _counts(batch: BatchRead) -> list[tuple[str, int]]:
    counts = batch.counts.model_dump()
    return [(name, counts[name]) for name in ("pending", "rejected", *(s.value for s in JobStatus))]


async def _batch_response(
    request: Request,
    scope: OrgScope,
    batch_id: uuid.UUID,
    offset: int,
    *,
    error: str | None = None,
    status: int = 200,
) -> HTMLResponse:
    if error is not None:
        await _reload_org(scope)
    context = await _batch_context(scope, batch_id, offset)
    context["error"] = error
    return render(request, "batch.html", context, status_code=status, scope=scope)


@router.get("/orgs/{org_id}/batches/{batch_id}", response_class=HTMLResponse)
async def batch_page(
    request: Request, org_id: uuid.UUID, batch_id: uuid.UUID, offset: int = 0
) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        return await _batch_response(request, scope, batch_id, max(0, offset))


@router.get("/orgs/{org_id}/batches/{batch_id}/summary")
async def batch_summary(request: Request, org_id: uuid.UUID, batch_id: uuid.UUID) -> Response:
    """The batch's counts and progress (the API's batch resource), for the page's script."""
    async with org_page(request, org_id, OPERATE) as scope:
        batch = await batches_service.view(scope, await batches_service.get(scope, batch_id))
        return JSONResponse(batch.model_dump(mode="json"))


@router.post("/orgs/{org_id}/batches/{batch_id}/submit", response_class=HTMLResponse)
async def submit_batch(request: Request, org_id: uuid.UUID, batch_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        await checked_form(request)
        try:
            await batches_service.submit(scope, batch_id)
        except Problem as exc:
            if exc.status == 404:
                raise
            return await _batch_response(
                request, scope, batch_id, 0, error=problem_message(exc), status=exc.status
            )
        return see_other(org_url(org_id, "batches", str(batch_id)))


@router.post("/orgs/{org_id}/batches/{batch_id}/cancel", response_class=HTMLResponse)
async def cancel_batch(request: Request, org_id: uuid.UUID, batch_id: uuid.UUID) -> Response:
    async with org_page(request, org_id, OPERATE) as scope:
        form = await checked_form(request)
        try:
            await batches_service.cancel(scope, batch_id)
        except Problem as exc:
            if exc.status == 404:
                raise
            return await _batch_response(
                request, scope, batch_id, 0, error=problem_message(exc), status=exc.status
            )
        # Back to the page the button was on: the list or the batch.
        if form_field(form, "back") == "list":
            return see_other(org_url(org_id, "batches"))
        return see_other(org_url(org_id, "batches", str(batch_id)))


@router.get("/orgs/{org_id}/batches/{batch_id}/archive")
async def batch_archive(request: Request, org_id: uuid.UUID, batch_id: uuid.UUID) -> Response:
    """Every output named after its input, and items.csv: the API's archive."""
    async with org_page(request, org_id, OPERATE) as scope:
        filename, body = await batches_service.archive_download(scope, batch_id)
    return StreamingResponse(
        body,
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Cache-Control": "no-store",
        },
    )
