"""Liveness, readiness (database and Redis reachable) and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from hiddenmodel import storage
from hiddenmodel.db import async_global_session
from hiddenmodel.errors import problem_response
from hiddenmodel.redis import async_redis
from hiddenmodel.settings import get_settings

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", operation_id="healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check_database() -> None:
    async with async_global_session() as session:
        await session.execute(text("SELECT 1"))


async def _check_redis() -> None:
    await async_redis().ping()


async def _check_storage() -> None:
    # Submissions write inputs to S3 before anything else: without it nothing is accepted.
    await run_in_threadpool(storage.s3_client().head_bucket, Bucket=get_settings().s3_bucket)


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness: the database, Redis and S3 answer",
    responses={503: {"description": "A dependency is unreachable"}},
)
async def readyz() -> JSONResponse:
    checks: dict[str, Any] = {}
    for name, check in (
        ("database", _check_database),
        ("redis", _check_redis),
        ("storage", _check_storage),
    ):
        try:
            await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ok", "checks": checks})
    return problem_response(
        503, "not-ready", "Not ready", "A dependency is unreachable.", checks=checks
    )
