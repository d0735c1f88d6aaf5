"""The portal's batch page over HTTP: the upload form creates and submits a batch through the
batch services the API uses, with Celery workers running the items; refusals are shown next
to their fields with nothing stored; roles and organizations are kept apart."""

from __future__ import annotations

import io
import re
import zipfile
from typing import Any

import httpx
import pytest

from hiddenmodel import storage
from tests.conftest import Org, db_rows, db_scalar, make_org
from tests.factories import keyed_org, png, set_overrides
from tests.polling import until
from tests.portal_http import add_member, csrf_of, portal_client

pytestmark = pytest.mark.usefixtures("services")

FORM_ONCE = re.compile(r'name="form_once" value="([^"]+)"')


async def post_batch(
    browser: httpx.AsyncClient,
    org_id: str,
    files: list[tuple[str, tuple[str, bytes, str]]],
    **fields: str,
) -> httpx.Response:
    """Post the upload form as a browser does after loading the page."""
    page = await browser.get(f"/portal/orgs/{org_id}/batches")
    assert page.status_code == 200, page.text
    once = FORM_ONCE.search(page.text)
    assert once
    data = {
        "csrf_token": csrf_of(page.text),
        "form_once": once.group(1),
        "operation": "resize",
        "params.resize.width": "32",
        **fields,
    }
    return await browser.post(f"/portal/orgs/{org_id}/batches", data=data, files=files)


def photo(name: str, color: tuple[int, int, int]) -> tuple[str, tuple[str, bytes, str]]:
    return ("photos", (name, png(96, 72, color), "image/png"))


def stored(org: Org) -> list[str]:
    return storage.list_keys(f"orgs/{org.id}/batches/")


def batch_count(org: Org) -> int:
    return int(db_scalar("SELECT count(*) FROM batches WHERE organization_id = :o", o=org.id))


async def test_a_member_uploads_two_photos_and_gets_every_result(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    member = await add_member(client, org, "member")
    base = f"/portal/orgs/{org.id}"
    async with portal_client(app, member) as browser:
        page = await browser.get(f"{base}/batches")
        assert page.status_code == 200
        # A plain multipart form: a file input for many files, every input labelled, the
        # params of every operation generated from its schema, no inline script.
        assert 'enctype="multipart/form-data"' in page.text
        assert re.search(r'<input id="b-photos" name="photos" type="file" multiple', page.text)
        for input_id in re.findall(r'<(?:input|select) id="([^"]+)"', page.text):
            assert f'for="{input_id}"' in page.text, input_id
        for field in ("params.resize.width", "params.resize.mode", "params.ghost_mannequin.steps"):
            assert f'name="{field}"' in page.text, field
        assert 'max="6000"' in page.text  # the schema's bounds, on the input
        assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text) is None
        assert f'href="{base}/batches"' in page.text

        r = await post_batch(
            browser,
            org.id,
            [photo("red.png", (200, 30, 30)), photo("blue.png", (30, 30, 200))],
            name="spring shoot",
            **{"params.resize.mode": "fit"},
        )
        assert r.status_code == 303, r.text
        batch_id = r.headers["location"].rsplit("/", 1)[-1]
        assert r.headers["location"] == f"{base}/batches/{batch_id}"

        # Created with both photos, submitted: each item became a job of the batch.
        row = db_rows(
            "SELECT status, name, operation, params, user_id FROM batches WHERE id = :b",
            b=batch_id,
        )[0]
        assert row.status in ("submitted", "completed")
        assert (row.name, row.operation, row.params) == (
            "spring shoot",
            "resize",
            {"width": 32, "mode": "fit"},
        )
        assert str(row.user_id) == member.id
        jobs = db_rows(
            "SELECT i.name, j.status FROM batch_items i JOIN jobs j ON j.id = i.job_id "
            "WHERE i.batch_id = :b ORDER BY i.position",
            b=batch_id,
        )
        assert [j.name for j in jobs] == ["red.png", "blue.png"]

        async def ended() -> dict[str, Any] | None:
            r = await browser.get(f"{base}/batches/{batch_id}/summary")
            assert r.status_code == 200
            body: dict[str, Any] = r.json()
            return body if body["status"] == "completed" else None

        summary = await until(ended, timeout=60, what="the batch's end")
        assert summary["counts"]["succeeded"] == 2 and summary["progress"] == 1.0

        # Each result beside its input, with a link to download it.
        page = await browser.get(f"{base}/batches/{batch_id}")
        assert page.status_code == 200
        for name in ("red.png", "blue.png"):
            assert f'alt="input {name}"' in page.text
            assert f'alt="output of {name}"' in page.text
        assert page.text.count(">download</a>") == 2
        assert f'href="{base}/batches/{batch_id}/archive"' in page.text

        # All of them as the batch's ZIP.
        r = await browser.get(f"{base}/batches/{batch_id}/archive")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        assert 'filename="spring-shoot.zip"' in r.headers["content-disposition"]
        with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
            assert sorted(archive.namelist()) == ["blue.png", "items.csv", "red.png"]

        # The list: the batch with its counts by status.
        listing = await browser.get(f"{base}/batches")
        assert f'data-batch="{batch_id}"' in listing.text
        assert "succeeded 2" in listing.text


async def test_one_zip_with_its_manifest_through_the_form(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    shoot = io.BytesIO()
    with zipfile.ZipFile(shoot, "w") as archive:
        archive.writestr("shoot/a.png", png(96, 72, (200, 30, 30)))
        archive.writestr("shoot/b.png", png(96, 72, (30, 30, 200)))
        archive.writestr(
            "manifest.csv", 'image,params\nshoot/a.png,\nshoot/b.png,"{""width"":16}"\n'
        )
    async with portal_client(app, org.owner) as browser:
        # The ZIP names its own masks: masks beside it are refused, nothing stored.
        r = await post_batch(
            browser,
            org.id,
            [
                ("photos", ("shoot.zip", shoot.getvalue(), "application/zip")),
                ("masks", ("a.png", png(96, 72), "image/png")),
            ],
        )
        assert r.status_code == 422 and 'id="masks-error"' in r.text
        assert batch_count(org) == 0
        r = await post_batch(
            browser, org.id, [("photos", ("shoot.zip", shoot.getvalue(), "application/zip"))]
        )
        assert r.status_code == 303, r.text
    batch_id = r.headers["location"].rsplit("/", 1)[-1]
    items = db_rows(
        "SELECT name, params FROM batch_items WHERE batch_id = :b ORDER BY position", b=batch_id
    )
    assert [(i.name, i.params["width"]) for i in items] == [
        ("shoot/a.png", 32),
        ("shoot/b.png", 16),
    ]
    assert db_scalar("SELECT count(*) FROM jobs WHERE batch_id = :b", b=batch_id) == 2


async def test_a_bad_upload_is_refused_next_to_its_field_with_nothing_stored(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    async with portal_client(app, org.owner) as browser:
        # Not an image among the photos.
        r = await post_batch(
            browser,
            org.id,
            [photo("red.png", (200, 30, 30)), ("photos", ("notes.txt", b"hello", "text/plain"))],
        )
        assert r.status_code == 422, r.text
        assert 'id="b-photos" name="photos" type="file" multiple' in r.text
        assert 'aria-invalid="true" aria-describedby="photos-error"' in r.text
        error = re.search(r'<p class="field-error" id="photos-error"[^>]*>([^<]+)</p>', r.text)
        assert error and "notes.txt" in error.group(1)

        # A mask that goes with no photo.
        r = await post_batch(
            browser,
            org.id,
            [photo("red.png", (200, 30, 30)), ("masks", ("green.png", png(96, 72), "image/png"))],
            operation="remove_background",
        )
        assert r.status_code == 422
        error = re.search(r'id="masks-error"[^>]*>([^<]+)</p>', r.text)
        assert error and "green.png" in error.group(1)

        # Params the operation's schema refuses: shown at that param, as typed.
        r = await post_batch(
            browser, org.id, [photo("red.png", (200, 30, 30))], **{"params.resize.width": "0"}
        )
        assert r.status_code == 422
        assert 'id="params.resize.width-error"' in r.text
        assert re.search(r'name="params.resize.width"[^>]*value="0"', r.text)

        # No photo at all.
        r = await post_batch(browser, org.id, [("photos", ("", b"", "application/octet-stream"))])
        assert r.status_code == 422 and 'id="photos-error"' in r.text

    assert batch_count(org) == 0
    assert stored(org) == []


async def test_a_refused_upload_after_storing_leaves_no_batch(
    app: Any, client: httpx.AsyncClient
) -> None:
    """Refusals found once the batch exists (a photo's bytes, an input the operation does not
    take): the batch is deleted again and the photos stored so far with it."""
    org = await make_org(client)
    async with portal_client(app, org.owner) as browser:
        r = await post_batch(
            browser,
            org.id,
            [photo("red.png", (200, 30, 30)), ("photos", ("fake.png", b"hello", "image/png"))],
        )
        assert r.status_code == 422, r.text
        error = re.search(r'id="photos-error"[^>]*>([^<]+)</p>', r.text)
        assert error and "fake.png: not a PNG, JPEG or WEBP image" in error.group(1)

        r = await post_batch(
            browser,
            org.id,
            [photo("red.png", (200, 30, 30)), ("masks", ("red.png", png(96, 72), "image/png"))],
        )
        assert r.status_code == 422, r.text
        error = re.search(r'id="masks-error"[^>]*>([^<]+)</p>', r.text)
        assert error and "red.png: operation &#39;resize&#39; takes no &#39;mask&#39;" in (
            error.group(1)
        )
    assert batch_count(org) == 0
    assert stored(org) == []


async def test_a_batch_over_the_quota_waits_open_and_is_canceled(
    app: Any, client: httpx.AsyncClient
) -> None:
    org = await make_org(client)
    set_overrides(org, monthly_images=1)
    base = f"/portal/orgs/{org.id}"
    async with portal_client(app, org.owner) as browser:
        r = await post_batch(
            browser, org.id, [photo("a.png", (200, 30, 30)), photo("b.png", (30, 30, 200))]
        )
        # Stored, but the quota admits none of it: the batch is shown open, with the reason.
        assert r.status_code == 429, r.text
        assert 'role="alert"' in r.text and "Submit batch" in r.text
        batch_id = db_scalar("SELECT id FROM batches WHERE organization_id = :o", o=org.id)
        assert db_scalar("SELECT status FROM batches WHERE id = :b", b=batch_id) == "open"
        assert db_scalar("SELECT count(*) FROM jobs WHERE organization_id = :o", o=org.id) == 0
        assert len(stored(org)) == 2

        page = await browser.get(f"{base}/batches/{batch_id}")
        r = await browser.post(
            f"{base}/batches/{batch_id}/cancel",
            data={"csrf_token": csrf_of(page.text), "back": "list"},
        )
        assert r.status_code == 303 and r.headers["location"] == f"{base}/batches"
        assert db_scalar("SELECT status FROM batches WHERE id = :b", b=batch_id) == "canceled"
        await until(
            lambda: _empty(org), timeout=15, what="the canceled batch's photos to be deleted"
        )


async def _empty(org: Org) -> bool:
    return stored(org) == []


async def test_the_billing_role_is_refused(app: Any, client: httpx.AsyncClient) -> None:
    org, headers = await keyed_org(client)
    billing = await add_member(client, org, "billing")
    r = await client.post(
        "/v1/batches", json={"operation": "resize", "params": {"width": 32}}, headers=headers
    )
    batch_id = r.json()["id"]
    base = f"/portal/orgs/{org.id}"
    async with portal_client(app, billing) as browser:
        for url in (
            f"{base}/batches",
            f"{base}/batches/{batch_id}",
            f"{base}/batches/{batch_id}/summary",
            f"{base}/batches/{batch_id}/archive",
        ):
            assert (await browser.get(url)).status_code == 403, url
        token = csrf_of((await browser.get(f"{base}/billing")).text)
        assert f'href="{base}/batches"' not in (await browser.get(f"{base}/billing")).text
        r = await browser.post(
            f"{base}/batches",
            data={"csrf_token": token, "operation": "resize", "params.resize.width": "32"},
            files=[photo("a.png", (1, 2, 3))],
        )
        assert r.status_code == 403
        r = await browser.post(f"{base}/batches/{batch_id}/cancel", data={"csrf_token": token})
        assert r.status_code == 403
    assert batch_count(org) == 1
    assert db_scalar("SELECT status FROM batches WHERE id = :b", b=batch_id) == "open"


async def test_another_organizations_batch_is_not_found(
    app: Any, client: httpx.AsyncClient
) -> None:
    org_a, headers = await keyed_org(client)
    org_b = await make_org(client)
    r = await client.post(
        "/v1/batches",
        json={"operation": "resize", "params": {"width": 32}, "name": "secret-shoot"},
        headers=headers,
    )
    batch_id = r.json()["id"]
    async with portal_client(app, org_b.owner) as browser:
        token = csrf_of((await browser.get(f"/portal/orgs/{org_b.id}/batches")).text)
        for org_id in (org_a.id, org_b.id):
            base = f"/portal/orgs/{org_id}/batches/{batch_id}"
            for url in (base, f"{base}/summary", f"{base}/archive"):
                r = await browser.get(url)
                assert r.status_code == 404, url
                assert "secret-shoot" not in r.text
            for action in ("cancel", "submit"):
                r = await browser.post(f"{base}/{action}", data={"csrf_token": token})
                assert r.status_code == 404, (org_id, action)
        listing = await browser.get(f"/portal/orgs/{org_b.id}/batches")
        assert batch_id not in listing.text
    assert db_scalar("SELECT status FROM batches WHERE id = :b", b=batch_id) == "open"
