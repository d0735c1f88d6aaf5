"""The organization a unit of work acts for, carried in a context variable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

current_org_id: ContextVar[uuid.UUID | None] = ContextVar("hm_current_org_id", default=None)
# The signed-in user a request acts for, set once its session token is verified; global
# sessions bind it to each transaction (``app.user_id``) for the functions that answer only
# for that user (``hm_user_organizations``).
current_user_id: ContextVar[uuid.UUID | None] = ContextVar("hm_current_user_id", default=None)


class TenantContextMissing(RuntimeError):
    """A tenant-scoped session was used with no organization bound: fail closed."""


@contextmanager
def org_context(org_id: uuid.UUID) -> Iterator[uuid.UUID]:
    """Bind ``org_id`` for the duration of the block (workers re-enter it per task)."""
    token = current_org_id.set(org_id)
    try:
        yield org_id
    finally:
        current_org_id.reset(token)
