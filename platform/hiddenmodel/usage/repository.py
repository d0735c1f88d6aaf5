"""SQL of usage: settling reservations (shared by the API, workers and the reconciler)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

_SETTLE = text("SELECT hm_settle_job(:job, :outcome, :gpu, :images, :mp, :bytes)")


def _params(
    job_id: uuid.UUID,
    outcome: str,
    gpu_seconds: float,
    images: int,
    megapixels: float,
    output_bytes: int,
) -> dict[str, Any]:
    return {
        "job": job_id,
        "outcome": outcome,
        "gpu": gpu_seconds,
        "images": images,
        "mp": megapixels,
        "bytes": output_bytes,
    }


def settle_sync(
    session: Session,
    job_id: uuid.UUID,
    outcome: str,
    *,
    gpu_seconds: float = 0.0,
    images: int = 0,
    megapixels: float = 0.0,
    output_bytes: int = 0,
) -> bool:
    """Settle or release the job's reservation and write its usage event when billable.

    Billing policy: succeeded jobs are billed their measured GPU-seconds and images; jobs
    canceled while running are billed the GPU-seconds they used; failed, expired and jobs
    canceled before they started are not billed.
    """
    result = session.execute(
        _SETTLE, _params(job_id, outcome, gpu_seconds, images, megapixels, output_bytes)
    )
    return bool(result.scalar())


async def settle(
    session: AsyncSession,
    job_id: uuid.UUID,
    outcome: str,
    *,
    gpu_seconds: float = 0.0,
    images: int = 0,
    megapixels: float = 0.0,
    output_bytes: int = 0,
) -> bool:
    """The async twin of :func:`settle_sync` (API side: cancel before start)."""
    result = await session.execute(
        _SETTLE, _params(job_id, outcome, gpu_seconds, images, megapixels, output_bytes)
    )
    return bool(result.scalar())
