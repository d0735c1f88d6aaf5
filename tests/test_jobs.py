"""Jobs end to end: API in process, real PostgreSQL, Redis, moto S3, Celery worker processes."""

from __future__ import annotations

import asyncio
import io
import json
import tempfile
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from hiddenmodel import storage
from hiddenmodel.api.app import UPLOAD_MEMORY_BYTES
from hiddenmodel.jobs import service
from tests.conftest import assert_problem, bearer, db_scalar, make_key, make_org
from tests.factories import keyed_org, png, submit, wait_job, wait_status
from tests.imagegen import raw_png

pytestmark = pytest.mark.usefixtures("services")


async def test_operations_are_listed(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/operations")
    ops = {o["name"]: o for o in r.json()}
    assert {"remove_background", "resize"} <= set(ops)
    assert ops["resize"]["queue"] == "cpu"
    assert ops["resize"]["params_schema"]["properties"]["mode"]["enum"] == ["fit", "fill", "exact"]


async def test_submit_run_download(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    r = await submit(
        client, headers, params={"width": 32, "height": 32, "mode": "fill", "format": "webp"}
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["inputs"]["image"] == {
        "format": "png",
        "width": 64,
        "height": 48,
        "bytes": len(png()),
    }
    done = await wait_job(client, headers, job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["attempts"] == 1
    output = done["outputs"][0]
    assert (output["name"], output["format"], output["width"], output["height"]) == (
        "output",
        "webp",
        32,
        32,
    )
    timings = done["timings"]
    assert timings["started_at"] and timings["finished_at"] and timings["compute_seconds"] > 0
    body = httpx.get(output["url"]).content
    assert Image.open(io.BytesIO(body)).size == (32, 32)
    # Stored under the org's prefix, tagged with tenant, job and kind.
    key = storage.object_key(uuid.UUID(org.id), uuid.UUID(job["id"]), "output", "webp")
    assert storage.object_tags(key) == {"tenant": org.id, "job": job["id"], "kind": "output"}
    input_key = key.replace("output.webp", "image.png")
    assert storage.object_tags(input_key)["kind"] == "image"
    r = await client.get(f"/v1/jobs/{job['id']}/outputs/output", headers=headers)
    assert r.status_code == 307 and r.headers["location"].startswith("http://127.0.0.1")


async def test_remove_background_with_caller_mask(client: httpx.AsyncClient) -> None:
    _, headers = await keyed_org(client)
    mask = io.BytesIO()
    m = Image.new("L", (64, 48), 0)
    m.paste(255, (16, 12, 48, 36))
    m.save(mask, "PNG")
    r = await submit(
        client,
        headers,
        operation="remove_background",
        params={"background": "transparent"},
        files={
            "image": ("a.png", png(), "image/png"),
            "mask": ("m.png", mask.getvalue(), "image/png"),
        },
    )
    assert r.status_code == 202, r.text
    done = await wait_job(client, headers, r.json()["id"])
    assert done["status"] == "succeeded", done
    out = Image.open(io.BytesIO(httpx.get(done["outputs"][0]["url"]).content))
    assert out.mode == "RGBA"
    assert out.getpixel((0, 0))[3] == 0 and out.getpixel((32, 24))[3] == 255


async def test_bad_requests_are_problems_and_store_nothing(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    cases = [
        ({"operation": "nope"}, 422, "unknown-operation"),
        ({"params": {"width": 0}}, 422, "invalid-params"),
        ({"params": {"mode": "fill", "width": 10}}, 422, "invalid-params"),
        ({"params": {"width": 10, "colour": "red"}}, 422, "invalid-params"),
        (
            {
                "operation": "remove_background",
                "params": {"background": "transparent", "format": "jpeg"},
            },
            422,
            "invalid-params",
        ),
    ]
    for kwargs, status, kind in cases:
        assert_problem(await submit(client, headers, **kwargs), status, kind)
    r = await client.post(
        "/v1/jobs",
        data={"operation": "resize", "params": "{not json"},
        files={"image": ("a.png", png(), "image/png")},
        headers=headers,
    )
    assert_problem(r, 422, "invalid-params")
    r = await client.post("/v1/jobs", data={"operation": "resize"}, headers=headers)
    assert_problem(r, 422, "validation-error")
    r = await submit(
        client,
        headers,
        files={"image": ("a.png", png(), "image/png"), "mask": ("m.png", png(10, 10), "image/png")},
        operation="remove_background",
        params={},
    )
    assert_problem(r, 422, "mask-size-mismatch")
    r = await submit(
        client,
        headers,
        files={"image": ("a.png", png(), "image/png"), "interior": ("i.png", png(), "image/png")},
    )
    assert_problem(r, 422, "unexpected-input")
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_inputs_are_stored_while_they_are_validated(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 put of an upload starts before its validation ends (it mostly waits on S3
    while the PNG walk inflates every row); an upload refused by that validation, or by a
    later check, still leaves no object and no row."""
    org, headers = await keyed_org(client)
    prefix = storage.org_prefix(uuid.UUID(org.id))
    put_started = threading.Event()
    real_put, real_inspect = storage.put_object, service.inspect_image
    seen_during_validation: list[bool] = []

    def put(*args: Any, **kwargs: Any) -> None:
        put_started.set()
        real_put(*args, **kwargs)

    def inspect(*args: Any, **kwargs: Any) -> Any:
        seen_during_validation.append(put_started.wait(5.0))
        return real_inspect(*args, **kwargs)

    monkeypatch.setattr(storage, "put_object", put)
    monkeypatch.setattr(service, "inspect_image", inspect)
    r = await submit(client, headers)
    assert r.status_code == 202, r.text
    assert seen_during_validation == [True]
    job_id = r.json()["id"]
    assert storage.list_keys(prefix) == [f"{prefix}jobs/{job_id}/image.png"]
    await wait_job(client, headers, job_id)

    # A PNG whose header is fine and whose rows are missing: stored, refused, deleted.
    put_started.clear()
    seen_during_validation.clear()
    r = await submit(client, headers, image=raw_png(64, 48))
    assert_problem(r, 422, "corrupt-image")
    assert seen_during_validation == [True]
    # Not a format the service takes: refused without a put.
    put_started.clear()
    r = await submit(client, headers, image=b"GIF89a" + bytes(64))
    assert r.status_code == 415, r.text
    assert not put_started.is_set()
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 1
    assert {key.split("/")[3] for key in storage.list_keys(prefix)} == {job_id}


async def test_a_refusal_wins_over_a_failed_put_and_leaves_nothing(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    org, headers = await keyed_org(client)
    real_put = storage.put_object

    def put(key: str, *args: Any, **kwargs: Any) -> None:
        if key.endswith("/mask.png"):
            raise ConnectionError("S3 went away")
        real_put(key, *args, **kwargs)

    monkeypatch.setattr(storage, "put_object", put)
    mask = png(10, 10)
    files = {"image": ("a.png", png(), "image/png"), "mask": ("m.png", mask, "image/png")}
    r = await submit(client, headers, files=files, operation="remove_background", params={})
    assert_problem(r, 422, "mask-size-mismatch")
    # Valid inputs and a failed put: no job, and the input that was stored is gone again.
    files["mask"] = ("m.png", png(), "image/png")
    with pytest.raises(ConnectionError):  # a 500 problem; the test client raises it instead
        await submit(client, headers, files=files, operation="remove_background", params={})
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
    assert storage.list_keys(storage.org_prefix(uuid.UUID(org.id))) == []


async def test_scopes_and_principals(client: httpx.AsyncClient) -> None:
    org = await make_org(client)
    read_only = await make_key(client, org, ["jobs:read"])
    assert_problem(await submit(client, bearer(read_only["key"])), 403, "missing-scope")
    assert_problem(await submit(client, org.owner.headers), 403, "api-key-required")
    assert_problem(await submit(client, {}), 401)


async def test_idempotency_key(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    h = {**headers, "Idempotency-Key": "order-123"}
    results = await asyncio.gather(*[submit(client, h) for _ in range(20)])
    assert all(r.status_code in (200, 202) for r in results), [r.text for r in results]
    ids = {r.json()["id"] for r in results}
    assert len(ids) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in results) == 19
    assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 1
    job_id = ids.pop()
    # Exactly one job's objects: no orphans from the losing requests.
    keys = storage.list_keys(storage.org_prefix(uuid.UUID(org.id)))
    assert {k.split("/")[3] for k in keys} == {job_id}
    r = await submit(client, h, params={"width": 16})
    assert_problem(r, 409, "idempotency-key-reused")
    await wait_job(client, headers, job_id)


async def test_prefer_wait(client: httpx.AsyncClient) -> None:
    _, headers = await keyed_org(client)
    r = await submit(client, {**headers, "Prefer": "wait=20"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert r.headers["preference-applied"] == "wait=20"


async def test_server_sent_events(client: httpx.AsyncClient) -> None:
    _, headers = await keyed_org(client)
    r = await submit(client, headers)
    job_id = r.json()["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        event = None
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                events.append((event, json.loads(line[6:])))
    assert events[-1][0] == "job" and events[-1][1]["status"] == "succeeded"
    assert any(e == "status" for e, _ in events)


async def test_list_filters_and_pagination(client: httpx.AsyncClient) -> None:
    _, headers = await keyed_org(client)
    ids = [(await submit(client, headers)).json()["id"] for _ in range(3)]
    for job_id in ids:
        await wait_job(client, headers, job_id)
    r = await client.get("/v1/jobs", params={"limit": 2}, headers=headers)
    page = r.json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    r = await client.get(
        "/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}, headers=headers
    )
    assert len(r.json()["items"]) == 1
    r = await client.get(
        "/v1/jobs", params={"status": "succeeded", "operation": "resize"}, headers=headers
    )
    assert {j["id"] for j in r.json()["items"]} == set(ids)
    r = await client.get("/v1/jobs", params={"status": "failed"}, headers=headers)
    assert r.json()["items"] == []
    assert_problem(await client.get("/v1/jobs", params={"status": "bogus"}, headers=headers), 422)


async def test_cancel_queued_and_finished(client: httpx.AsyncClient, services: Any) -> None:
    _, headers = await keyed_org(client)
    services.stop_workers()
    r = await submit(client, headers)
    job_id = r.json()["id"]
    r = await client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert_problem(
        await client.post(f"/v1/jobs/{job_id}/cancel", headers=headers), 409, "job-not-cancelable"
    )
    services.start_worker()
    # A job submitted after it runs once the worker is back: by then the canceled one, ahead
    # of it in the queue, would have run too had the cancel not held.
    later = (await submit(client, headers)).json()
    assert (await wait_job(client, headers, later["id"]))["status"] == "succeeded"
    body = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
    assert body["status"] == "canceled" and body["attempts"] == 0


async def test_queue_position_and_cancel_after(client: httpx.AsyncClient, services: Any) -> None:
    _, headers = await keyed_org(client)
    services.stop_workers()
    first = (await submit(client, headers)).json()
    second = (await submit(client, headers, data={"cancel_after": "1"})).json()
    assert first["queue_position"] == 0 and second["queue_position"] == 1
    await wait_status(client, headers, second["id"], "expired", timeout=15)
    services.start_worker()
    assert (await wait_job(client, headers, first["id"]))["status"] == "succeeded"


async def test_other_orgs_see_nothing(client: httpx.AsyncClient) -> None:
    org_a, headers_a = await keyed_org(client)
    _, headers_b = await keyed_org(client)
    job_id = (await submit(client, headers_a)).json()["id"]
    await wait_job(client, headers_a, job_id)
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/outputs/output"),
    ):
        assert_problem(await client.request(method, path, headers=headers_b), 404)
    listing = (await client.get("/v1/jobs", headers=headers_b)).text
    assert job_id not in listing and org_a.id not in listing
    # The storage layer refuses to sign another tenant's key even if asked.
    with pytest.raises(PermissionError):
        storage.presigned_get_url(f"orgs/{org_a.id}/jobs/{job_id}/output.png", uuid.uuid4())


@pytest.fixture(scope="module")
def live_api() -> Iterator[str]:
    """The API as its own process on a real socket (the ASGI test transport buffers a
    streamed body until it ends, so it cannot show that events arrive as they happen)."""
    from tests.conftest import _free_port
    from tests.services import hiddenmodel, wait_port

    port = _free_port()
    server = hiddenmodel("api-live", "api", "--port", str(port), "--workers", "1")
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


async def test_server_sent_events_arrive_while_the_job_waits(
    client: httpx.AsyncClient, services: Any, live_api: str
) -> None:
    _, headers = await keyed_org(client)
    services.stop_workers()  # the job stays queued until a worker comes back
    try:
        job_id = (await submit(client, headers)).json()["id"]
        seen: list[tuple[str, dict[str, Any]]] = []
        async with (
            httpx.AsyncClient(base_url=live_api, timeout=30) as real,
            real.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as stream,
        ):
            assert stream.headers["content-type"].startswith("text/event-stream")
            event = None
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    seen.append((event, json.loads(line[6:])))
                    if event == "status":
                        break
            # Delivered over the socket while the job is still queued.
            assert seen == [("status", {"status": "queued", "stage": None, "progress": 0.0})]
            assert db_scalar("SELECT status FROM jobs WHERE id = :j", j=job_id) == "queued"
            services.start_worker()
            async for line in lines:
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    seen.append((event, json.loads(line[6:])))
        assert [s["status"] for e, s in seen if e == "status"][-1] == "succeeded"
        assert seen[-1][0] == "job" and seen[-1][1]["status"] == "succeeded"
    finally:
        services.ensure_worker()


async def test_a_photo_of_a_few_megabytes_is_parsed_in_memory(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload below UPLOAD_MEMORY_BYTES never spills to a temporary file (past the spill,
    every chunk of the body went through the thread pool, a tenth of a submit's CPU)."""
    spilled: list[int] = []
    rollover = tempfile.SpooledTemporaryFile.rollover

    def counting_rollover(self: Any) -> None:
        spilled.append(self.tell())
        rollover(self)

    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", counting_rollover)
    noise = np.random.default_rng(3).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=1)
    photo = buf.getvalue()
    assert 2 * 1024 * 1024 < len(photo) < UPLOAD_MEMORY_BYTES

    _, headers = await keyed_org(client)
    r = await submit(client, headers, image=photo)
    assert r.status_code == 202, r.text
    assert spilled == []
    job = await wait_job(client, headers, r.json()["id"])
    assert job["status"] == "succeeded", job
