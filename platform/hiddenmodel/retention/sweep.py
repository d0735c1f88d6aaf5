"""The retention sweep: delete the objects of jobs past their organization's retention, mark
the jobs expired, and keep the bucket's lifecycle rules in step.

Due jobs are found across organizations by ``hm_jobs_past_retention`` (ids only); each
organization's share is then locked, deleted and marked inside its own RLS-bound session.
Objects are deleted before the rows are marked, under the rows' locks: a crash in between
leaves the job unexpired and the next run deletes again (deleting a missing key succeeds),
so no object outlives its job's expiry unnoticed. A key S3 refuses keeps its job unexpired.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from hiddenmodel import storage
from hiddenmodel.db import global_session, tenant_session
from hiddenmodel.jobs.models import Job
from hiddenmodel.retention import repository
from hiddenmodel.settings import get_settings

log = logging.getLogger(__name__)

BATCH = 500
# Lifecycle rules that this module owns; other rules of the bucket are left as they are.
RULE_PREFIX = "hm-retention-"
# S3 keeps at most 1,000 rules a bucket; organizations beyond that rely on the sweep alone.
MAX_RULES = 1000
# The rules expire objects a day after the sweep would: the sweep marks the job first.
LIFECYCLE_MARGIN_DAYS = 1


@dataclass
class Swept:
    jobs: int = 0
    objects: int = 0
    refused: int = 0
    # Nothing more was due when the run stopped (otherwise its time budget ran out).
    finished: bool = False


def job_keys(job: Job) -> list[str]:
    """Every object a job points at: its inputs and its outputs."""
    keys = [meta["key"] for meta in job.inputs.values() if isinstance(meta, dict)]
    keys += [o["key"] for o in job.outputs if isinstance(o, dict) and "key" in o]
    return keys


def _expire(org_id: uuid.UUID, job_ids: list[uuid.UUID], now: datetime, done: Swept) -> None:
    with tenant_session(org_id) as session:
        jobs = repository.lock_unexpired_jobs_sync(session, job_ids)
        keys = {job.id: job_keys(job) for job in jobs}
        refused = storage.delete_objects([k for ks in keys.values() for k in ks])
        expired = [job_id for job_id, ks in keys.items() if not refused.intersection(ks)]
        if expired:
            repository.mark_expired_sync(session, expired, now)
    done.jobs += len(expired)
    done.objects += sum(len(keys[j]) for j in expired)
    done.refused += len(refused)
    if refused:
        log.warning("retention: S3 refused %d objects of organization %s", len(refused), org_id)


def expire_due_jobs(
    *, now: datetime | None = None, budget_seconds: float = 60.0, batch: int = BATCH
) -> Swept:
    """Expire every job past its organization's retention at ``now`` (default: the clock),
    within about ``budget_seconds``."""
    now = now or datetime.now(UTC)
    deadline = time.monotonic() + budget_seconds
    done = Swept()
    while time.monotonic() < deadline:
        with global_session() as session:
            due = repository.jobs_past_retention_sync(session, now, batch)
        if not due:
            done.finished = True
            break
        by_org: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
        for org_id, job_id, _days in due:
            by_org[org_id].append(job_id)
        before = done.jobs
        for org_id, job_ids in by_org.items():
            _expire(org_id, job_ids, now, done)
        if done.jobs == before:
            # Every due job was locked by another sweep or kept by a refused delete: the
            # next run tries again rather than spinning on the same rows.
            break
    if done.jobs:
        log.info("retention: expired %d jobs, %d objects deleted", done.jobs, done.objects)
    return done


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def lifecycle_rules(retention: list[tuple[uuid.UUID, int]], room: int) -> list[dict[str, Any]]:
    """One expiration rule per organization on its ``tenant`` tag; the shortest retentions
    first when there is not room for all."""
    chosen = sorted(retention, key=lambda r: (r[1], str(r[0])))[: max(room, 0)]
    return [
        {
            "ID": f"{RULE_PREFIX}{org_id}",
            "Status": "Enabled",
            "Filter": {"Tag": {"Key": "tenant", "Value": str(org_id)}},
            "Expiration": {"Days": days + LIFECYCLE_MARGIN_DAYS},
        }
        for org_id, days in sorted(chosen, key=lambda r: str(r[0]))
    ]


def _ours(rules: list[dict[str, Any]]) -> dict[str, int]:
    return {
        r["ID"]: int(r.get("Expiration", {}).get("Days", -1))
        for r in rules
        if str(r.get("ID", "")).startswith(RULE_PREFIX)
    }


def sync_lifecycle_rules() -> int | None:
    """Make the bucket's retention rules match the organizations' settings; the number of
    rules written, or None where the endpoint has no lifecycle support."""
    with global_session() as session:
        retention = repository.retention_by_org_sync(session)
    client = storage.s3_client()
    bucket = get_settings().s3_bucket
    try:
        current: list[dict[str, Any]] = client.get_bucket_lifecycle_configuration(Bucket=bucket)[
            "Rules"
        ]
    except ClientError as exc:
        if _error_code(exc) == "NoSuchLifecycleConfiguration":
            current = []
        elif _error_code(exc) in {"NotImplemented", "MethodNotAllowed", "AccessDenied"}:
            log.info("retention: no lifecycle rules on this endpoint (%s)", _error_code(exc))
            return None
        else:
            raise
    others = [r for r in current if not str(r.get("ID", "")).startswith(RULE_PREFIX)]
    wanted = lifecycle_rules(retention, MAX_RULES - len(others))
    if _ours(wanted) == _ours(current):
        return len(wanted)
    try:
        if others or wanted:
            client.put_bucket_lifecycle_configuration(
                Bucket=bucket, LifecycleConfiguration={"Rules": others + wanted}
            )
        else:
            client.delete_bucket_lifecycle(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) in {"NotImplemented", "MethodNotAllowed", "AccessDenied"}:
            log.info("retention: no lifecycle rules on this endpoint (%s)", _error_code(exc))
            return None
        raise
    return len(wanted)
