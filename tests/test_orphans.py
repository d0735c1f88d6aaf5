"""Input objects left by a submit that never committed are found and deleted; nothing else is."""

from __future__ import annotations

import uuid

import httpx
import pytest

from hiddenmodel import storage
from hiddenmodel.jobs import orphans
from hiddenmodel.redis import sync_redis
from tests.conftest import bearer, make_key, make_org
from tests.factories import png, submit, wait_job

pytestmark = pytest.mark.usefixtures("s3")


def _put(key: str, org_id: uuid.UUID) -> None:
    storage.put_object(key, png(), "image/png", org_id=org_id, job_id=uuid.uuid4(), kind="image")


@pytest.mark.usefixtures("services")
async def test_objects_of_jobs_that_do_not_exist_are_deleted(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    org_id = uuid.UUID(org.id)
    key = await make_key(client, org, ["jobs:read", "jobs:write"])
    r = await submit(client, bearer(key["key"]))
    assert r.status_code == 202, r.text
    # Finished, so its objects are all there before the sweep looks: its input and output.
    assert (await wait_job(client, bearer(key["key"]), r.json()["id"]))["status"] == "succeeded"
    kept = storage.list_keys(storage.org_prefix(org_id))
    assert len(kept) == 2
    # What a submit that died between the S3 put and the commit leaves behind.
    lost_job = uuid.uuid4()
    lost = [
        storage.object_key(org_id, lost_job, "image", "png"),
        storage.object_key(org_id, lost_job, "mask", "png"),
    ]
    for k in lost:
        _put(k, org_id)
    # Not a job object: not ours to judge.
    other = f"{storage.org_prefix(org_id)}exports/report.png"
    _put(other, org_id)
    prefix = storage.org_prefix(org_id)

    young = orphans.sweep_orphans(prefix=prefix, grace_seconds=3600, budget_seconds=30)
    assert young.finished and young.deleted == 0  # within the grace period

    swept = orphans.sweep_orphans(prefix=prefix, grace_seconds=0, budget_seconds=30, page_size=2)
    assert swept.finished and swept.deleted == 2
    # The real job's objects and the other object stay; the lost job's are gone.
    assert set(storage.list_keys(prefix)) == {*kept, other}
    assert sync_redis().get(orphans.cursor_key(prefix)) is None


async def test_a_sweep_resumes_where_its_budget_ran_out(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    org_id = uuid.UUID(org.id)
    prefix = storage.org_prefix(org_id)
    lost = sorted(storage.object_key(org_id, uuid.uuid4(), "image", "png") for _ in range(5))
    for k in lost:
        _put(k, org_id)
    first = orphans.sweep_orphans(prefix=prefix, grace_seconds=0, budget_seconds=0, page_size=2)
    assert (first.listed, first.deleted, first.finished) == (2, 2, False)
    assert sync_redis().get(orphans.cursor_key(prefix)) == lost[1].encode()
    rest = orphans.sweep_orphans(prefix=prefix, grace_seconds=0, budget_seconds=30, page_size=2)
    assert (rest.deleted, rest.finished) == (3, True)
    assert storage.list_keys(prefix) == []


def test_the_maintenance_task_sweeps_with_the_configured_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hiddenmodel.settings import get_settings
    from workers.tasks import maintenance

    calls: list[dict[str, object]] = []

    def fake(**kwargs: object) -> orphans.Sweep:
        calls.append(kwargs)
        return orphans.Sweep(listed=3, deleted=1, finished=True)

    monkeypatch.setattr(orphans, "sweep_orphans", fake)
    assert maintenance.sweep_orphans() == {"listed": 3, "deleted": 1, "finished": True}
    settings = get_settings()
    assert calls == [
        {
            "grace_seconds": settings.orphan_grace_seconds,
            "budget_seconds": settings.orphan_sweep_interval_seconds / 2,
        }
    ]
