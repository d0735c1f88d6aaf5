"""Builders shared by the test modules: images, jobs submitted through the API, usage
written as the worker would. Accounts, organizations and keys come from ``tests.conftest``."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from PIL import Image
from sqlalchemy import create_engine, pool, text

from tests.conftest import (
    Account,
    Org,
    bearer,
    db_rows,
    make_key,
    make_org,
    register,
    superuser_url,
    unique,
)

TERMINAL = {"succeeded", "failed", "canceled", "expired"}


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, "PNG")
    return buf.getvalue()


async def keyed_org(client: httpx.AsyncClient) -> tuple[Org, dict[str, str]]:
    org = await make_org(client)
    key = await make_key(client, org, ["jobs:read", "jobs:write"])
    return org, bearer(key["key"])


async def submit(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    *,
    operation: str = "resize",
    params: dict[str, Any] | None = None,
    image: bytes | None = None,
    files: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
) -> httpx.Response:
    if params is None:
        params = {"width": 32}
    form = {"operation": operation, "params": json.dumps(params), **(data or {})}
    upload = files or {"image": ("photo.png", image or png(), "image/png")}
    return await client.post("/v1/jobs", data=form, files=upload, headers=headers)


async def wait_job(
    client: httpx.AsyncClient, headers: dict[str, str], job_id: str, timeout: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["status"] in TERMINAL:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {body}")


async def wait_status(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    job_id: str,
    status: str,
    timeout: float = 30.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if body["status"] == status:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached {status}")


def big_png(side: int = 5000) -> bytes:
    """A large photographic-ish PNG that takes a worker seconds to resize and encode."""
    rng = np.random.default_rng(7)
    base = np.linspace(0, 255, side, dtype=np.float32)
    img = (base[None, :, None] + rng.normal(0, 2, (side // 8, side, 1))).clip(0, 255)
    tile = np.repeat(img.astype(np.uint8), 3, axis=2)
    full = np.tile(tile, (8, 1, 1))
    buf = io.BytesIO()
    Image.fromarray(full).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Event:
    at: str
    operation: str = "ghost_mannequin"
    gpu: float = 0.0
    images: int = 1
    mp: float = 0.0
    user: str | None = None
    key: str | None = None


def add_usage(org_id: str, *events: Event) -> None:
    """Usage events with their jobs, as the worker would have written them, at chosen times."""
    engine = create_engine(superuser_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        for e in events:
            params = {
                "org": org_id,
                "op": e.operation,
                "gpu": e.gpu,
                "images": e.images,
                "mp": e.mp,
                "user": e.user,
                "key": e.key,
                "at": e.at,
            }
            conn.execute(
                text(
                    "WITH j AS (INSERT INTO jobs (id, organization_id, api_key_id, user_id, "
                    "operation, operation_version, queue, params, status, inputs, request_hash, "
                    "created_at) VALUES (gen_random_uuid(), :org, :key, :user, :op, '1', 'cpu', "
                    "'{}', 'succeeded', '{}', 'test', CAST(:at AS timestamptz)) RETURNING id) "
                    "INSERT INTO usage_events (id, organization_id, job_id, user_id, api_key_id, "
                    "operation, outcome, gpu_seconds, images, megapixels, created_at) "
                    "SELECT gen_random_uuid(), :org, j.id, :user, :key, :op, 'succeeded', :gpu, "
                    ":images, :mp, CAST(:at AS timestamptz) FROM j"
                ),
                params,
            )
    engine.dispose()


def set_overrides(org: Org, **overrides: Any) -> None:
    """What an operator does: put the org on the default plan with these limit overrides."""
    db_rows(
        "INSERT INTO org_billing (organization_id, plan_id, overrides) "
        "SELECT :o, id, CAST(:ov AS jsonb) FROM plans WHERE is_default "
        "ON CONFLICT (organization_id) DO UPDATE SET overrides = EXCLUDED.overrides",
        o=org.id,
        ov=json.dumps(overrides),
    )
    from hiddenmodel.usage import ratelimits

    ratelimits.forget(uuid.UUID(org.id))


def endpoints_path(org: Org) -> str:
    return f"/v1/orgs/{org.id}/webhook-endpoints"


async def create_endpoint(
    client: httpx.AsyncClient, org: Org, url: str, **fields: Any
) -> dict[str, Any]:
    r = await client.post(
        endpoints_path(org), json={"url": url, **fields}, headers=org.owner.headers
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def insert_endpoint(org_id: str, event_types: list[str], *, enabled: bool = True) -> None:
    """A webhook endpoint written straight to the table (its secret a placeholder), for tests
    that need one to exist, not to receive: the API's own checks of the URL stay out of it."""
    db_rows(
        "INSERT INTO webhook_endpoints (id, organization_id, url, event_types, enabled,"
        " secret_ciphertext) VALUES (gen_random_uuid(), :o, 'https://hooks.example.com/x',"
        " CAST(:types AS varchar[]), :enabled, '\\x00')",
        o=org_id,
        types="{" + ",".join(event_types) + "}",
        enabled=enabled,
    )


def plan_body(**extra: Any) -> dict[str, Any]:
    return {
        "code": unique("plan"),
        "name": "Studio",
        "price_per_gpu_second": "0.003500",
        "included_gpu_seconds": 7200,
        "included_images": 10000,
        "monthly_gpu_seconds": 200000,
        "monthly_images": 400000,
        "max_running_jobs": 32,
        **extra,
    }


def last_mail(email: str, kind: str) -> str:
    """The body of the newest mail of ``kind`` recorded for ``email``."""
    rows = db_rows(
        "SELECT body FROM email_messages WHERE to_address = :e AND kind = :k "
        "ORDER BY created_at DESC LIMIT 1",
        e=email.lower(),
        k=kind,
    )
    assert rows, f"no {kind} mail to {email}"
    body: str = rows[0][0]
    return body


def mail_count(email: str, kind: str) -> int:
    return int(
        db_rows(
            "SELECT count(*) FROM email_messages WHERE to_address = :e AND kind = :k",
            e=email.lower(),
            k=kind,
        )[0][0]
    )


def token_in(body: str) -> str:
    """The ``token: ...`` line of a mail."""
    match = re.search(r"^token: (\S+)$", body, re.M)
    assert match, body
    return match.group(1)


async def add_member(client: httpx.AsyncClient, org: Org, role: str = "member") -> Account:
    """A new account that joined ``org`` with ``role`` through an invitation."""
    account = await register(client)
    r = await client.post(
        f"/v1/orgs/{org.id}/invitations",
        json={"email": account.email, "role": role},
        headers=org.owner.headers,
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/invitations/accept", json={"token": r.json()["token"]}, headers=account.headers
    )
    assert r.status_code == 200, r.text
    return account
