"""The batch page in a real browser: a member (not an admin) uploads two photos, follows their
progress live from the jobs' event streams, opens a result beside its input and downloads the
batch's ZIP. Chromium reaches 127.0.0.1 only; every page is checked for script and console
errors. Screenshots at 375 and 1440 px go to var/portal-screenshots."""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from tests.browser import SCREENSHOTS, Browser, api_account, api_org, shoot, sign_in
from tests.conftest import db_rows

pytestmark = pytest.mark.usefixtures("services")


GARMENT = [(110, 40), (210, 40), (250, 90), (225, 100), (220, 210), (100, 210), (95, 100), (70, 90)]


def studio_photo(color: tuple[int, int, int]) -> bytes:
    """A garment-like shape on a white studio backdrop."""
    image = Image.new("RGB", (320, 240), (250, 250, 250))
    ImageDraw.Draw(image).polygon(GARMENT, fill=color)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def garment_mask() -> bytes:
    """The garment's silhouette of :func:`studio_photo`: white on black."""
    image = Image.new("L", (320, 240), 0)
    ImageDraw.Draw(image).polygon(GARMENT, fill=255)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def join(base: str, owner_token: str, org_id: str, email: str, token: str) -> None:
    """The person joins the organization as a member, through an invitation."""
    with httpx.Client(base_url=base, timeout=10) as c:
        r = c.post(
            f"/v1/orgs/{org_id}/invitations",
            json={"email": email, "role": "member"},
            headers={"Authorization": f"Bearer {owner_token}"},
        )
        assert r.status_code == 201, r.text
        r = c.post(
            "/v1/invitations/accept",
            json={"token": r.json()["token"]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 200, r.text


def loaded(page: Any, image: Any) -> None:
    page.wait_for_function("img => img.complete", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") > 0


def test_a_member_uploads_photos_follows_them_and_downloads_the_zip(
    live_portal: str, browser: Callable[[], Browser], services: Any
) -> None:
    from playwright.sync_api import expect

    base = live_portal
    _, _, owner_token = api_account(base)
    org_id, _ = api_org(base, owner_token)
    _, member_email, member_token = api_account(base)
    join(base, owner_token, org_id, member_email, member_token)
    org_url = f"{base}/portal/orgs/{org_id}"
    b = browser()
    page = b.page
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    sign_in(page, base, member_email)
    page.get_by_role("link", name="Batches", exact=True).click()
    expect(page.get_by_role("heading", name="Batches", exact=True)).to_be_visible()

    # A photo dropped on the form lands in its file input.
    page.locator("#dropzone").evaluate(
        """zone => {
            const data = new DataTransfer();
            data.items.add(new File(["x"], "dropped.png", {type: "image/png"}));
            zone.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }"""
    )
    expect(page.locator("#chosen li")).to_have_text([re.compile(r"^dropped\.png")])
    assert page.locator("#b-photos").evaluate("input => input.files.length") == 1

    # Two photos into the file input instead; each gets its own optional mask and interior
    # inputs once the operation takes them.
    page.get_by_label("Operation").select_option("remove_background")
    page.get_by_label("Photos (PNG, JPEG or WEBP), or one ZIP").set_input_files(
        [
            {
                "name": "red-dress.png",
                "mimeType": "image/png",
                "buffer": studio_photo((190, 30, 40)),
            },
            {
                "name": "blue-top.png",
                "mimeType": "image/png",
                "buffer": studio_photo((30, 60, 170)),
            },
        ]
    )
    expect(page.locator("#chosen li")).to_have_count(2)
    expect(page.get_by_label("Mask for red-dress.png")).to_be_visible()
    expect(page.get_by_label("Interior frame for red-dress.png")).to_be_hidden()
    page.get_by_label("Mask for red-dress.png").set_input_files(
        {"name": "silhouette.png", "mimeType": "image/png", "buffer": garment_mask()}
    )
    # Only the chosen operation's params are shown.
    expect(page.get_by_role("group", name="Params for remove_background")).to_be_visible()
    expect(page.get_by_role("group", name="Params for resize")).to_be_hidden()
    page.locator("#p-remove_background-background").select_option("transparent")
    page.get_by_label("Name (optional)").fill("autumn shoot")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for width in (375, 1440):
        page.set_viewport_size({"width": width, "height": 900})
        overflow = page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, (width, overflow)
        page.screenshot(path=str(SCREENSHOTS / f"batch-upload-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})

    # Nothing runs until the workers come back: the page shows both items queued, then
    # follows them live to the end.
    services.stop()
    page.get_by_role("button", name="Upload and start").click()
    expect(page.get_by_role("heading", name="Batch autumn shoot")).to_be_visible()
    batch_id = page.url.rsplit("/", 1)[-1]
    items = page.locator("li.item")
    expect(items).to_have_count(2)
    expect(items.locator(".item-status").first).to_have_text("queued")
    services.start_dispatcher()
    services.ensure_worker()
    for name in ("red-dress.png", "blue-top.png"):
        item = page.locator(f'li.item[data-item="{name}"]')
        expect(item.locator(".item-status")).to_have_text("succeeded", timeout=90_000)
    expect(page.locator("#batch-status")).to_have_text("completed", timeout=30_000)
    # Then the page comes again once, with every result.
    expect(page.locator('#batch[data-ended="true"]')).to_have_count(1, timeout=30_000)
    # Progress came from the jobs' event streams and the batch's summary.
    # The mask chosen beside its photo was sent with it, and used as its matte.
    inputs = db_rows(
        "SELECT name, inputs FROM batch_items WHERE batch_id = :b ORDER BY position", b=batch_id
    )
    assert [sorted(i.inputs) for i in inputs] == [["image", "mask"], ["image"]]
    assert inputs[0].inputs["mask"]["filename"] == "masks/red-dress.png"
    jobs = db_rows("SELECT job_id FROM batch_items WHERE batch_id = :b", b=batch_id)
    for job in jobs:
        assert any(u.endswith(f"/jobs/{job.job_id}/events") for u in requested), requested
    assert any(u.endswith(f"/batches/{batch_id}/summary") for u in requested)

    # Every result beside its input, with its quality report.
    red = page.locator('li.item[data-item="red-dress.png"]')
    for alt in ("input red-dress.png", "output of red-dress.png", "alpha of red-dress.png"):
        image = red.get_by_alt_text(alt, exact=True)
        expect(image).to_be_visible()
        loaded(page, image)
    expect(red.locator("details.report summary")).to_contain_text("Quality report")
    red.locator("details.report summary").click()
    expect(red.get_by_role("row", name="matte caller_mask")).to_be_visible()
    blue = page.locator('li.item[data-item="blue-top.png"]')
    blue.locator("details.report summary").click()
    expect(blue.get_by_role("rowheader", name="foreground_fraction")).to_be_visible()

    # One result opened: the job's page, its input and output side by side.
    red.get_by_role("link", name="Open job").click()
    expect(page.locator("#job-status")).to_have_text("succeeded")
    for alt in ("input ", "output "):
        image = page.locator(f'figure img[alt^="{alt}"]').first
        expect(image).to_be_visible()
        loaded(page, image)
    page.go_back()

    # All of them as the batch's ZIP: each output named after its input, and items.csv.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download all (ZIP)").click()
    assert download.value.suggested_filename == "autumn-shoot.zip"
    with zipfile.ZipFile(Path(download.value.path())) as archive:
        assert sorted(archive.namelist()) == [
            "blue-top.alpha.png",
            "blue-top.png",
            "items.csv",
            "red-dress.alpha.png",
            "red-dress.png",
        ]
        rows = list(csv.DictReader(io.StringIO(archive.read("items.csv").decode())))
        assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
        with Image.open(io.BytesIO(archive.read("red-dress.png"))) as output:
            assert output.mode == "RGBA"

    # The list shows the batch with its counts by status.
    page.get_by_role("link", name="All batches").click()
    row = page.locator(f'tr[data-batch="{batch_id}"]')
    expect(row).to_contain_text("succeeded 2")
    expect(row).to_contain_text("completed")

    shoot(
        page,
        {
            "batches": f"{org_url}/batches",
            "batch": f"{org_url}/batches/{batch_id}",
        },
    )
    assert b.problems == [], b.problems
    assert b.blocked == [], b.blocked
    assert not [u for u in requested if not re.match(r"^(http://127\.0\.0\.1|data:)", u)]
