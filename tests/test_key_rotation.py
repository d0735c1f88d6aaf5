"""Rotating HM_SECRET_KEY without logging everyone out: the new key signs, the previous one
(HM_SECRET_KEY_PREVIOUS) still verifies what it signed — API keys, session tokens,
invitations, sealed webhook secrets, portal CSRF tokens."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from hiddenmodel.settings import get_settings
from hiddenmodel.webhooks import signing
from tests.conftest import assert_problem, bearer, db_scalar, make_key, make_org, register
from tests.factories import create_endpoint

NEW_KEY = "rotated-secret-key-fedcba9876543210fedcba9876543210"


@pytest.fixture
def rotate(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Call to rotate: the current key becomes the previous one, NEW_KEY signs."""
    old = get_settings().secret_key.get_secret_value()

    def apply(keep_previous: bool = True) -> None:
        monkeypatch.setenv("HM_SECRET_KEY", NEW_KEY)
        if keep_previous:
            monkeypatch.setenv("HM_SECRET_KEY_PREVIOUS", old)
        else:
            monkeypatch.delenv("HM_SECRET_KEY_PREVIOUS", raising=False)
        get_settings.cache_clear()

    yield apply
    monkeypatch.setenv("HM_SECRET_KEY", old)
    monkeypatch.delenv("HM_SECRET_KEY_PREVIOUS", raising=False)
    get_settings.cache_clear()


async def test_what_the_old_key_signed_still_verifies_after_a_rotation(
    client: httpx.AsyncClient, rotate: object
) -> None:
    org = await make_org(client)
    key = await make_key(client, org)
    endpoint = await create_endpoint(client, org, "https://example.com/hook")
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": "invitee@example.com", "role": "member"},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    invitation = r.json()["token"]
    sealed = db_scalar(
        "SELECT secret_ciphertext FROM webhook_endpoints WHERE id = :i",
        i=uuid.UUID(endpoint["id"]),
    )

    assert callable(rotate)
    rotate(keep_previous=True)
    r = await client.get("/v1/jobs", headers=bearer(key["key"]))
    assert r.status_code == 200, r.text
    r = await client.get("/v1/users/me", headers=org.owner.headers)
    assert r.status_code == 200, r.text
    opened = signing.decrypt_secret(
        bytes(sealed), org_id=uuid.UUID(org.id), endpoint_id=uuid.UUID(endpoint["id"])
    )
    assert opened == endpoint["secret"]
    invitee = await register(client, "invitee@example.com")
    r = await client.post(
        "/v1/invitations/accept", json={"token": invitation}, headers=invitee.headers
    )
    assert r.status_code in (200, 201), r.text

    # What is issued now is signed by the new key alone: it survives dropping the old one.
    fresh = await make_key(client, org)
    rotate(keep_previous=False)
    r = await client.get("/v1/jobs", headers=bearer(fresh["key"]))
    assert r.status_code == 200, r.text
    # ... while what only the old key signed stops verifying.
    assert_problem(await client.get("/v1/jobs", headers=bearer(key["key"])), 401)
    assert_problem(await client.get("/v1/users/me", headers=org.owner.headers), 401)
    with pytest.raises(signing.SecretUnreadable):
        signing.decrypt_secret(
            bytes(sealed), org_id=uuid.UUID(org.id), endpoint_id=uuid.UUID(endpoint["id"])
        )


async def test_a_portal_form_rendered_before_a_rotation_still_posts(
    client: httpx.AsyncClient, rotate: object
) -> None:
    page = await client.get("/portal/login")
    token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    assert callable(rotate)
    rotate(keep_previous=True)
    r = await client.post(
        "/portal/login",
        data={"email": "nobody@example.com", "password": "wrong-Password-1", "csrf_token": token},
    )
    assert r.status_code != 403, r.text
    rotate(keep_previous=False)
    r = await client.post(
        "/portal/login",
        data={"email": "nobody@example.com", "password": "wrong-Password-1", "csrf_token": token},
    )
    assert r.status_code == 403, r.text
