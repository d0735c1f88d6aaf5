"""Batches end to end: API in process, real PostgreSQL, Redis, moto S3 and Celery workers."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import stat
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from hiddenmodel import storage
from hiddenmodel.settings import get_settings
from tests.conftest import Org, assert_problem, db_rows, db_scalar
from tests.factories import create_endpoint, keyed_org, png, set_overrides, submit, wait_job
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.usefixtures("services")


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], *, deflate: bool = True) -> bytes:
    buf = io.BytesIO()
    kind = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=kind) as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return buf.getvalue()


def manifest(rows: list[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image", "params"])
    for row in rows:
        writer.writerow([row["image"], json.dumps(row["params"]) if row.get("params") else ""])
    return out.getvalue().encode()


async def create_batch(
    client: httpx.AsyncClient, headers: dict[str, str], **body: Any
) -> dict[str, Any]:
    payload = {"operation": "resize", "params": {"width": 32}, **body}
    r = await client.post("/v1/batches", json=payload, headers=headers)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/batches/{r.json()['id']}"
    created: dict[str, Any] = r.json()
    return created


async def add_zip(
    client: httpx.AsyncClient, headers: dict[str, str], batch_id: str, data: bytes
) -> httpx.Response:
    return await client.post(
        f"/v1/batches/{batch_id}/items",
        files={"archive": ("shoot.zip", data, "application/zip")},
        headers=headers,
    )


async def wait_batch(
    client: httpx.AsyncClient, headers: dict[str, str], batch_id: str, timeout: float = 90.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/batches/{batch_id}", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] in ("completed", "canceled"):
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end: {body}")


def stored_batch_objects(org: Org) -> list[str]:
    return storage.list_keys(f"orgs/{org.id}/batches/")


def truncated_png() -> bytes:
    return png(40, 30)[:60]


async def test_zip_with_manifest_runs_to_the_end_and_archives_every_output(
    client: httpx.AsyncClient, receiver: Receiver
) -> None:
    org, headers = await keyed_org(client)
    await create_endpoint(client, org, receiver.url("batches"), event_types=["batch.completed"])
    rows: list[dict[str, Any]] = []
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = []
    for i in range(48):
        name = f"shoot/sku{i:02d}_{'front' if i % 2 else 'back'}.png"
        width = 16 + (i % 3) * 8
        rows.append({"image": name, "params": {"width": width} if i % 3 else {}})
        entries.append((name, png(64, 48, (i * 5, 100, 200))))
    for name in ("shoot/broken_a.png", "shoot/broken_b.png"):
        rows.append({"image": name})
        entries.append((name, truncated_png()))
    entries.append(("manifest.csv", manifest(rows)))
    entries.append(("__MACOSX/shoot/._sku00_back.png", b"\x00\x05\x16\x07"))

    batch = await create_batch(client, headers, name="Autumn shoot", webhook_tag="po-4711")
    r = await add_zip(client, headers, batch["id"], make_zip(entries))
    assert r.status_code == 201, r.text
    added = r.json()
    assert (added["added"], added["rejected"]) == (50, 2)
    assert added["batch"]["counts"]["pending"] == 48
    assert added["batch"]["status"] == "open"

    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "submitted"
    assert db_scalar("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch["id"]) == 48

    done = await wait_batch(client, headers, batch["id"])
    assert done["status"] == "completed"
    assert done["counts"]["succeeded"] == 48
    assert done["counts"]["rejected"] == 2
    assert done["progress"] == 1.0
    assert done["compute_seconds"] > 0
    assert done["finished_at"] is not None

    # One batch.completed event, with the caller's tag.
    events = await receiver.wait("batches", 1)
    payload = events[0].json()
    assert payload["type"] == "batch.completed"
    assert payload["data"]["id"] == batch["id"]
    assert payload["data"]["webhook_tag"] == "po-4711"
    assert payload["data"]["counts"] == {"succeeded": 48}
    # Emitted once however often the batch was read since: one delivery row, one request.
    assert (
        db_scalar(
            "SELECT count(*) FROM webhook_deliveries WHERE event_type = 'batch.completed' "
            "AND payload -> 'data' ->> 'id' = :b",
            b=batch["id"],
        )
        == 1
    )
    assert len(receiver.received("batches")) == 1

    r = await client.get(f"/v1/batches/{batch['id']}/archive", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    assert 'filename="Autumn-shoot.zip"' in r.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(r.content))
    assert archive.testzip() is None
    listing = list(csv.DictReader(io.StringIO(archive.read("items.csv").decode())))
    assert len(listing) == 50
    by_name = {row["name"]: row for row in listing}
    for i, row in enumerate(rows[:48]):
        item = by_name[row["image"]]
        assert item["status"] == "succeeded", item
        out_name = row["image"].removesuffix(".png") + ".png"
        assert item["files"] == out_name
        expected_width = 16 + (i % 3) * 8 if i % 3 else 32
        with Image.open(io.BytesIO(archive.read(out_name))) as image:
            assert image.width == expected_width
    for name in ("shoot/broken_a.png", "shoot/broken_b.png"):
        assert by_name[name]["status"] == "rejected"
        assert by_name[name]["error_code"] == "corrupt-image"
        assert by_name[name]["files"] == ""
    assert sorted(archive.namelist()) == sorted(["items.csv", *(r["image"] for r in rows[:48])])

    r = await client.get(f"/v1/batches/{batch['id']}/items?limit=5", headers=headers)
    page = r.json()
    assert [i["position"] for i in page["items"]] == [0, 1, 2, 3, 4]
    assert all(i["status"] == "succeeded" and i["job_id"] for i in page["items"])
    r = await client.get(f"/v1/jobs/{page['items'][0]['job_id']}", headers=headers)
    assert r.json()["batch_id"] == batch["id"]
    r = await client.get(f"/v1/batches/{batch['id']}/items?cursor=45&limit=10", headers=headers)
    tail = r.json()["items"]
    assert [i["status"] for i in tail] == ["succeeded"] * 3 + ["rejected"] * 2
    assert tail[-1]["error"]["code"] == "corrupt-image"


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def encrypted_zip(name: str, data: bytes) -> bytes:
    """A one-member ZIP whose member is marked encrypted (zipfile writes no such thing)."""
    raw = bytearray(make_zip([(name, data)]))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.index(signature) + offset
        raw[at] |= 0x1
    return bytes(raw)


HOSTILE: dict[str, tuple[list[tuple[str | zipfile.ZipInfo, bytes]], int, str, str]] = {
    "traversal": ([("ok.png", png()), ("../../etc/x.png", png())], 422,
                  "archive-path-traversal", "../../etc/x.png"),
    "traversal-inside": ([("a/../../x.png", png())], 422, "archive-path-traversal",
                         "a/../../x.png"),
    "absolute": ([("/etc/passwd.png", png())], 422, "archive-absolute-path", "/etc/passwd.png"),
    "drive": ([("C:/x.png", png())], 422, "archive-absolute-path", "C:/x.png"),
    "backslash": ([("..\\x.png", png())], 422, "archive-unsafe-name", "..\\x.png"),
    "symlink": ([("ok.png", png()), (_symlink("link.png"), b"/etc/passwd")], 422,
                "archive-symlink", "link.png"),
    "nested-by-name": ([("inner.zip", make_zip([("a.png", png())]))], 422, "archive-nested",
                       "inner.zip"),
    "nested-by-content": ([("inner.png", make_zip([("a.png", png())]))], 422,
                          "archive-nested", "inner.png"),
    "duplicate": ([("a.png", png()), ("A.PNG", png())], 422, "archive-duplicate-name", "A.PNG"),
    "ratio-bomb": ([("bomb.png", b"\x89PNG\r\n\x1a\n" + bytes(8 * 1024 * 1024))], 413,
                   "archive-bomb", "bomb.png"),
    "not-an-image-by-name": ([("notes.txt", b"hello")], 422, "archive-member-not-image",
                             "notes.txt"),
    "not-an-image-by-content": ([("ok.png", png()), ("fake.jpg", b"MZ\x90\x00 not a photo")],
                                422, "archive-member-not-image", "fake.jpg"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_zip_is_refused_naming_the_entry_and_nothing_is_stored(
    client: httpx.AsyncClient, case: str
) -> None:
    entries, status_, kind, entry = HOSTILE[case]
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    r = await add_zip(client, headers, batch["id"], make_zip(entries))
    assert_problem(r, status_, kind)
    assert r.json()["entry"] == entry
    assert entry in r.json()["detail"]
    assert stored_batch_objects(org) == []
    assert db_scalar("SELECT count(*) FROM batch_items WHERE batch_id = :b", b=batch["id"]) == 0


async def test_encrypted_member_is_refused(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    r = await add_zip(client, headers, batch["id"], encrypted_zip("secret.png", png()))
    assert_problem(r, 422, "archive-encrypted")
    assert r.json()["entry"] == "secret.png"
    r = await add_zip(client, headers, batch["id"], b"PK\x03\x04 this is no archive")
    assert_problem(r, 422, "archive-invalid")
    assert stored_batch_objects(org) == []


@pytest.fixture
def small_zip_limits() -> Iterator[None]:
    settings = get_settings()
    saved = (settings.zip_max_entries, settings.zip_max_total_bytes)
    settings.zip_max_entries, settings.zip_max_total_bytes = 3, 3 * len(png()) + 10
    try:
        yield
    finally:
        settings.zip_max_entries, settings.zip_max_total_bytes = saved


@pytest.mark.usefixtures("small_zip_limits")
async def test_too_many_entries_and_too_many_bytes_are_refused(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    many = make_zip([(f"p{i}.png", png()) for i in range(4)])
    r = await add_zip(client, headers, batch["id"], many)
    assert_problem(r, 413, "archive-too-many-entries")
    assert r.json()["entry"] == "p3.png"
    # Three members, but the third is larger: the total is crossed there, while streaming
    # is not even needed (the directory already says so).
    big = make_zip([("a.png", png()), ("b.png", png()), ("c.png", png(128, 96))])
    r = await add_zip(client, headers, batch["id"], big)
    assert_problem(r, 413, "archive-too-large")
    assert r.json()["entry"] == "c.png"
    assert stored_batch_objects(org) == []


async def test_refusal_after_photos_were_stored_deletes_them(client: httpx.AsyncClient) -> None:
    """The bad member comes after good ones that were already put in S3: all are removed."""
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [(f"good{i}.png", png()) for i in range(5)]
    entries.append(("zz-not-a-photo.png", b"GIF89a definitely not accepted here"))
    r = await add_zip(client, headers, batch["id"], make_zip(entries))
    assert_problem(r, 422, "archive-member-not-image")
    assert r.json()["entry"] == "zz-not-a-photo.png"
    assert stored_batch_objects(org) == []
    assert db_scalar("SELECT count(*) FROM batch_items WHERE batch_id = :b", b=batch["id"]) == 0


async def test_manifest_mistakes_name_the_row(client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    cases = [
        ([("a.png", png()), ("manifest.csv", b"image,params\nmissing.png,\n")],
         "manifest-invalid", "row 2"),
        ([("a.png", png()), ("manifest.csv", b"image,params\na.png,\"{\"\"width\"\": -3}\"\n")],
         "invalid-params", "row 2"),
        ([("a.png", png()), ("b.png", png()), ("manifest.csv", b"image\na.png\n")],
         "manifest-unreferenced-member", "b.png"),
        ([("a.png", png()), ("m.png", png()), ("manifest.csv", b"image,mask\na.png,m.png\n")],
         "manifest-invalid", "row 2"),
        ([("a.png", png()), ("manifest.csv", b"photo\na.png\n")], "manifest-invalid", "header"),
    ]  # fmt: skip
    for entries, kind, entry in cases:
        r = await add_zip(client, headers, batch["id"], make_zip(entries))
        assert_problem(r, 422, kind)
        assert r.json()["entry"] == entry, r.json()
    assert stored_batch_objects(org) == []


async def test_files_with_manifest_masks_and_interior_frames(client: httpx.AsyncClient) -> None:
    """Multipart: many files, a manifest pairing each photo with its mask and interior."""
    org, headers = await keyed_org(client)
    batch = await create_batch(
        client, headers, operation="ghost_mannequin", params={"size": 256, "steps": 2}
    )
    sheet = (
        b"image,mask,interior,params\n"
        b'front.png,front_mask.png,front_neck.png,"{""seed"": 3}"\n'
        b"back.png,back_mask.png,,\n"
    )
    files = [
        ("files", ("front.png", png(64, 48), "image/png")),
        ("files", ("front_mask.png", png(64, 48, (255, 255, 255)), "image/png")),
        ("files", ("front_neck.png", png(40, 40), "image/png")),
        ("files", ("back.png", png(64, 48), "image/png")),
        ("files", ("back_mask.png", png(32, 32), "image/png")),  # the wrong size
        ("manifest", ("manifest.csv", sheet, "text/csv")),
    ]
    r = await client.post(f"/v1/batches/{batch['id']}/items", files=files, headers=headers)
    assert r.status_code == 201, r.text
    assert (r.json()["added"], r.json()["rejected"]) == (2, 1)
    items = db_rows(
        "SELECT name, inputs, params, error_code FROM batch_items WHERE batch_id = :b "
        "ORDER BY position",
        b=batch["id"],
    )
    front, back = items
    assert front.name == "front.png" and set(front.inputs) == {"image", "mask", "interior"}
    assert front.inputs["interior"]["filename"] == "front_neck.png"
    assert front.params["seed"] == 3 and front.params["size"] == 256
    assert back.error_code == "mask-size-mismatch" and back.inputs == {}
    assert sorted(k.rsplit("/", 1)[1] for k in stored_batch_objects(org)) == [
        "image.png",
        "interior.png",
        "mask.png",
    ]
    # Adding the same name again is refused; nothing more is stored.
    r = await client.post(
        f"/v1/batches/{batch['id']}/items",
        files=[("files", ("front.png", png(), "image/png"))],
        headers=headers,
    )
    assert_problem(r, 409, "batch-item-exists")
    assert len(stored_batch_objects(org)) == 3
    # Canceling an open batch deletes what it stored.
    r = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert stored_batch_objects(org) == []


async def _batch_of(
    client: httpx.AsyncClient, headers: dict[str, str], count: int, **body: Any
) -> dict[str, Any]:
    batch = await create_batch(client, headers, **body)
    data = make_zip([(f"p{i:04d}.png", png(24, 16)) for i in range(count)])
    r = await add_zip(client, headers, batch["id"], data)
    assert r.status_code == 201, r.text
    return batch


async def test_a_batch_that_does_not_fit_is_refused_whole_with_its_numbers(
    client: httpx.AsyncClient,
) -> None:
    org, headers = await keyed_org(client)
    set_overrides(org, monthly_images=6)
    r = await submit(client, headers)  # one image reserved or used before the batch
    assert r.status_code == 202, r.text
    batch = await _batch_of(client, headers, 6)

    r = await client.post(f"/v1/batches/{batch['id']}/submit?dry_run=true", headers=headers)
    assert_problem(r, 429, "quota-exceeded")
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert_problem(r, 429, "quota-exceeded")
    body = r.json()
    assert body["limit"] == "monthly_images"
    assert body["limit_value"] == 6
    assert body["requested"] == 6  # the whole batch, not the one item that tipped it over
    assert body["used"] + body["reserved"] == 1
    assert "Retry-After" in r.headers
    assert db_scalar("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch["id"]) == 0
    assert db_scalar("SELECT status FROM batches WHERE id = :b", b=batch["id"]) == "open"
    reserved = db_scalar(
        "SELECT images_reserved + images_used FROM quota_counters WHERE organization_id = :o "
        "AND subject_type = 'org' AND period <> DATE '1970-01-01'",
        o=org.id,
    )
    assert reserved == 1

    # With room, the dry run quotes the whole batch and admits nothing.
    set_overrides(org, monthly_images=7)
    r = await client.post(f"/v1/batches/{batch['id']}/submit?dry_run=true", headers=headers)
    assert r.status_code == 200, r.text
    quote = r.json()
    assert quote["dry_run"] is True and quote["items"] == 6
    assert quote["estimate"]["images"] == 6
    assert quote["price"]["currency"]
    assert db_scalar("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch["id"]) == 0
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert r.status_code == 202, r.text
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert_problem(r, 409, "batch-not-open")


async def test_cancel_mid_batch(client: httpx.AsyncClient, receiver: Receiver) -> None:
    org, headers = await keyed_org(client)
    await create_endpoint(client, org, receiver.url("canceled"), event_types=["batch.completed"])
    # One job at a time, so most of the batch is still queued when it is canceled.
    set_overrides(org, max_running_jobs=1)
    batch = await _batch_of(client, headers, 30)
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = (await client.get(f"/v1/batches/{batch['id']}", headers=headers)).json()
        if counts["counts"]["succeeded"] >= 1:
            break
        await asyncio.sleep(0.05)
    r = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json()["cancel_requested"] is True
    done = await wait_batch(client, headers, batch["id"])
    assert done["status"] == "canceled"
    counts = done["counts"]
    assert counts["queued"] == counts["running"] == 0
    assert counts["succeeded"] >= 1
    assert counts["canceled"] >= 20
    assert counts["succeeded"] + counts["canceled"] + counts["failed"] == 30
    payload = (await receiver.wait("canceled", 1))[0].json()
    assert payload["data"]["status"] == "canceled"
    # Canceled jobs released their reservations: nothing stays reserved.
    assert (
        db_scalar(
            "SELECT images_reserved FROM quota_counters WHERE organization_id = :o "
            "AND subject_type = 'org' AND period <> DATE '1970-01-01'",
            o=org.id,
        )
        == 0
    )
    r = await client.post(f"/v1/batches/{batch['id']}/cancel", headers=headers)
    assert_problem(r, 409, "batch-not-cancelable")


async def test_a_large_batch_does_not_starve_another_tenants_single_job(
    client: httpx.AsyncClient,
) -> None:
    org_a, headers_a = await keyed_org(client)
    _org_b, headers_b = await keyed_org(client)
    batch = await _batch_of(client, headers_a, 200)
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers_a)
    assert r.status_code == 202, r.text
    # Tenant B's one job arrives after all 200 of A's are queued.
    r = await submit(client, headers_b)
    assert r.status_code == 202, r.text
    job = await wait_job(client, headers_b, r.json()["id"], timeout=60)
    assert job["status"] == "succeeded"
    ended_before_b = db_scalar(
        "SELECT count(*) FROM jobs WHERE batch_id = :b AND finished_at <= CAST(:t AS timestamptz)",
        b=batch["id"],
        t=job["timings"]["finished_at"],
    )
    # B waited for a few of A's jobs (those already in flight), not for A's batch.
    assert ended_before_b < 25, ended_before_b
    view = (await client.get(f"/v1/batches/{batch['id']}", headers=headers_a)).json()
    assert view["status"] == "submitted"
    assert view["eta"] is not None and view["eta"]["seconds"] > 0
    done = await wait_batch(client, headers_a, batch["id"], timeout=180)
    assert done["counts"]["succeeded"] == 200
    assert org_a.id != _org_b.id


async def test_other_organizations_see_no_batch(client: httpx.AsyncClient) -> None:
    _org, headers = await keyed_org(client)
    _other, other_headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    for path in ("", "/items", "/archive"):
        r = await client.get(f"/v1/batches/{batch['id']}{path}", headers=other_headers)
        assert_problem(r, 404, "batch-not-found")
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=other_headers)
    assert_problem(r, 404, "batch-not-found")
    listed = (await client.get("/v1/batches", headers=other_headers)).json()["items"]
    assert listed == []
    r = await client.post(f"/v1/batches/{batch['id']}/submit", headers=headers)
    assert_problem(r, 422, "batch-empty")
    r = await client.post(
        "/v1/batches", json={"operation": "resize", "params": {"width": -1}}, headers=headers
    )
    assert_problem(r, 422, "invalid-params")


async def test_zip_made_by_the_zipfile_command_line(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """The README's recipe: folders as directory entries, a manifest at the top."""
    org, headers = await keyed_org(client)
    shoot = tmp_path / "shoot"
    shoot.mkdir()
    (shoot / "sku1.png").write_bytes(png())
    (shoot / "sku2.png").write_bytes(png())
    (tmp_path / "manifest.csv").write_text(
        'image,params\nshoot/sku1.png,\nshoot/sku2.png,"{""width"":16}"\n'
    )
    subprocess.run(
        [sys.executable, "-m", "zipfile", "-c", "shoot.zip", "shoot", "manifest.csv"],
        cwd=tmp_path,
        check=True,
    )
    batch = await create_batch(client, headers)
    r = await add_zip(client, headers, batch["id"], (tmp_path / "shoot.zip").read_bytes())
    assert r.status_code == 201, r.text
    assert r.json()["added"] == 2
    names = db_rows(
        "SELECT name, params FROM batch_items WHERE batch_id = :b ORDER BY position",
        b=batch["id"],
    )
    assert [(n.name, n.params["width"]) for n in names] == [
        ("shoot/sku1.png", 32),
        ("shoot/sku2.png", 16),
    ]
    assert len(stored_batch_objects(org)) == 2


async def test_photos_of_items_that_were_never_recorded_are_swept(
    client: httpx.AsyncClient,
) -> None:
    """An API that died between storing an upload and recording its items leaves photos
    that no item owns: the orphan sweep deletes them and keeps every item's."""
    from hiddenmodel.jobs import orphans

    org, headers = await keyed_org(client)
    batch = await _batch_of(client, headers, 2)
    kept = stored_batch_objects(org)
    assert len(kept) == 2
    lost = f"orgs/{org.id}/batches/{batch['id']}/{uuid.uuid4()}/image.png"
    storage.put_object(
        lost, png(), "image/png", org_id=uuid.UUID(org.id), job_id=uuid.uuid4(), kind="image"
    )
    prefix = storage.org_prefix(uuid.UUID(org.id))
    swept = orphans.sweep_orphans(prefix=prefix, grace_seconds=0, budget_seconds=30)
    assert swept.finished and swept.deleted == 1
    assert stored_batch_objects(org) == kept


async def test_a_member_whose_header_lies_about_its_size_is_refused(
    client: httpx.AsyncClient,
) -> None:
    """The directory claims 100 bytes for 8 MiB of zeros (a ratio the directory check would
    pass): unpacking stops at the claim and the member is refused, nothing stored."""
    raw = bytearray(make_zip([("ok.png", png()), ("liar.png", bytes(8 * 1024 * 1024))]))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.rindex(signature) + offset
        raw[at : at + 4] = (100).to_bytes(4, "little")
    org, headers = await keyed_org(client)
    batch = await create_batch(client, headers)
    r = await add_zip(client, headers, batch["id"], bytes(raw))
    assert_problem(r, 422, "archive-member-corrupt")
    assert r.json()["entry"] == "liar.png"
    assert stored_batch_objects(org) == []
