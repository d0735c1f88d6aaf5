"""Nothing lost: worker killed mid-job, Redis flushed, a noisy tenant, hostile uploads."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
import uuid
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from hiddenmodel import storage
from hiddenmodel.liveness import live_workers
from hiddenmodel.redis import sync_redis
from tests.conftest import Org, assert_problem, db_rows, db_scalar
from tests.factories import big_png, keyed_org, png, submit, wait_job, wait_status

pytestmark = pytest.mark.usefixtures("services")


async def _running_long_job(client: httpx.AsyncClient) -> tuple[Org, dict[str, str], str]:
    """A new organization's job that takes a worker seconds, once a worker is running it."""
    org, headers = await keyed_org(client)
    r = await submit(
        client, headers, image=big_png(), params={"width": 4800, "height": 4800, "mode": "fit"}
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    await wait_status(client, headers, job_id, "running")
    return org, headers, job_id


async def test_worker_killed_mid_job_completes_exactly_once(
    client: httpx.AsyncClient, services: Any
) -> None:
    org, headers, job_id = await _running_long_job(client)
    for worker in services.workers:
        worker.kill()
    services.workers = []
    services.start_worker()
    done = await wait_job(client, headers, job_id, timeout=90)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    keys = storage.list_keys(f"orgs/{org.id}/jobs/{job_id}/")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["image.png", "output.png"]
    row = db_rows("SELECT status, finished_at, outputs FROM jobs WHERE id = :j", j=job_id)[0]
    assert row[0] == "succeeded" and len(row[2]) == 1


async def test_a_pool_process_killed_mid_job_completes_exactly_once(
    client: httpx.AsyncClient, services: Any
) -> None:
    """`up` runs the CPU worker with pool processes: the one running a job dies (the kernel's
    OOM killer, say) while its parent lives on. Its liveness goes with it, so the job is
    handed back and runs again in another pool process, once, billed once."""
    services.stop_workers()
    try:
        services.start_worker("cpu,webhooks,maintenance", "--pool", "prefork", "--concurrency", "2")
        org, headers, job_id = await _running_long_job(client)
        holder = db_scalar("SELECT worker FROM jobs WHERE id = :j", j=job_id)
        # The pool process that claimed the job, as it announces itself; not its parent.
        (pid,) = [w.pid for w in await live_workers() if w.id == holder]
        assert pid is not None and pid != services.workers[0].process.pid
        os.kill(pid, signal.SIGKILL)

        done = await wait_job(client, headers, job_id, timeout=90)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2
        assert db_scalar("SELECT worker FROM jobs WHERE id = :j", j=job_id) != holder
        events = db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id)
        assert events == 1
        keys = storage.list_keys(f"orgs/{org.id}/jobs/{job_id}/")
        assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["image.png", "output.png"]
    finally:
        services.stop_workers()
        services.start_worker()


async def test_redis_flushall_loses_no_job(client: httpx.AsyncClient, services: Any) -> None:
    org, headers = await keyed_org(client)
    services.stop_workers()
    ids = [(await submit(client, headers)).json()["id"] for _ in range(50)]
    # Dispatched (or waiting in the outbox), none run: then Redis loses everything.
    await asyncio.sleep(0.5)
    sync_redis().flushall()
    services.start_worker()
    results = [await wait_job(client, headers, job_id, timeout=60) for job_id in ids]
    assert [r["status"] for r in results] == ["succeeded"] * 50
    assert (
        db_scalar(
            "SELECT count(*) FROM jobs WHERE organization_id = :o AND status = 'succeeded'",
            o=org.id,
        )
        == 50
    )


async def test_a_job_whose_input_is_gone_fails_at_once_unbilled(
    client: httpx.AsyncClient, services: Any
) -> None:
    """An input deleted after the submit (a development S3 that kept nothing across a
    restart) cannot come back: the job fails on its first attempt, not after retries."""
    org, headers = await keyed_org(client)
    services.stop_workers()
    job = (await submit(client, headers)).json()
    key = storage.object_key(uuid.UUID(org.id), uuid.UUID(job["id"]), "image", "png")
    assert storage.delete_objects([key]) == set()
    services.start_worker()
    done = await wait_job(client, headers, job["id"], timeout=60)
    assert done["status"] == "failed" and done["attempts"] == 1, done
    assert done["error"]["code"] == "input-missing"
    assert "submit the job again" in done["error"]["message"]
    assert db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job["id"]) == 0


async def test_a_noisy_tenant_does_not_starve_the_others(
    client: httpx.AsyncClient, services: Any
) -> None:
    noisy_org, noisy = await keyed_org(client)
    quiet = [await keyed_org(client) for _ in range(3)]
    services.stop_workers()
    image = png(16, 16)
    noisy_ids = [
        (await submit(client, noisy, image=image, params={"width": 8})).json()["id"]
        for _ in range(150)
    ]
    quiet_ids = [
        (await submit(client, headers, image=image, params={"width": 8})).json()["id"]
        for _, headers in quiet
        for _ in range(10)
    ]
    services.start_worker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = db_scalar(
            "SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
            "AND status NOT IN ('succeeded', 'failed')",
            ids=noisy_ids + quiet_ids,
        )
        if left == 0:
            break
        await asyncio.sleep(0.2)
    order = [
        str(r[0])
        for r in db_rows(
            "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) ORDER BY finished_at, id",
            ids=noisy_ids + quiet_ids,
        )
    ]
    assert len(order) == 180
    last_quiet = max(order.index(j) for j in quiet_ids)
    noisy_before = sum(1 for j in order[:last_quiet] if j in set(noisy_ids))
    # Round robin with a per-org cap: the quiet tenants' 30 jobs finish while the noisy one
    # has run only a fraction of its 150.
    assert noisy_before < 60, (noisy_before, last_quiet)
    assert (
        db_scalar(
            "SELECT count(*) FROM jobs WHERE organization_id = :o AND status = 'succeeded'",
            o=noisy_org.id,
        )
        == 150
    )


def _jpeg(mode: str, size: tuple[int, int], **save: Any) -> bytes:
    buf = io.BytesIO()
    color: Any = (0, 255, 255, 0) if mode == "CMYK" else (10, 200, 30)
    Image.new(mode, size, color).save(buf, "JPEG", **save)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (7000, 7000), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _animated_webp() -> bytes:
    buf = io.BytesIO()
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.new("RGB", (60, 30), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(buf, "PNG")
    return buf.getvalue()


REJECTED = {
    "decompression-bomb": (_bomb, 422),
    "truncated-png": (lambda: png(200, 200)[:300], 422),
    "text-named-png": (lambda: b"hello, I am not an image\n" * 10, 415),
    "zero-bytes": (lambda: b"", 422),
    "header-20000x20000": (lambda: _png_header(20000, 20000), 422),
    "animated-webp": (_animated_webp, 422),
}
ACCEPTED = {
    "cmyk-jpeg": (lambda: _jpeg("CMYK", (40, 30)), (40, 30)),
    "16-bit-png": (_png16, (30, 20)),
    "exif-rotated-jpeg": (_exif_rotated, (30, 60)),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
async def test_hostile_uploads_are_refused_and_leave_nothing(
    client: httpx.AsyncClient, case: str
) -> None:
    org, headers = await keyed_org(client)
    make, status = REJECTED[case]
    r = await submit(client, headers, files={"image": ("photo.png", make(), "image/png")})
    assert_problem(r, status)
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_hundred_megabytes_is_refused(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    body = b"\0" * (100 * 1024 * 1024)
    r = await submit(client, headers, files={"image": ("huge.png", body, "image/png")})
    assert_problem(r, 413, "image-too-large")
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_oversized_bodies_are_refused_before_they_are_read(
    client: httpx.AsyncClient,
) -> None:
    _, headers = await keyed_org(client)
    # Declared too large: refused on the header alone.
    r = await client.post(
        "/v1/orgs",
        content=b"{}" + b" " * (2 * 1024 * 1024),
        headers={**headers, "content-type": "application/json"},
    )
    assert_problem(r, 413, "payload-too-large")

    # Streamed without a length: refused once the count passes the limit.
    async def chunks() -> Any:
        for _ in range(40):
            yield b" " * 65536

    r = await client.post(
        "/v1/orgs", content=chunks(), headers={**headers, "content-type": "application/json"}
    )
    assert_problem(r, 413, "payload-too-large")


@pytest.mark.parametrize("case", sorted(ACCEPTED))
async def test_unusual_but_valid_uploads_work(client: httpx.AsyncClient, case: str) -> None:
    _, headers = await keyed_org(client)
    make, size = ACCEPTED[case]
    data = make()
    fmt = "jpeg" if "jpeg" in case else "png"
    r = await submit(
        client,
        headers,
        files={"image": (f"x.{fmt}", data, f"image/{fmt}")},
        params={"width": size[0], "height": size[1], "mode": "exact"},
    )
    assert r.status_code == 202, r.text
    done = await wait_job(client, headers, r.json()["id"])
    assert done["status"] == "succeeded", done
    out = Image.open(io.BytesIO(httpx.get(done["outputs"][0]["url"]).content))
    assert out.size == size and out.mode in ("RGB", "RGBA")
    if case == "exif-rotated-jpeg":
        # Orientation 6 rotates the red corner from top-left to top-right.
        r_, g, b = out.convert("RGB").getpixel((size[0] - 3, 3))
        assert r_ > 200 and g < 80 and b < 80
