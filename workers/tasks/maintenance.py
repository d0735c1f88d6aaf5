"""Celery entry points of maintenance: thin; the sweeps live in their domains
(hiddenmodel.jobs.orphans, hiddenmodel.retention.sweep)."""

from __future__ import annotations

from typing import Any

from hiddenmodel.jobs import orphans
from hiddenmodel.retention import sweep as retention_sweep
from hiddenmodel.settings import get_settings
from workers.celery_app import app


@app.task(name="maintenance.sweep_orphans", acks_late=True)  # type: ignore[untyped-decorator]
def sweep_orphans() -> dict[str, Any]:
    """Delete input objects whose submit never committed (see hiddenmodel.jobs.orphans)."""
    settings = get_settings()
    done = orphans.sweep_orphans(
        grace_seconds=settings.orphan_grace_seconds,
        # Within one interval: a run never overlaps the next.
        budget_seconds=settings.orphan_sweep_interval_seconds / 2,
    )
    return {"listed": done.listed, "deleted": done.deleted, "finished": done.finished}


@app.task(name="maintenance.expire_outputs", acks_late=True)  # type: ignore[untyped-decorator]
def expire_outputs() -> dict[str, Any]:
    """Delete the objects of jobs past their organization's retention, mark the jobs
    expired, and keep the bucket's lifecycle rules in step (see hiddenmodel.retention)."""
    budget = get_settings().retention_sweep_interval_seconds / 2
    rules = retention_sweep.sync_lifecycle_rules()
    done = retention_sweep.expire_due_jobs(budget_seconds=budget)
    return {
        "jobs": done.jobs,
        "objects": done.objects,
        "refused": done.refused,
        "finished": done.finished,
        "lifecycle_rules": rules,
    }
