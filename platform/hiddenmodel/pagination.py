"""Keyset pagination on ``(created_at, id)``, newest first, with opaque cursors."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel
from sqlalchemy import Select, literal, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from hiddenmodel.errors import Problem

T = TypeVar("T")
DEFAULT_LIMIT = 50
MAX_LIMIT = 200


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def encode_cursor(created_at: datetime, id_: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(id_)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, id_ = json.loads(raw)
        return datetime.fromisoformat(created), uuid.UUID(id_)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise Problem("The cursor is not one this API issued.", kind="invalid-cursor") from exc


async def paginate(
    session: AsyncSession,
    stmt: Select[Any],
    *,
    created_at: InstrumentedAttribute[datetime],
    id_: InstrumentedAttribute[uuid.UUID],
    cursor: str | None,
    limit: int,
) -> tuple[Sequence[Any], str | None]:
    """Rows of ``stmt`` after ``cursor`` (newest first) and the cursor of the next page."""
    limit = max(1, min(limit, MAX_LIMIT))
    if cursor:
        after_created, after_id = decode_cursor(cursor)
        stmt = stmt.where(
            tuple_(created_at, id_) < tuple_(literal(after_created), literal(after_id))
        )
    stmt = stmt.order_by(created_at.desc(), id_.desc()).limit(limit + 1)
    rows = (await session.scalars(stmt)).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(getattr(last, created_at.key), getattr(last, id_.key))
    return rows, next_cursor
