"""Input objects that no job points at, and their removal.

A submit stores its inputs in S3 before the transaction that creates the job. When that
transaction fails the submit deletes what it stored; when the API process dies in between
(or the delete itself fails), the objects stay behind with no job. The sweep finds them by
listing ``orgs/`` a page at a time and asking each organization, through its own RLS-bound
session, which of the listed job ids exist; objects of jobs that do not exist and that are
older than a grace period (far longer than any request) are deleted. Photos stored for a
batch's items (``orgs/{org}/batches/{batch}/{item}/…``) are judged the same way by their item.

The listing resumes where the last run stopped (a cursor in Redis; losing it only means
starting over), so a large bucket is covered across runs.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hiddenmodel import storage
from hiddenmodel.batches import repository as batches_repository
from hiddenmodel.db import tenant_session
from hiddenmodel.jobs import repository
from hiddenmodel.redis import sync_redis

log = logging.getLogger(__name__)

_JOB_OBJECT = re.compile(r"^orgs/([0-9a-f-]{36})/jobs/([0-9a-f-]{36})/[^/]+$")
_ITEM_OBJECT = re.compile(r"^orgs/([0-9a-f-]{36})/batches/[0-9a-f-]{36}/([0-9a-f-]{36})/[^/]+$")
PAGE_SIZE = 1000


def cursor_key(prefix: str) -> str:
    return f"hm:orphans:cursor:{prefix}"


@dataclass
class Sweep:
    listed: int = 0
    deleted: int = 0
    # The listing reached the end of the prefix (the next run starts at the beginning).
    finished: bool = False


def _ids(key: str) -> tuple[uuid.UUID, str, uuid.UUID] | None:
    """(organization, "job" or "item", the owner's id) of a job's or batch item's object."""
    for kind, pattern in (("job", _JOB_OBJECT), ("item", _ITEM_OBJECT)):
        match = pattern.match(key)
        if match is None:
            continue
        try:
            return uuid.UUID(match.group(1)), kind, uuid.UUID(match.group(2))
        except ValueError:
            return None
    return None


def _orphans(objects: list[tuple[str, datetime]], older_than: datetime) -> list[str]:
    """The keys among ``objects`` whose job or batch item does not exist (old enough ones
    only)."""
    by_org: dict[uuid.UUID, dict[tuple[str, uuid.UUID], list[str]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for key, modified in objects:
        ids = _ids(key)
        if ids is not None and modified < older_than:
            by_org[ids[0]][(ids[1], ids[2])].append(key)
    orphaned: list[str] = []
    for org_id, owners in by_org.items():
        jobs = [i for kind, i in owners if kind == "job"]
        items = [i for kind, i in owners if kind == "item"]
        with tenant_session(org_id) as session:
            existing = {("job", i) for i in repository.existing_job_ids_sync(session, jobs)}
            existing |= {
                ("item", i) for i in batches_repository.existing_item_ids_sync(session, items)
            }
        for owner, keys in owners.items():
            if owner not in existing:
                orphaned += keys
    return orphaned


def sweep_orphans(
    *,
    prefix: str = "orgs/",
    grace_seconds: float,
    budget_seconds: float,
    page_size: int = PAGE_SIZE,
) -> Sweep:
    """Delete orphaned job objects under ``prefix``, a page at a time, until the listing
    ends or ``budget_seconds`` is spent; the next call goes on from there."""
    redis = sync_redis()
    cursor_name = cursor_key(prefix)
    raw = redis.get(cursor_name)
    cursor = raw.decode() if isinstance(raw, bytes) else raw
    older_than = datetime.now(UTC) - timedelta(seconds=grace_seconds)
    started = time.monotonic()
    result = Sweep()
    while True:
        page = storage.list_page(prefix, start_after=cursor, max_keys=page_size)
        result.listed += len(page.objects)
        orphaned = _orphans(page.objects, older_than)
        if orphaned:
            storage.delete_objects(orphaned)
            result.deleted += len(orphaned)
            log.warning("deleted %d orphaned objects, e.g. %s", len(orphaned), orphaned[0])
        if not page.truncated or not page.objects:
            redis.delete(cursor_name)
            result.finished = True
            return result
        cursor = page.objects[-1][0]
        redis.set(cursor_name, cursor)
        if time.monotonic() - started >= budget_seconds:
            return result
