"""HTTP of jobs: submit (202), read, list, cancel, stream events, download outputs."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    Query,
    Request,
    Response,
    UploadFile,
    status,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse

from hiddenmodel import storage
from hiddenmodel.db import async_tenant_session
from hiddenmodel.errors import Gone, NotFound, Problem
from hiddenmodel.inputs import FormText, JsonRefused, parse_json
from hiddenmodel.jobs import events, repository, service
from hiddenmodel.jobs.models import Job, JobStatus
from hiddenmodel.jobs.operations import all_operations
from hiddenmodel.jobs.schemas import JobRead, OperationRead, QuoteRead
from hiddenmodel.models import from_json
from hiddenmodel.pagination import DEFAULT_LIMIT, MAX_LIMIT, Page
from hiddenmodel.redis import async_redis
from hiddenmodel.retention import service as retention_service
from hiddenmodel.settings import get_settings
from hiddenmodel.tenancy import org_context
from tenants.auth import (
    API_KEY_SCHEME,
    JOBS_READ,
    REQUIRED_PERMISSIONS,
    KeyJobsRead,
    KeyJobsWrite,
    OrgScope,
    accepts,
    key_org_scope,
    read_with_api_key,
)

router = APIRouter(prefix="/v1", tags=["jobs"])

_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)")
SSE_KEEPALIVE_SECONDS = 10.0
SSE_RECHECK_SECONDS = 5.0


@router.get("/operations", operation_id="listOperations", response_model=list[OperationRead])
async def list_operations() -> list[OperationRead]:
    """Every operation with its version, params JSON schema, queue and cost estimate."""
    return [OperationRead.model_validate(op.describe()) for op in all_operations()]


def _parse_params(raw: str) -> dict[str, Any]:
    try:
        value = parse_json(raw)
    except JsonRefused as exc:
        raise Problem(
            f"`params` must be a JSON object: {exc}.",
            status=422,
            kind="invalid-params",
            title="Invalid params",
            errors=[{"loc": ["body", "params"], "msg": str(exc), "type": "json_refused"}],
        ) from exc
    if not isinstance(value, dict):
        raise Problem(
            "`params` must be a JSON object.",
            status=422,
            kind="invalid-params",
            title="Invalid params",
        )
    return value


async def _read(upload: UploadFile, name: str) -> service.Upload:
    limit = get_settings().max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise Problem(
            f"{name}: the file is larger than {limit} bytes.",
            status=413,
            kind="image-too-large",
            title="Image too large",
            input=name,
        )
    return service.Upload(name=name, data=data)


def _prefer_wait(prefer: str | None) -> int | None:
    if not prefer:
        return None
    match = _PREFER_WAIT.search(prefer)
    if not match:
        return None
    return min(int(match.group(1)), get_settings().prefer_wait_max_seconds)


async def _load(org_id: uuid.UUID, job_id: uuid.UUID) -> Job | None:
    async with async_tenant_session(org_id) as session:
        return await repository.get_job(session, job_id)


async def _wait_terminal(org_id: uuid.UUID, job_id: uuid.UUID, seconds: float) -> Job | None:
    """Wait for the job to finish: pub/sub as the fast path, the database as the truth."""
    deadline = time.monotonic() + seconds
    pubsub = async_redis().pubsub()
    await pubsub.subscribe(events.channel(job_id))
    try:
        job = await _load(org_id, job_id)
        while job is not None and not JobStatus(job.status).terminal:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            message = await pubsub.get_message(
                ignore_subscribe_messages=True, timeout=min(remaining, 1.0)
            )
            if message is None or json.loads(message["data"]).get("type") == "status":
                job = await _load(org_id, job_id)
        return job
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


@router.post(
    "/jobs",
    operation_id="submitJob",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses={
        200: {
            "description": "Finished within `Prefer: wait`, an idempotent replay of a "
            "finished job, or with `dry_run` a price quote (QuoteRead)",
            "model": JobRead | QuoteRead,
        }
    },
)
async def submit_job(
    scope: KeyJobsWrite,
    response: Response,
    image: Annotated[UploadFile, File(description="PNG, JPEG or WEBP")],
    operation: Annotated[FormText, Form(examples=["remove_background"])],
    params: Annotated[FormText, Form(description="JSON object; see GET /v1/operations")] = "{}",
    mask: Annotated[UploadFile | None, File(description="Optional mask, image-sized")] = None,
    body_mask: Annotated[
        UploadFile | None, File(description="Optional mannequin or person mask, image-sized")
    ] = None,
    interior: Annotated[UploadFile | None, File(description="Optional interior photo")] = None,
    cancel_after: Annotated[
        int | None, Form(ge=1, le=7 * 86400, description="Expire if not started within N s")
    ] = None,
    idempotency_key: Annotated[
        FormText | None, Header(alias="Idempotency-Key", max_length=255)
    ] = None,
    prefer: Annotated[str | None, Header(description="`wait=N` (N ≤ 60)")] = None,
    dry_run: Annotated[
        bool, Form(description="Quote only: validate and price, create nothing")
    ] = False,
    dry_run_query: Annotated[bool, Query(alias="dry_run")] = False,
) -> Any:
    """Accept a job: 202 with the job and its `Location` at once; the work runs async."""
    uploads = [await _read(image, "image")]
    for name, upload in (("mask", mask), ("body_mask", body_mask), ("interior", interior)):
        if upload is not None:
            uploads.append(await _read(upload, name))
    submitted = await service.submit(
        scope,
        service.Submission(
            operation=operation,
            params=_parse_params(params),
            uploads=uploads,
            idempotency_key=idempotency_key,
            cancel_after_seconds=cancel_after,
            dry_run=dry_run or dry_run_query,
        ),
    )
    if isinstance(submitted, service.Quote):
        return JSONResponse(QuoteRead.from_quote(submitted).model_dump(mode="json"))
    job = submitted.job
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    wait = _prefer_wait(prefer)
    code = status.HTTP_202_ACCEPTED
    position = submitted.queue_position
    if wait:
        finished = await _wait_terminal(scope.org_id, job.id, wait)
        headers["Preference-Applied"] = f"wait={wait}"
        if finished is not None:
            job, code, position = finished, status.HTTP_200_OK, None
    elif submitted.replayed and JobStatus(job.status).terminal:
        code = status.HTTP_200_OK
    body = await service.view(scope, job, position)
    return Response(
        body.model_dump_json(), status_code=code, headers=headers, media_type="application/json"
    )


@accepts(API_KEY_SCHEME)
async def readable_job(request: Request) -> JobRead | None:
    """The job as ``GET /v1/jobs/{id}`` answers it, read with the key in one statement
    (``hm_job_for_key_request``, see :func:`tenants.auth.read_with_api_key`): what a client
    polls, several times a job. Whatever that plain case does not cover goes the usual way,
    in the key's organization scope.

    The id is read here, not declared: a dependency's own invalid parameter would skip the
    dependency, and so the authentication. A malformed id is refused (422, by the route's
    declared ``job_id``) only after the credentials are checked; None stands for it.
    """
    try:
        job_id: uuid.UUID | None = uuid.UUID(request.path_params["job_id"])
    except ValueError:
        job_id = None
    read = None
    if job_id is not None:
        read = await read_with_api_key(request, JOBS_READ, "hm_job_for_key_request", job_id)
    if read is not None:
        job, position = read.columns
        if job is None:
            raise NotFound("No such job.", kind="job-not-found")
        with org_context(read.org.id):  # for the log lines of its rendering
            return service.render(from_json(Job, job), position)
    async with key_org_scope(request) as scope:
        scope.require(JOBS_READ)
        return (
            None if job_id is None else await service.view(scope, await service.get(scope, job_id))
        )


REQUIRED_PERMISSIONS[readable_job] = JOBS_READ


@router.get("/jobs/{job_id}", operation_id="getJob", response_model=JobRead)
async def get_job(
    job_id: uuid.UUID, job: Annotated[JobRead | None, Depends(readable_job)]
) -> Response:
    if job is None or job.id != job_id:  # not reached: a malformed id is a 422 before this
        raise NotFound("No such job.", kind="job-not-found")
    # Serialised once, as the submit's answer is: returned as the model, it would be
    # validated against the response model again first, on every poll.
    return Response(job.model_dump_json(), media_type="application/json")


@router.get("/jobs", operation_id="listJobs", response_model=Page[JobRead])
async def list_jobs(
    scope: KeyJobsRead,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    operation: Annotated[str | None, Query(max_length=64)] = None,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
) -> Page[JobRead]:
    rows, next_cursor = await repository.list_jobs(
        scope.session,
        status=status_.value if status_ else None,
        operation=operation,
        created_after=created_after,
        created_before=created_before,
        cursor=cursor,
        limit=limit,
    )
    # The page's queue positions in one query, not one count per queued job.
    positions = await repository.queue_positions(scope.session, rows)
    return Page(
        items=[await service.view(scope, j, positions.get(j.id)) for j in rows],
        next_cursor=next_cursor,
    )


@router.post("/jobs/{job_id}/cancel", operation_id="cancelJob", response_model=JobRead)
async def cancel_job(job_id: uuid.UUID, scope: KeyJobsWrite, response: Response) -> JobRead:
    """A queued job is canceled at once (200); a running one stops at its next step (202)."""
    job = await service.cancel(scope, job_id)
    if job.status == JobStatus.RUNNING.value:
        response.status_code = status.HTTP_202_ACCEPTED
    return await service.view(scope, job)


@router.get(
    "/jobs/{job_id}/outputs/{name}",
    operation_id="downloadJobOutput",
    status_code=status.HTTP_307_TEMPORARY_REDIRECT,
    responses={
        307: {"description": "Redirect to a short-lived presigned URL"},
        410: {"description": "Deleted under the organization's retention (`output-expired`)"},
    },
)
async def download_output(job_id: uuid.UUID, name: str, scope: KeyJobsRead) -> Response:
    job = await service.get(scope, job_id)
    output = next((o for o in job.outputs if o["name"] == name), None)
    if output is None:
        raise NotFound("The job has no such output.", kind="output-not-found")
    if job.expired_at is not None:
        retention = await retention_service.get_retention(scope)
        raise Gone(
            f"The job's outputs were deleted on {job.expired_at:%Y-%m-%d}: this organization "
            f"keeps them {retention.effective_days} days after a job finishes.",
            kind="output-expired",
            title="Output expired",
            expired_at=job.expired_at.isoformat(),
            retention_days=retention.effective_days,
        )
    if not await run_in_threadpool(storage.object_exists, output["key"]):
        raise NotFound("The job's output is no longer stored.", kind="output-not-found")
    url = storage.presigned_get_url(
        output["key"], job.organization_id, filename=f"{job.id}-{name}.{output['format']}"
    )
    return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


async def _event_stream(scope: OrgScope, job_id: uuid.UUID) -> AsyncIterator[bytes]:
    org_id = scope.org_id
    pubsub = async_redis().pubsub()
    await pubsub.subscribe(events.channel(job_id))
    try:
        job = await _load(org_id, job_id)
        # A status event per change of status; progress between them comes from pub/sub, so
        # a slower database re-read never sends a client back to an older step.
        last_status: str | None = None
        last_check = last_beat = time.monotonic()
        while job is not None:
            if job.status != last_status:
                last_status = job.status
                yield _sse(
                    "status", {"status": job.status, "stage": job.stage, "progress": job.progress}
                )
            if JobStatus(job.status).terminal:
                async with async_tenant_session(org_id) as session:
                    fresh = OrgScope(org=scope.org, principal=scope.principal, session=session)
                    body = await service.view(fresh, job)
                yield _sse("job", body.model_dump(mode="json"))
                return
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            now = time.monotonic()
            if message is not None:
                data = json.loads(message["data"])
                if data.get("type") == "progress":
                    yield _sse("progress", data)
                    continue
                job = await _load(org_id, job_id)
                last_check = now
            elif now - last_check >= SSE_RECHECK_SECONDS:
                job, last_check = await _load(org_id, job_id), now
            if now - last_beat >= SSE_KEEPALIVE_SECONDS:
                last_beat = now
                yield b": keepalive\n\n"
    finally:
        await pubsub.unsubscribe()
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


@router.get(
    "/jobs/{job_id}/events",
    operation_id="streamJobEvents",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Server-sent events "
            "`status`, `progress`, then `job` (the final resource) and the end.",
        }
    },
)
async def stream_job_events(job_id: uuid.UUID, scope: KeyJobsRead) -> StreamingResponse:
    await service.get(scope, job_id)  # 404 before any stream opens
    return event_stream_response(scope, job_id)


def event_stream_response(scope: OrgScope, job_id: uuid.UUID) -> StreamingResponse:
    """A job's server-sent events, for a caller that has checked access (the portal too)."""
    return StreamingResponse(
        _event_stream(scope, job_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
