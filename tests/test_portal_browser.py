"""The admin portal in a real browser: Debian's chromium driven by Playwright against the API
served as its own process, with the dispatcher and a CPU worker running. Every request that
leaves 127.0.0.1 is refused, and every page is checked for script and console errors.

Screenshots of the main pages at 375 and 1440 px wide go to var/portal-screenshots (a test
artifact, not committed)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.browser import (
    SCREENSHOTS,
    Browser,
    api,
    api_account,
    api_org,
    shoot,
    sign_in,
    sign_out,
)
from tests.conftest import PASSWORD, db_rows, db_scalar
from tests.factories import png

pytestmark = pytest.mark.usefixtures("services")


def submit(base: str, key: str) -> httpx.Response:
    return api(
        base,
        "POST",
        "/v1/jobs",
        key,
        data={"operation": "resize", "params": '{"width": 48}'},
        files={"image": ("photo.png", png(96, 72), "image/png")},
    )


def test_tenant_admin_and_operator_in_the_browser(
    live_portal: str, browser: Callable[[], Browser]
) -> None:
    from playwright.sync_api import expect

    base = live_portal
    owner_id, owner_email, owner_token = api_account(base)
    org_id, slug = api_org(base, owner_token)
    _, invitee_email, _ = api_account(base)
    _, operator_email, _ = api_account(base, superuser=True)
    org_url = f"{base}/portal/orgs/{org_id}"
    b = browser()
    page = b.page

    # Sign in: a single organization opens its dashboard with the 30-day chart.
    sign_in(page, base, owner_email)
    expect(page).to_have_url(org_url)
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    assert page.locator("svg.chart rect.bar").count() == 30

    # Invite, then accept as the invited person through the link of the mail.
    page.get_by_role("link", name="Members").click()
    page.get_by_label("E-mail address").fill(invitee_email)
    page.get_by_label("Role", exact=True).select_option("member")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.get_by_role("status")).to_contain_text(invitee_email)
    body = db_rows(
        "SELECT body FROM email_messages WHERE to_address = :a AND kind = 'invitation'",
        a=invitee_email,
    )[0].body
    link = re.search(r"(/portal/invitations/accept\?token=\S+)", body)
    assert link
    guest = browser()
    guest.page.goto(base + link.group(1))
    expect(guest.page.get_by_role("heading", name="Sign in")).to_be_visible()
    guest.page.get_by_label("E-mail address").fill(invitee_email)
    guest.page.get_by_label("Password").fill(PASSWORD)
    guest.page.get_by_role("button", name="Sign in").click()
    guest.page.get_by_role("button", name="Join the organization").click()
    expect(guest.page).to_have_url(org_url)
    page.reload()
    expect(page.get_by_role("cell", name=invitee_email, exact=True)).to_be_visible()

    # Create two keys (each shown once); revoke the second and see it refused.
    page.get_by_role("link", name="API keys").click()
    keys: list[str] = []
    for name in ("browser key", "short-lived key"):
        page.get_by_label("Name").fill(name)
        page.get_by_role("button", name="Create key").click()
        secret = page.get_by_label("Secret key").input_value()
        assert secret.startswith("hmk_")
        keys.append(secret)
    key, doomed = keys
    # Reloading the page that showed a secret posts its form again: nothing is created twice.
    page.reload()
    expect(page.locator("tr", has_text="short-lived key")).to_have_count(1)
    assert doomed not in page.content()
    row = page.locator("tr", has_text="short-lived key")
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("tr", has_text="short-lived key")).to_contain_text("revoked")
    assert api(base, "GET", "/v1/jobs", doomed).status_code == 401
    assert api(base, "GET", "/v1/jobs", key).status_code == 200

    # A member quota of one image: the first submit runs, the second is refused by it.
    page.goto(f"{org_url}/quotas/members/{owner_id}")
    page.get_by_label("monthly images").fill("1")
    page.get_by_role("button", name="Save quota").click()
    expect(page.get_by_role("status")).to_have_text("Saved.")
    first = submit(base, key)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    refused = submit(base, key)
    assert refused.status_code == 429 and refused.json()["type"].endswith("/quota-exceeded")
    assert refused.json()["subject"] == "member"

    # The job in the jobs browser: its page follows the event stream until it has finished.
    page.goto(f"{org_url}/jobs")
    page.locator(f'tr[data-job="{job_id}"] a').click()
    expect(page.locator("#job-status")).to_have_text("succeeded", timeout=60_000)
    # Input and output side by side, loaded through their presigned URLs.
    for alt in ("input ", "output "):
        image = page.locator(f'figure img[alt^="{alt}"]').first
        expect(image).to_be_visible()
        page.wait_for_function("img => img.complete", arg=image.element_handle())
        assert image.evaluate("img => img.naturalWidth") > 0, alt
    page.goto(f"{org_url}/jobs?status=succeeded")
    expect(page.locator(f'tr[data-job="{job_id}"] img.thumb')).to_be_visible()

    # Usage as CSV.
    deadline = time.monotonic() + 30
    while db_scalar("SELECT count(*) FROM usage_events WHERE job_id = :j", j=job_id) == 0:
        assert time.monotonic() < deadline, "the job was never settled"
        time.sleep(0.1)
    page.goto(f"{org_url}/usage?group_by=operation")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download CSV").click()
    csv_text = Path(download.value.path()).read_text()
    assert download.value.suggested_filename.startswith(f"usage-{slug}-operation-")
    assert "resize" in csv_text

    # A form posted without its token is refused, even with the session cookie.
    r = page.request.post(f"{org_url}/api-keys", form={"name": "forged", "scopes": "admin"})
    assert r.status == 403
    forged = "SELECT count(*) FROM api_keys WHERE name = 'forged' AND organization_id = :o"
    assert db_scalar(forged, o=org_id) == 0

    # Another organization's member finds nothing of this one.
    _, stranger_email, stranger_token = api_account(base)
    api_org(base, stranger_token)
    other = browser()
    sign_in(other.page, base, stranger_email)
    for suffix in ("", "/jobs", f"/jobs/{job_id}", "/members", "/api-keys", "/usage", "/audit"):
        response = other.page.goto(org_url + suffix)
        assert response is not None and response.status == 404, suffix
        expect(other.page.get_by_role("heading", name="Not found")).to_be_visible()

    # The operator suspends the tenant: its key is refused at once; then unsuspends.
    sign_out(page)
    sign_in(page, base, operator_email)
    page.goto(f"{base}/portal/operator")
    page.get_by_label("Search slug or name").fill(slug)
    page.get_by_role("button", name="Search").click()
    page.get_by_role("link", name=re.compile("Atelier")).click()
    page.get_by_role("button", name="Suspend").click()
    expect(page.locator("#org-state")).to_contain_text("suspended since")
    r = api(base, "GET", f"/v1/jobs/{job_id}", key)
    assert r.status_code == 403 and r.json()["type"].endswith("/organization-suspended")
    page.get_by_role("button", name="Unsuspend").click()
    expect(page.locator("#org-state")).to_have_text("active")
    assert api(base, "GET", f"/v1/jobs/{job_id}", key).status_code == 200
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    operator_pages = {
        "operator-tenants": f"{base}/portal/operator",
        "operator-tenant": f"{base}/portal/operator/orgs/{org_id}",
        "operator-queues": f"{base}/portal/operator/queues",
        "operator-usage": f"{base}/portal/operator/usage",
    }
    shoot(page, operator_pages)

    # Screenshots of the main pages, narrow and wide, signed in as the owner.
    sign_out(page)
    sign_in(page, base, owner_email)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    pages = {
        "dashboard": org_url,
        "jobs": f"{org_url}/jobs",
        "job": f"{org_url}/jobs/{job_id}",
        "members": f"{org_url}/members",
        "api-keys": f"{org_url}/api-keys",
        "quota": f"{org_url}/quotas/members/{owner_id}",
        "usage": f"{org_url}/usage",
        "billing": f"{org_url}/billing",
        "audit": f"{org_url}/audit",
        "webhooks": f"{org_url}/webhooks",
    }
    shoot(page, pages)
    sign_out(page)
    page.screenshot(path=str(SCREENSHOTS / "login-1440.png"))

    assert b.problems == [] and guest.problems == [], b.problems + guest.problems
    # The 404 answers of the stranger's visits are the only thing its browser reports.
    assert all("status of 404" in p for p in other.problems), other.problems
    assert b.blocked == [] and guest.blocked == [] and other.blocked == []
